"""Working sets and precision phases around FISTA.

Most gate blocks are zero at the optimum. The driver solves the program restricted to a small
working set of gates, checks the full dual constraint (one adjoint product over all gates), adds
the gates that violate it most, and repeats until the *full* relative duality gap is below tol.
Low-precision inputs are solved in their dtype first and polished in float64, since a float32
residual cannot certify a gap much below 1e-5 when lam is small.

When the penalty is smooth on nonzero blocks (group Frobenius, or one output), Newton-CG on the
active blocks (``newton``) finishes in float64: first-order rounds find the support, Newton
converges on it and drops blocks that leave it, short first-order rounds (in float32) bring in
gates it cannot add. With the row-space preconditioner a Newton step costs a few products, so
the first-order phase stops early (a gap of 0.3, where the support is roughly right); float64
inputs get the same float32 first phase. A polish that finds gates outside its set violating
the dual constraint brings them in with one proximal-gradient step and goes on (up to
ACTIVATIONS times), so the first-order rounds between polishes are rarely needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fista import fista
from .newton import applies, newton_polish, preconditioned, violated_outside
from .operator import GatedOperator, bfloat16_speedup
from .problem import Certificate, Problem, certificate

LOW_PRECISION_TOL = 1e-4
# A float32 certificate can stall above its tol at small lam, and the float64 phase then got
# whatever was left of max_iter, possibly nothing (45 Lite0 embeddings, 3 classes, nuclear,
# lam = 0.01: float32 reported 2.4e-4 for all 5000 iterations, 2.3e-3 recomputed in float64).
# So the low-precision phase also ends once its gap has not halved in this many iterations.
# Measured on those embeddings, seeds 0-3: 500 certified all four (3000-3760 iterations in all);
# 300 handed over too early (two ended at 2.7e-6 and 7.5e-6); a fixed half of max_iter for
# float32 instead certified three, the fourth at 1.0e-6. It also ends once its objective has
# not fallen by fista.STALL_DECREASE of itself in this many iterations, and, with working
# sets, at the first round that stalls: Lite0 Fashion (1000 images, 10 classes, 64 gates,
# lam = 0.04 lam_max) went on with rounds of 500 stalled iterations for 1470 iterations after its
# objective had settled at float32's resolution; ending there took the fit from 117 to 88 s
# (3950 -> 3050 iterations, float64's share 900 -> 970).
LOW_PRECISION_STALL = 500
# With the Newton polish to finish in float64, the low-precision phase only has to find the
# support: measured on digits (even vs odd, 128 gates, lam = 0.01 lam_max), stopping float32 at
# 1e-2 took 1430 iterations in all against 15426 when it had to reach 1e-4 first.
LOW_PRECISION_TOL_POLISHED = 1e-2
# With the preconditioned Newton (newton.preconditioned), measured on Fashion T-shirt vs shirt
# (Lite0, 128 gates, lam = 0.01 lam_max): handing over at 0.2 certified in 8.5 s, at 0.3 in
# 9.6 s, at 0.05 in 14.2 s, at 0.01 in 21.8 s (bench/README.md). Once the polish could bring
# gates in itself (ACTIVATIONS), 0.3 did better than 0.2 on all four benchmark tasks (flops,
# measured before ACTIVATIONS' convergence rule: tops vs rest 715 -> 643 GFLOP, T-shirt
# 189 -> 169, 3 vs 8 1.46 -> 0.99, even vs odd 13.6 -> 11.7); 0.5 did better still on the
# Fashion tasks (565, 123) but its Newton phase on digits dropped blocks a few per step for
# 14 steps (Cholesky 2.9 -> 5.2 GFLOP).
LOW_PRECISION_TOL_NEWTON = 3e-1
ROUND_ITERS = 100
# First-order rounds between Newton polishes (doubled each time the gap fails to halve).
POLISHED_ROUND_ITERS = 30
# Before a polish, blocks whose dual-constraint norm is under PRUNE * lam are set to zero.
PRUNE = 0.9
# The first polish of the float64 phase, when it starts above this gap, runs in float32 until
# its certificate is below FAST_POLISH_GAP_END (or a gate outside its set violates), then goes
# on in float64.
FAST_POLISH_GAP = 1e-2
FAST_POLISH_GAP_END = 1e-3
# A polish that finds a gate outside its set violating brings the violators in with one
# proximal-gradient step (newton._activate) and goes on, at most this many times; after
# that the first-order round between polishes does it. Before, every such stop cost a round
# of POLISHED_ROUND_ITERS iterations. Measured (operator and Cholesky flops of a fit, one
# thread; bench/README.md "Newton brings the gates in"), with the hand-over at 0.3: Lite0
# Fashion tops vs rest 862 -> 643 GFLOP, T-shirt vs shirt 218 -> 203 (Cholesky 38 -> 48),
# digits 3 vs 8 1.82 -> 0.99, even vs odd 13.7 -> 11.7 (Cholesky 1.25 -> 2.89). Only while
# the polish converges (its gap halved since the polish began or the last activation): on the
# issue's synthetic program (n 20000, d 128, 512 gates, lam 1e-3) the float32 polish otherwise
# churned for 20 steps, dropping blocks and bringing them back (1135 products; the fit 1882
# iterations, 422 s, against 1186 and 260 s); with the rule it takes the path it took before.
ACTIVATIONS = 3
# Programs that stay first-order (several outputs with the nuclear penalty) start with products
# in bfloat16 on CPUs where those are at least BF16_MIN_SPEEDUP times faster than float32
# (`operator.bfloat16_speedup`), when one product costs at least BF16_MIN_FLOPS: all gates,
# until a gap of BF16_TOL or until the objective falls by less than BF16_MIN_DECREASE of itself
# in 10 iterations (rounded values end its progress abruptly: Lite0 Fashion, 10 classes, 32
# gates, lam = 0.01 lam_max fell by 5e-3 per 10 iterations, then 5e-5 from one check to the
# next). The float32 and float64 phases go on from there to the certificate. On that program
# an iteration took 0.11 s against 0.22 s in float32 (1 thread, AVX512-BF16), with the same
# objectives to 1e-4 relative for 60 iterations (bench/README.md "bfloat16 start").
BF16_TOL = 1e-2
BF16_MIN_DECREASE = 1e-3
BF16_MIN_FLOPS = 1e9
BF16_MIN_SPEEDUP = 1.5


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
    low = LOW_PRECISION_TOL
    if applies(problem):
        low = LOW_PRECISION_TOL_NEWTON if preconditioned(problem) else LOW_PRECISION_TOL_POLISHED
    if problem.Y.dtype != torch.float64 and tol < low:
        phases = [(problem.Y.dtype, low), (torch.float64, tol)]
    elif applies(problem) and tol < low:
        # float64 input: Newton finishes in float64 whatever found the support, and float32
        # products find it at half the cost.
        phases = [(torch.float32, low), (torch.float64, tol)]
    total = 0
    cert = None
    converged = False
    start = _bfloat16_start(problem) if tol < BF16_TOL else None
    if start is not None:
        out = W.dtype
        W, b, cert, total, converged, L = _solve_phase(
            start,
            W.float(),
            b.float(),
            BF16_TOL,
            max_iter,
            False,
            L,
            callback,
            0,
            min_decrease=BF16_MIN_DECREASE,
        )
        W, b = W.to(out), b.to(out)
    low_problem = None  # the first phase's program, reused for float32 work in the second
    for k, (dtype, phase_tol) in enumerate(phases):
        prob = problem if dtype == problem.Y.dtype else problem.to(dtype)
        W, b = W.to(dtype), b.to(dtype)
        stall = LOW_PRECISION_STALL if k < len(phases) - 1 else 0
        W, b, cert, used, converged, L = _solve_phase(
            prob,
            W,
            b,
            phase_tol,
            max_iter - total,
            working_set,
            L,
            callback,
            total,
            low_problem,
            stall,
        )
        total += used
        low_problem = prob
    assert cert is not None
    return SolveResult(W, b, cert, total, converged, L)


def _bfloat16_start(problem: Problem) -> Problem | None:
    """The program with its products in bfloat16 (float32 values) when a bfloat16 first phase
    pays (see BF16_TOL), else None."""
    op = problem.op
    if applies(problem) or not isinstance(op, GatedOperator) or op.compute_dtype is not None:
        return None
    if op.X.device.type != "cpu":
        return None
    n, d = op.X.shape
    if 2 * n * d * op.n_gates * problem.Y.shape[1] < BF16_MIN_FLOPS:
        return None
    if bfloat16_speedup() < BF16_MIN_SPEEDUP:
        return None
    return Problem(
        op.computing_in(torch.bfloat16),
        problem.Y.float(),
        problem.loss,
        problem.penalty,
        problem.lam,
        problem.fit_bias,
    )


def _polish(problem, W, b, cert, tol, budget, callback, at, fast, rows=None, start=False):
    # Blocks whose dual-constraint norm is well below lam are zero at the optimum unless the
    # point is far off: start Newton without them (measured on Fashion T-shirt vs shirt at a gap
    # of 0.09: every block under 0.94 lam ended at zero). A wrong guess costs one first-order
    # round, which finds the block violating and brings it back.
    W = torch.where((cert.dual_norms < PRUNE * problem.lam).view(-1, 1, 1), 0.0, W)
    used = 0
    if start and fast is not None and cert.gap > FAST_POLISH_GAP:
        # The first polish, on the low-precision phase's point: far from the optimum a float32
        # point is as good a start as a float64 one, and every gradient, line-search value and
        # certificate costs half as much.
        low = newton_polish(
            fast,
            W.to(fast.Y.dtype),
            b.to(fast.Y.dtype),
            budget=budget,
            tol=FAST_POLISH_GAP_END,
            rows=rows,
            gap=cert.gap,
            max_activations=ACTIVATIONS,
        )
        used, rows = low.products + 1, low.rows
        W = low.W.to(W.dtype)
        cert = certificate(problem, W, low.b.to(W.dtype), problem.forward(W))
        b = cert.b
        active = torch.linalg.vector_norm(W, dim=(1, 2)) > 0
        if (
            cert.gap <= tol
            or cert.gap > FAST_POLISH_GAP
            or violated_outside(cert, active, problem.lam)
        ):
            if callback is not None:
                callback(at + used, cert)
            return W, b, cert, used, rows
    pol = newton_polish(
        problem,
        W,
        b,
        budget=budget - used,
        tol=tol,
        low=fast,
        rows=rows,
        gap=cert.gap,
        max_activations=ACTIVATIONS,
    )
    cert = pol.cert or certificate(problem, pol.W, pol.b, problem.forward(pol.W))
    used += pol.products
    if callback is not None:
        callback(at + used, cert)
    return pol.W, cert.b, cert, used, pol.rows


def _solve_phase(
    problem,
    W,
    b,
    tol,
    budget,
    working_set,
    L,
    callback,
    offset,
    low=None,
    stall=0,
    min_decrease=0.0,
):
    """One precision phase. ``low``: the same program in float32 (the previous phase's), for
    the Newton products and the first-order rounds between polishes; None: this dtype.
    ``stall``: FISTA's stall window (LOW_PRECISION_STALL in a phase that hands over);
    ``min_decrease``: FISTA's (the bfloat16 phase's)."""
    p = problem.op.n_gates
    cert = certificate(problem, W, b, problem.op.matvec(W))
    b = cert.b
    if cert.gap <= tol or budget <= 0:
        return W, b, cert, 0, cert.gap <= tol, L
    # Newton polish between first-order rounds, in float64 only (in lower precision the
    # first-order phase stops at LOW_PRECISION_TOL anyway).
    polish = applies(problem) and problem.Y.dtype == torch.float64
    ws: torch.Tensor | None = None
    used, rounds, stuck, grow = 0, 0, False, 0
    fast = low if polish and low is not None and low.Y.dtype == torch.float32 else None
    rows = None  # the Newton preconditioner's row subsample, grown by polishes that need it
    if polish and bool(W.any()):
        # A point from the low-precision phase already has its support: polish it first.
        W, b, cert, used, rows = _polish(
            problem, W, b, cert, tol, budget, callback, offset, fast, start=True
        )
        if cert.gap <= tol:
            return W, b, cert, used, True, L
        rounds = 1
    while True:
        if not working_set or stuck:
            ws = torch.arange(p, device=W.device)
        else:
            ws = _select(cert, W, ws, problem.lam)
        full = ws.numel() == p
        # Between polishes a round only brings gates in; float32 (``fast``) does that at half
        # the cost, and the certificate after it is computed in float64.
        program = problem if fast is None else fast
        sub = program if full else program.restrict(ws)
        base = offset + used
        cb = None if callback is None else (lambda k, c, base=base: callback(base + k, c))
        # A round gets a bounded number of iterations, so a working set that is too small is
        # found out and grown instead of being solved forever, and the Newton polish gets its
        # turn. Before the first polish the rounds double; after it, a first-order round only
        # has to bring in the gates Newton cannot add, so it stays short unless the gap stalls.
        if full and not polish:
            cap = budget - used
        elif polish and rounds:
            cap = min(budget - used, POLISHED_ROUND_ITERS << grow)
        else:
            cap = min(budget - used, ROUND_ITERS << rounds)
        before = cert.gap
        if fast is None:
            res = fista(
                sub,
                W[ws],
                b,
                tol=tol if full else 0.5 * tol,
                max_iter=cap,
                L=L,
                callback=cb,
                stall=stall,
                min_decrease=min_decrease,
            )
        else:
            res = fista(sub, W[ws].float(), b.float(), tol=0.0, max_iter=cap, L=L, callback=None)
        W = torch.zeros_like(W)
        W[ws] = res.W.to(W.dtype)
        if fast is None:
            cert = res.cert if full else certificate(problem, W, res.b, res.AW)
        else:
            cert = certificate(problem, W, res.b.to(W.dtype), problem.forward(W))
        used += res.n_iter
        rounds += 1
        L = res.L
        b = cert.b
        if polish and cert.gap > tol and used < budget:
            # Kept even when the certificate got worse: blocks Newton dropped that the program
            # still wants come back in the next round, and starting that round from the
            # polished point was measured to need fewer iterations than starting from before.
            W, b, cert, products, rows = _polish(
                problem, W, b, cert, tol, budget - used, callback, offset + used, fast, rows
            )
            used += products
            grow += cert.gap > 0.5 * before
        # A low-precision round that stalled ends the phase: its precision is spent, and
        # further rounds on the working set only wander at rounding level.
        stalled = bool(stall) and fast is None and not res.converged and res.n_iter < cap
        if cert.gap <= tol or used >= budget or (full and not polish) or stalled:
            return W, b, cert, used, cert.gap <= tol, L
        # Solved on the set, yet not certified on all gates, and nothing violates: finish on all.
        violators = cert.dual_norms > problem.lam * (1 - 1e-3)
        violators[ws] = False
        stuck = res.converged and not bool(violators.any())
