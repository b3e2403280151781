"""Exact ReLU heads: the cone-constrained convex program, solved by an augmented Lagrangian.

    minimize  f( sum_i D_i Z (V_i - W_i) + 1 b^T ) + lam * sum_{i,k} (||V_ik||_2 + ||W_ik||_2)
    s.t.      (2 D_i - I) Z V_ik >= 0,  (2 D_i - I) Z W_ik >= 0   for every gate i, class k

V_ik, W_ik are column k of the (d, c) blocks: each is one neuron feeding only output k, kept
in the cone where the ReLU's pattern is D_i, so relu(Z V_ik) = D_i Z V_ik exactly.
With all patterns of the data present this equals the two-layer ReLU network with weight
decay (per-class neurons; one output: Pilanci & Ergen, 2020).

Augmented Lagrangian: for multipliers G >= 0 (one per sample, block and class) and a penalty
delta, each subproblem minimizes f + lam R + 1/(2 delta) ||(G - delta C(W))_+||^2 by FISTA,
where C(W) stacks the constraint values; then G <- (G - delta C)_+, and delta grows while the
violation does not shrink fast enough. The multipliers take n x 2p x c numbers: this solver is
for moderate sizes. The duality gap uses theta = -grad f and the updated multipliers, and the
constraint violation is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fista import fista
from .losses import CrossEntropyLoss, SquaredLoss
from .operator import matmul_tn
from .problem import Certificate, certificate


class ReLUProblem:
    """One augmented-Lagrangian subproblem. Weights U have shape (2p, d, c): [V; W]."""

    def __init__(self, Z, masks, Y, loss, lam, fit_bias, delta: float, mult: torch.Tensor | None):
        n, p = masks.shape
        m = masks.to(Z.dtype)
        self.Z, self.Y, self.loss, self.lam, self.fit_bias = Z, Y, loss, lam, fit_bias
        self.out = torch.cat([m, -m], dim=1)  # (n, 2p): D_i for V, -D_i for W
        self.cone = torch.cat([2 * m - 1, 2 * m - 1], dim=1)  # (n, 2p): 2 D_i - I
        self.delta = delta
        c = Y.shape[1]
        self.mult = mult if mult is not None else Z.new_zeros(n, 2 * p, c)

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        """Z U_j for every block: (n, 2p, c)."""
        q, d, c = U.shape
        return (self.Z @ U.permute(1, 0, 2).reshape(d, q * c)).view(-1, q, c)

    def outputs(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.einsum("njc,nj->nc", raw, self.out)

    def updated_multipliers(self, raw: torch.Tensor) -> torch.Tensor:
        return (self.mult - self.delta * self.cone.unsqueeze(-1) * raw).clamp_min(0.0)

    def violation(self, raw: torch.Tensor) -> float:
        return float((-self.cone.unsqueeze(-1) * raw).clamp_min(0.0).max())

    def smooth_value(self, raw: torch.Tensor, b: torch.Tensor) -> float:
        al = self.updated_multipliers(raw).square().sum() / (2 * self.delta)
        return float(self.loss.value(self.outputs(raw) + b, self.Y) + al)

    def _adjoint(self, R: torch.Tensor) -> torch.Tensor:
        n, q, c = R.shape
        return matmul_tn(self.Z, R.reshape(n, q * c)).reshape(-1, q, c).permute(1, 0, 2)

    def smooth_grad(self, raw: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gF = self.loss.grad(self.outputs(raw) + b, self.Y)
        R = self.out.unsqueeze(-1) * gF.unsqueeze(1) - self.cone.unsqueeze(
            -1
        ) * self.updated_multipliers(raw)
        gb = gF.sum(dim=0) if self.fit_bias else torch.zeros_like(b)
        return self._adjoint(R), gb

    def prox(self, V: torch.Tensor, step: float) -> torch.Tensor:
        norms = torch.linalg.vector_norm(V, dim=1, keepdim=True)
        return V * (1.0 - self.lam * step / norms.clamp_min(torch.finfo(V.dtype).tiny)).clamp_min(
            0.0
        )

    def penalty_value(self, U: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(U, dim=1).sum()

    def dual_norms(self, theta: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """||Z^T (s_j D_j theta_k + (2 D_j - I) G_jk)|| for every block j and class k."""
        R = self.out.unsqueeze(-1) * theta.unsqueeze(1) + self.cone.unsqueeze(
            -1
        ) * self.updated_multipliers(raw)
        return torch.linalg.vector_norm(self._adjoint(R), dim=1).reshape(-1)


@dataclass
class ReLUResult:
    U: torch.Tensor  # (2p, d, c)
    b: torch.Tensor
    cert: Certificate
    n_iter: int
    converged: bool
    violation: float  # largest constraint violation, relative to the largest |Z U|


def solve_relu(
    Z: torch.Tensor,
    masks: torch.Tensor,
    Y: torch.Tensor,
    loss: SquaredLoss | CrossEntropyLoss,
    lam: float,
    fit_bias: bool,
    *,
    tol: float,
    max_iter: int,
    max_outer: int = 40,
    callback: Callable[[int, Certificate], None] | None = None,
) -> ReLUResult:
    """The exact ReLU program; each subproblem runs FISTA to the gap ``tol``."""
    args = (Z, masks, Y, loss, lam, fit_bias)
    schedule = Schedule(delta=10.0 / masks.shape[0], inner=None, settled=0.0)
    return augmented_lagrangian(ReLUProblem, args, schedule, tol, max_iter, max_outer, callback)


@dataclass(frozen=True)
class Schedule:
    """How the augmented Lagrangian proceeds.

    delta: the first penalty. inner: None runs each subproblem to FISTA's own gap test at tol
    (all iterations left); a number caps round 0 at inner and later rounds at 2 inner
    iterations, with no gap test. The penalty grows 4x after a round whose violation is above
    ``settled`` and above a quarter of the previous round's.
    """

    delta: float
    inner: int | None
    settled: float


def augmented_lagrangian(
    problem: Callable[..., ReLUProblem],
    args: tuple,
    schedule: Schedule,
    tol: float,
    max_iter: int,
    max_outer: int,
    callback: Callable[[int, Certificate], None] | None,
) -> ReLUResult:
    """Rounds of FISTA on ``problem(*args, delta, multipliers)`` with multiplier updates,
    until the gap and the relative violation are both at most tol or max_iter iterations."""
    Z, Y = args[0], args[2]
    U = Z.new_zeros(2 * args[1].shape[1], Z.shape[1], Y.shape[1])
    b = torch.zeros(Y.shape[1], dtype=Z.dtype, device=Z.device)
    delta, mult = schedule.delta, None
    used, L, last_viol, viol = 0, 1.0, float("inf"), 0.0
    prob = problem(*args, delta, mult)
    cert = certificate(prob, U, b, prob.forward(U))
    for outer in range(max_outer):
        prob = problem(*args, delta, mult)
        if schedule.inner is None:
            inner_tol, budget = tol, max_iter - used
        else:
            inner_tol, budget = -1.0, min(max_iter - used, schedule.inner << min(outer, 1))
        res = fista(
            prob,
            U,
            b,
            tol=inner_tol,
            max_iter=max(1, budget),
            L=L,
            extrapolate_dual=False,
            callback=callback,
        )
        used += res.n_iter
        U, b, L = res.W, res.b, res.L
        raw = res.AW
        viol = prob.violation(raw) / (float(raw.abs().max()) or 1.0)
        mult = prob.updated_multipliers(raw)
        cert = certificate(problem(*args, delta, mult), U, b, raw)
        if (cert.gap <= tol and viol <= tol) or used >= max_iter:
            break
        if viol > schedule.settled and viol > 0.25 * last_viol:
            delta *= 4.0  # the violation is not shrinking fast enough: penalize harder
        last_viol = viol
    return ReLUResult(U, cert.b, cert, used, cert.gap <= tol and viol <= tol, viol)
