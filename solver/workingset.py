"""Working sets and precision phases around FISTA.

Most gate blocks are zero at the optimum. The driver solves the program restricted to a small
working set of gates, checks the full dual constraint (one adjoint product over all gates), adds
the gates that violate it most, and repeats until the *full* relative duality gap is below tol.
Low-precision inputs are solved in their dtype first and polished in float64, since a float32
residual cannot certify a gap much below 1e-5 when lam is small. In float64, when the penalty
is smooth on nonzero blocks (group Frobenius, or one output), every first-order round is
followed by Newton-CG on the active blocks (``newton``): first-order rounds find the support,
Newton finishes on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fista import fista
from .newton import applies, newton_polish
from .problem import Certificate, Problem, certificate

LOW_PRECISION_TOL = 1e-4
# With the Newton polish to finish in float64, the low-precision phase only has to find the
# support: measured on digits (even vs odd, 128 gates, lam = 0.01 lam_max), stopping float32 at
# 1e-2 took 1430 iterations in all against 15426 when it had to reach 1e-4 first.
LOW_PRECISION_TOL_POLISHED = 1e-2
ROUND_ITERS = 100


@dataclass
class SolveResult:
    W: torch.Tensor  # (p, d, c) in the dtype of the last phase
    b: torch.Tensor
    cert: Certificate
    n_iter: int
    converged: bool
    L: float


def _select(
    cert: Certificate, W: torch.Tensor, ws: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """The next working set: the current one, every active gate, and every gate whose dual
    constraint is violated (or nearly so) at the current point.

    When lam is large few gates ever violate and the rounds stay cheap; when lam is small
    nearly all do, and the set becomes all gates at once rather than after many rounds.
    """
    keep = torch.linalg.vector_norm(W, dim=(1, 2)) > 0
    if ws is not None:
        keep[ws] = True
    keep |= cert.dual_norms > lam * (1 - 1e-3)
    if not bool(keep.any()):
        keep[torch.argmax(cert.dual_norms)] = True
    return torch.nonzero(keep).squeeze(1)


def solve(
    problem: Problem,
    W: torch.Tensor,
    b: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    working_set: bool = True,
    L: float = 1.0,
    callback: Callable[[int, Certificate], None] | None = None,
) -> SolveResult:
    phases = [(problem.Y.dtype, tol)]
    low = LOW_PRECISION_TOL_POLISHED if applies(problem) else LOW_PRECISION_TOL
    if problem.Y.dtype != torch.float64 and tol < low:
        phases = [(problem.Y.dtype, low), (torch.float64, tol)]
    total = 0
    cert = None
    converged = False
    for dtype, phase_tol in phases:
        prob = problem if dtype == problem.Y.dtype else problem.to(dtype)
        W, b = W.to(dtype), b.to(dtype)
        W, b, cert, used, converged, L = _solve_phase(
            prob, W, b, phase_tol, max_iter - total, working_set, L, callback, total
        )
        total += used
    assert cert is not None
    return SolveResult(W, b, cert, total, converged, L)


def _solve_phase(problem, W, b, tol, budget, working_set, L, callback, offset):
    p = problem.op.n_gates
    cert = certificate(problem, W, b, problem.op.matvec(W))
    b = cert.b
    if cert.gap <= tol or budget <= 0:
        return W, b, cert, 0, cert.gap <= tol, L
    # Newton polish between first-order rounds, in float64 only (in lower precision the
    # first-order phase stops at LOW_PRECISION_TOL anyway).
    polish = applies(problem) and problem.Y.dtype == torch.float64
    ws: torch.Tensor | None = None
    used, rounds, stuck = 0, 0, False
    while True:
        if not working_set or stuck:
            ws = torch.arange(p, device=W.device)
        else:
            ws = _select(cert, W, ws, problem.lam)
        full = ws.numel() == p
        sub = problem if full else problem.restrict(ws)
        base = offset + used
        cb = None if callback is None else (lambda k, c, base=base: callback(base + k, c))
        # A round gets a bounded number of iterations (doubling each round), so a working set
        # that is too small is found out and grown instead of being solved forever, and the
        # Newton polish gets its turn.
        cap = budget - used if full and not polish else min(budget - used, ROUND_ITERS << rounds)
        res = fista(sub, W[ws], b, tol=tol if full else 0.5 * tol, max_iter=cap, L=L, callback=cb)
        used += res.n_iter
        rounds += 1
        L = res.L
        W = torch.zeros_like(W)
        W[ws] = res.W
        cert = res.cert if full else certificate(problem, W, res.b, res.AW)
        b = cert.b
        if polish and cert.gap > tol and used < budget:
            pol = newton_polish(problem, W, b, budget=budget - used)
            used += pol.products
            # Kept even when the certificate got worse: blocks Newton dropped that the program
            # still wants come back in the next round, and starting that round from the
            # polished point was measured to need fewer iterations than starting from before.
            W = pol.W
            cert = certificate(problem, W, pol.b, problem.forward(W))
            b = cert.b
            if callback is not None:
                callback(offset + used, cert)
        if cert.gap <= tol or used >= budget or (full and not polish):
            return W, b, cert, used, cert.gap <= tol, L
        # Solved on the set, yet not certified on all gates, and nothing violates: finish on all.
        violators = cert.dual_norms > problem.lam * (1 - 1e-3)
        violators[ws] = False
        stuck = res.converged and not bool(violators.any())
