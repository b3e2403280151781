"""A fixed-gate convex program and its duality gap.

    minimize_{W, b}  f(A(W) + 1 b^T) + lam * sum_i ||W_i||

with A the gated operator, f a loss from ``losses`` and ||.|| a penalty from ``penalties``.
b is an unpenalized output bias (absent when ``fit_bias`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import CrossEntropyLoss, SquaredLoss
from .operator import GatedOperator
from .penalties import GroupFrobenius, GroupNuclear


@dataclass
class Problem:
    op: GatedOperator
    Y: torch.Tensor  # (n, c)
    loss: SquaredLoss | CrossEntropyLoss
    penalty: GroupFrobenius | GroupNuclear
    lam: float
    fit_bias: bool

    def restrict(self, idx: torch.Tensor) -> Problem:
        return Problem(self.op.restrict(idx), self.Y, self.loss, self.penalty, self.lam, self.fit_bias)

    def to(self, dtype: torch.dtype) -> Problem:
        return Problem(
            self.op.to(dtype), self.Y.to(dtype), self.loss, self.penalty, self.lam, self.fit_bias
        )

    def zero_bias(self) -> torch.Tensor:
        return torch.zeros(self.Y.shape[1], dtype=self.Y.dtype, device=self.Y.device)

    def objective(self, W: torch.Tensor, b: torch.Tensor, AW: torch.Tensor) -> torch.Tensor:
        return self.loss.value(AW + b, self.Y) + self.lam * self.penalty.value(W)


@dataclass
class Certificate:
    primal: float
    dual: float
    gap: float  # relative: (primal - dual) / max(|primal|, tiny)
    b: torch.Tensor  # the output bias the primal value was evaluated with
    dual_norms: torch.Tensor  # ||A_i^T theta||_dual for every gate, before scaling
    theta: torch.Tensor  # (n, c): the unscaled dual direction -grad f


def certificate(
    problem: Problem,
    W: torch.Tensor,
    b: torch.Tensor,
    AW: torch.Tensor,
    extra_dual: torch.Tensor | None = None,
) -> Certificate:
    """Primal value, a feasible dual point built from the residual, and the relative gap.

    With a bias, b is first set to its exact minimizer for the current W, so the residual
    direction theta = -grad f has zero column sums (the dual constraint of an unpenalized b).
    theta is scaled by s = min(1, lam / max_i ||A_i^T theta||_dual) into the dual feasible set;
    for the squared loss s is further chosen on [0, that bound] to maximize the dual.
    """
    Y, loss = problem.Y, problem.loss
    if problem.fit_bias:
        b = loss.optimal_bias(AW, Y, b)
    F = AW + b
    primal = loss.value(F, Y) + problem.lam * problem.penalty.value(W)
    theta = -loss.grad(F, Y)
    norms = problem.penalty.dual_norms(problem.op.rmatvec(theta))
    top = float(norms.max()) if norms.numel() else 0.0
    s = 1.0 if top <= problem.lam else problem.lam / top
    if isinstance(loss, SquaredLoss):
        tt = float(theta.square().sum())
        if tt > 0:
            s = min(s, max(0.0, float((theta * Y).sum()) / (Y.shape[0] * tt)))
    dual = float(loss.dual(s * theta, Y))
    if extra_dual is not None:
        dual = max(dual, _dual_value(problem, extra_dual))
    p = float(primal)
    gap = max(p - dual, 0.0) / max(abs(p), torch.finfo(torch.float64).tiny)
    return Certificate(p, dual, gap, b, norms, theta)


def _dual_value(problem: Problem, theta: torch.Tensor) -> float:
    """Dual objective at theta scaled into the feasible set (squared loss only: any theta is
    in the conjugate's domain once its column means are removed for the bias)."""
    Y = problem.Y
    if problem.fit_bias:
        theta = theta - theta.mean(dim=0)
    norms = problem.penalty.dual_norms(problem.op.rmatvec(theta))
    top = float(norms.max()) if norms.numel() else 0.0
    s = 1.0 if top <= problem.lam else problem.lam / top
    tt = float(theta.square().sum())
    if tt > 0:
        s = min(s, max(0.0, float((theta * Y).sum()) / (Y.shape[0] * tt)))
    return float(problem.loss.dual(s * theta, Y))
