"""Working sets and precision phases around FISTA.

Most gate blocks are zero at the optimum. The driver solves the program restricted to a small
working set of gates, checks the full dual constraint (one adjoint product over all gates), adds
the gates that violate it most, and repeats until the *full* relative duality gap is below tol.
Low-precision inputs are solved in their dtype first and polished in float64, since a float32
residual cannot certify a gap much below 1e-5 when lam is small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fista import fista
from .problem import Certificate, Problem, certificate

LOW_PRECISION_TOL = 1e-4


@dataclass
class SolveResult:
    W: torch.Tensor  # (p, d, c) in the dtype of the last phase
    b: torch.Tensor
    cert: Certificate
    n_iter: int
    converged: bool
    L: float


def _select(
    cert: Certificate, W: torch.Tensor, ws: torch.Tensor | None, lam: float, grow: int
) -> torch.Tensor:
    """The next working set: the current one, every active gate, and up to ``grow`` more.

    The first set takes the gates with the largest dual norms; later rounds add only gates
    whose dual constraint is violated (or nearly so), largest first.
    """
    keep = torch.linalg.vector_norm(W, dim=(1, 2)) > 0
    if ws is not None:
        keep[ws] = True
    scores = cert.dual_norms.masked_fill(keep, -float("inf"))
    top = torch.argsort(scores, descending=True)[:grow]
    if ws is not None:
        top = top[scores[top] > lam * (1 - 1e-3)]
    keep[top] = True
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
    if problem.Y.dtype != torch.float64 and tol < LOW_PRECISION_TOL:
        phases = [(problem.Y.dtype, LOW_PRECISION_TOL), (torch.float64, tol)]
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
    ws = None
    used = 0
    while True:
        grow = max(32, 0 if ws is None else ws.numel())
        new = _select(cert, W, ws, problem.lam, grow) if working_set else None
        if new is None or (ws is not None and new.numel() == ws.numel()):
            new = torch.arange(p, device=W.device)  # nothing to add: finish on all gates
        ws = new
        full = ws.numel() == p
        sub = problem if full else problem.restrict(ws)
        base = offset + used
        cb = None if callback is None else (lambda k, c, base=base: callback(base + k, c))
        res = fista(
            sub, W[ws], b, tol=tol if full else 0.5 * tol, max_iter=budget - used, L=L, callback=cb
        )
        used += res.n_iter
        L = res.L
        W = torch.zeros_like(W)
        W[ws] = res.W
        b = res.b
        cert = res.cert if full else certificate(problem, W, b, res.AW)
        b = cert.b
        if cert.gap <= tol or used >= budget or full:
            return W, b, cert, used, cert.gap <= tol, L
