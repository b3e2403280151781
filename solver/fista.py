"""Accelerated proximal gradient (FISTA) with backtracking and adaptive restart.

Each iteration costs one product with A and one with its adjoint: the forward value at the
extrapolated point is a linear combination of two already computed forward values.
Momentum: t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2, restarted (t = 1) whenever the step
moves against the momentum (O'Donoghue & Candes' gradient-mapping test). The step 1/L starts
optimistic each iteration (L *= 0.9) and is halved until the quadratic upper bound holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .losses import SquaredLoss
from .problem import Certificate, ConvexProgram, certificate

EXTRAPOLATION_DEPTH = 5
# See fista's min_decrease. Between checks the estimate moves by 0.9x per iteration and 2x per
# backtracking step: on Lite0 Fashion (10 classes, 32 gates) it stayed within 29-89 for 60
# bfloat16 iterations, then reached 84000 in the next 10 as the objective stopped falling.
ROUNDING_L_JUMP = 100.0
# See fista's stall. Lite0 Fashion, 1000 images, 10 classes, 64 gates, lam = 0.04 lam_max: the
# float32 objective came within 1e-6 of the optimum by iteration 1200 and then moved by
# 1e-7-3e-7 at a time, while its gap wandered between 2.4e-3 and 3.5e-4 (halving often
# enough to keep the gap rule quiet) until iteration 3100.
STALL_DECREASE = 1e-6


@dataclass
class FistaResult:
    W: torch.Tensor
    b: torch.Tensor
    AW: torch.Tensor
    cert: Certificate
    n_iter: int
    L: float
    converged: bool


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def fista(
    problem: ConvexProgram,
    W: torch.Tensor,
    b: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    L: float = 1.0,
    check_every: int = 10,
    extrapolate_dual: bool = True,
    callback: Callable[[int, Certificate], None] | None = None,
    stall: int = 0,
    min_decrease: float = 0.0,
) -> FistaResult:
    """Accelerated proximal gradient until the relative gap is at most tol or max_iter.

    With ``stall`` > 0 it also stops once, for that many iterations, the gap has not halved or
    the objective has not fallen by STALL_DECREASE of itself (for a low-precision phase,
    whose certificate can stall above its tol, and whose gap, computed from rounded values,
    can dip by half now and then while nothing improves). With
    ``min_decrease`` > 0 (a bfloat16 phase, whose rounded values end its progress abruptly),
    it also stops once the objective fell by less than that fraction of itself since the last
    check, or once the step's Lipschitz estimate grew ROUNDING_L_JUMP-fold since then (the
    backtracking test failing on rounding noise), returning the estimate of that check."""
    loss, Y = problem.loss, problem.Y
    slack = 64 * torch.finfo(W.dtype).eps
    AW = problem.forward(W)
    Z, bz, AZ = W, b, AW
    t = 1.0
    cert = certificate(problem, W, b, AW)
    if problem.fit_bias:
        b = bz = cert.b
    it = 0
    converged = cert.gap <= tol
    extrapolate = isinstance(loss, SquaredLoss) and extrapolate_dual
    history: list[torch.Tensor] = []
    best_gap, best_at = cert.gap, 0
    best_primal, primal_at = cert.primal, 0
    last_primal, last_L = cert.primal, L
    bias = problem.fit_bias  # without one, b stays zero: no work on it
    while not converged and it < max_iter:
        it += 1
        fz = problem.smooth_value(AZ, bz)
        gW, gb = problem.smooth_grad(AZ, bz)
        L *= 0.9
        while True:
            W_new = problem.prox(torch.add(Z, gW, alpha=-1.0 / L), 1.0 / L)
            b_new = bz - gb / L if bias else bz
            AW_new = problem.forward(W_new)
            f_new = problem.smooth_value(AW_new, b_new)
            dW = W_new - Z
            quad = _dot(gW, dW) + 0.5 * L * _dot(dW, dW)
            if bias:
                db = b_new - bz
                quad += _dot(gb, db) + 0.5 * L * _dot(db, db)
            if f_new <= fz + quad + slack * abs(fz) or L > 1e30:
                break
            L *= 2.0
        # Restart when the momentum pointed uphill: <Z - W_new, W_new - W> > 0.
        step = W_new - W
        uphill = -_dot(dW, step)
        if bias:
            uphill += _dot(bz - b_new, b_new - b)
        if uphill > 0:
            t = 1.0
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_new
        Z = torch.add(W_new, step, alpha=beta)
        AZ = torch.add(AW_new, AW_new - AW, alpha=beta)
        if bias:
            bz = b_new + beta * (b_new - b)
        W, AW, b, t = W_new, AW_new, b_new, t_new
        if extrapolate:
            F = problem.outputs(AW)
            history.append(-loss.grad(F + b if bias else F, Y))
            del history[: -(EXTRAPOLATION_DEPTH + 1)]
        if it % check_every == 0 or it == max_iter:
            extra = _extrapolate(history) if extrapolate else None
            cert = certificate(problem, W, b, AW, extra)
            if callback is not None:
                callback(it, cert)
            converged = cert.gap <= tol
            if cert.gap <= 0.5 * best_gap:
                best_gap, best_at = cert.gap, it
            elif stall and it - best_at >= stall:
                break
            if cert.primal < best_primal - STALL_DECREASE * abs(best_primal):
                best_primal, primal_at = cert.primal, it
            elif stall and it - primal_at >= stall:
                break
            if min_decrease:
                if L > ROUNDING_L_JUMP * last_L:  # backtracking met rounding noise
                    L = last_L
                    break
                if last_primal - cert.primal < min_decrease * abs(cert.primal):
                    break
                last_primal, last_L = cert.primal, L
    if it % check_every and it != max_iter:
        cert = certificate(problem, W, b, AW)
        converged = cert.gap <= tol
    return FistaResult(W, cert.b, AW, cert, it, L, converged)


def _extrapolate(history: list[torch.Tensor]) -> torch.Tensor | None:
    """Anderson extrapolation of the last residuals (dual extrapolation, as in Celer).

    Finds the affine combination sum_k c_k r_k (sum c = 1) whose consecutive differences
    cancel best; for iterates that behave like a linear recursion it lands much nearer the
    limit than the last residual.
    """
    if len(history) < EXTRAPOLATION_DEPTH + 1:
        return None
    R = torch.stack([h.reshape(-1) for h in history])  # (K+1, n*c)
    U = R[1:] - R[:-1]
    gram = U @ U.T
    ones = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    try:
        z = torch.linalg.solve(
            gram + 1e-14 * gram.trace() * torch.eye(len(ones), dtype=gram.dtype), ones
        )
    except RuntimeError:
        return None
    c = z / z.sum()
    return (c @ R[1:]).reshape(history[0].shape)
