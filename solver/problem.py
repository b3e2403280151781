"""Fixed-gate convex programs and their duality gap.

Gated ReLU (``Problem``):

    minimize_{W, b}  f(A(W) + 1 b^T) + lam * sum_i ||W_i||

with A the gated operator, f a loss from ``losses`` and ||.|| a penalty from ``penalties``;
b is an unpenalized output bias (absent when ``fit_bias`` is False).

A problem exposes what the first-order solvers need: ``forward`` (a linear map of W whose
value the loss reads), ``outputs`` (model outputs from that value), ``smooth_value`` and
``smooth_grad``, ``prox``, ``penalty_value``, and ``dual_norms`` (the dual-constraint norms of
a dual direction theta, one per group), from which ``certificate`` builds the gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .losses import CrossEntropyLoss, SquaredLoss
from .operator import Operator
from .penalties import GroupFrobenius, GroupNuclear


class ConvexProgram(Protocol):
    Y: torch.Tensor
    loss: SquaredLoss | CrossEntropyLoss
    lam: float
    fit_bias: bool

    def forward(self, W: torch.Tensor) -> torch.Tensor: ...
    def outputs(self, AW: torch.Tensor) -> torch.Tensor: ...
    def smooth_value(self, AW: torch.Tensor, b: torch.Tensor) -> float: ...
    def smooth_grad(
        self, AW: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def prox(self, V: torch.Tensor, step: float) -> torch.Tensor: ...
    def penalty_value(self, W: torch.Tensor) -> torch.Tensor: ...
    def dual_norms(self, theta: torch.Tensor, AW: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Problem:
    op: Operator
    Y: torch.Tensor  # (n, c)
    loss: SquaredLoss | CrossEntropyLoss
    penalty: GroupFrobenius | GroupNuclear
    lam: float
    fit_bias: bool

    def restrict(self, idx: torch.Tensor) -> Problem:
        return Problem(
            self.op.restrict(idx), self.Y, self.loss, self.penalty, self.lam, self.fit_bias
        )

    def to(self, dtype: torch.dtype) -> Problem:
        return Problem(
            self.op.to(dtype), self.Y.to(dtype), self.loss, self.penalty, self.lam, self.fit_bias
        )

    def zero_bias(self) -> torch.Tensor:
        return torch.zeros(self.Y.shape[1], dtype=self.Y.dtype, device=self.Y.device)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return self.op.matvec(W)

    def outputs(self, AW: torch.Tensor) -> torch.Tensor:
        return AW

    def smooth_value(self, AW: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.loss.value(AW + b if self.fit_bias else AW, self.Y))

    def smooth_grad(self, AW: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fit_bias:  # b is zero
            return self.op.rmatvec(self.loss.grad(AW, self.Y)), torch.zeros_like(b)
        gF = self.loss.grad(AW + b, self.Y)
        return self.op.rmatvec(gF), gF.sum(dim=0)

    def prox(self, V: torch.Tensor, step: float) -> torch.Tensor:
        return self.penalty.prox(V, self.lam * step)

    def penalty_value(self, W: torch.Tensor) -> torch.Tensor:
        return self.penalty.value(W)

    def dual_norms(self, theta: torch.Tensor, AW: torch.Tensor) -> torch.Tensor:
        return self.penalty.dual_norms(self.op.rmatvec(theta))


@dataclass
class Certificate:
    primal: float
    dual: float
    gap: float  # relative: (primal - dual) / max(|primal|, tiny)
    b: torch.Tensor  # the output bias the primal value was evaluated with
    dual_norms: torch.Tensor  # dual-constraint norm of every group, before scaling
    theta: torch.Tensor  # (n, c): the unscaled dual direction -grad f


def certificate(
    problem: Any,
    W: torch.Tensor,
    b: torch.Tensor,
    AW: torch.Tensor,
    extra_dual: torch.Tensor | None = None,
) -> Certificate:
    """Primal value, a feasible dual point built from the residual, and the relative gap.

    With a bias, b is first set to its exact minimizer for the current W, so the residual
    direction theta = -grad f has zero column sums (the dual constraint of an unpenalized b).
    theta is scaled by s = min(1, lam / max_i dual_norm_i(theta)) into the dual feasible set;
    for the squared loss s is further chosen on [0, that bound] to maximize the dual.
    ``extra_dual`` is a second candidate direction (e.g. extrapolated); the better dual wins.
    """
    Y, loss = problem.Y, problem.loss
    F = problem.outputs(AW)
    if problem.fit_bias:
        b = loss.optimal_bias(F, Y, b)
    primal = float(loss.value(F + b, Y) + problem.lam * problem.penalty_value(W))
    theta = -loss.grad(F + b, Y)
    norms = problem.dual_norms(theta, AW)
    dual = _scaled_dual(problem, theta, norms)
    if extra_dual is not None and isinstance(loss, SquaredLoss):
        if problem.fit_bias:
            extra_dual = extra_dual - extra_dual.mean(dim=0)
        dual = max(dual, _scaled_dual(problem, extra_dual, problem.dual_norms(extra_dual, AW)))
    gap = max(primal - dual, 0.0) / max(abs(primal), torch.finfo(torch.float64).tiny)
    return Certificate(primal, dual, gap, b, norms, theta)


def _scaled_dual(problem: Any, theta: torch.Tensor, norms: torch.Tensor) -> float:
    Y = problem.Y
    top = float(norms.max()) if norms.numel() else 0.0
    s = 1.0 if top <= problem.lam else problem.lam / top
    if isinstance(problem.loss, SquaredLoss):
        tt = float(theta.square().sum())
        if tt > 0:
            s = min(s, max(0.0, float((theta * Y).sum()) / (Y.shape[0] * tt)))
    return float(problem.loss.dual(s * theta, Y))


def zero_threshold(
    op: Operator,
    Y: torch.Tensor,
    loss: SquaredLoss | CrossEntropyLoss,
    pen: GroupFrobenius | GroupNuclear,
    fit_bias: bool,
) -> float:
    """lam_max: the smallest lam whose solution is W = 0, max_i ||A_i^T theta_0||_dual with
    theta_0 = -grad f at W = 0 (with the optimal bias when one is fitted). Any operator."""
    b = torch.zeros(Y.shape[1], dtype=Y.dtype, device=Y.device)
    F = torch.zeros_like(Y)
    if fit_bias:
        b = loss.optimal_bias(F, Y, b)
    theta = -loss.grad(F + b, Y)
    norms = pen.dual_norms(op.rmatvec(theta))
    return float(norms.max()) if norms.numel() else 0.0
