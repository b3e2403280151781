"""Newton-CG polish on the active gates: the step that turns a good iterate into a certificate.

First-order methods find the active gates (the nonzero blocks) quickly but approach the optimum
on them slowly when the program is ill-conditioned, which is the rule at small lam: the
relative duality gap then lingers at 1e-3..1e-2 for thousands of iterations. On a fixed active
set S with every block nonzero the objective

    phi(W_S, b) = f(A_S W_S + 1 b^T) + lam * sum_{i in S} ||W_i||_F

is twice differentiable, so Newton's method converges fast there. Each Newton system
H d = -grad phi is solved by preconditioned conjugate gradients; one Hessian product costs one
product with A_S and one with its adjoint (in float32), the price of a FISTA iteration. The
preconditioner (``_RowPreconditioner``) is H itself up to a 1e-4 perturbation, inverted
through the n x n row space (Woodbury), so CG stops after one or two products whatever the
conditioning of X: a Newton step costs about a Cholesky factorisation of an n x n matrix (of
a row subsample for larger n, `capacitance_rows`) and a few products.

H v = A_S^T (hess f) A_S v + lam * (v_i - u_i <u_i, v_i>) / ||W_i||   (u_i = W_i / ||W_i||)

The line search keeps the step honest: a block whose step points through zero (the new block
has a non-positive inner product with the old one) is set to zero, since it should leave the
active set, and the step is halved until phi decreases enough. Newton cannot start a zero
block (phi is not differentiable there): when the certificate shows gates outside the set
violating their dual constraint, one proximal-gradient step on those blocks brings them in
(``_activate``, up to ``max_activations`` times a polish), and the caller's first-order rounds
on the working set do the rest.

Applies to the group-Frobenius penalty (any number of outputs) and to the nuclear penalty with
one output (where the two coincide); the nuclear norm of a rank-deficient block is not
differentiable, so multi-output nuclear programs stay first-order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .losses import SquaredLoss
from .penalties import GroupFrobenius, GroupNuclear
from .problem import Certificate, certificate

ARMIJO = 1e-4
# Rows of the preconditioner's capacitance matrix (times outputs; a Cholesky factor of this
# size squared is built at every Newton step): all rows while n c <= EXACT_ROWS, else a fixed
# random subset of SUBSAMPLE_ROWS / c rows (a subsampled Hessian: no longer exact, but a much
# cheaper build and solve). Measured on Lite0 Fashion features (d = 1280, 128 gates, one
# output, lam = 0.01 lam_max; seconds to a certificate; bench/README.md "Preconditioner
# size"): all rows win up to n = 2013 (n = 2000, two tasks: 4.2 and 3.3 s against 5.5 and 3.8
# with 1500 rows; n = 2013: 5.0 against 7.6) and lose from n = 2500 (7.2 and 5.1 against 5.4
# and 3.5; n = 3000: 11.8 and 6.7 against 6.9 and 4.8). At n = 10000, over three tasks,
# subsamples of 3000 rows took 65.6 s in all, 2000 rows 51.9, 1500 rows 49.2, 1000 rows 56.5.
EXACT_ROWS = 2250
SUBSAMPLE_ROWS = 1500
# Both were measured with d = 1280 features. A product with A costs in proportion to d and a
# factorisation to the cube of its size, so with fewer features both sizes shrink by
# (d / 1280)^(1/3): on digits (d = 64, n = 1347, 128 gates) all rows certified in 0.59 s, a
# 500-row subsample in 0.36 s (300 rows: 0.43 s, 800: 0.45 s).
FEATURES_MEASURED = 1280
# With several outputs, where fewer than a quarter of the rows fit in 3000 / c, CG stays plain:
# a smaller subsample, e.g. 300 of 1797 rows for 10 outputs, was measured to leave CG at its
# iteration cap; the subsample keeps at least a quarter of the rows for the same reason. One
# output is always preconditioned: on a synthetic gated program with n = 20000, d = 128, 512
# gates (2 threads, max_iter 2000), a 696-row subsample certified lam = 1e-2 in 118 s (gap
# 5.9e-7 after 1635 iterations) where plain CG stopped at 4.7e-6 after 126 s, and reached 3.1e-3
# against 1.3e-2 at lam = 1e-3 in the same 210 s.
MAX_CAPACITANCE = 3000
# When conjugate gradients hit their cap, the subsample misses too much of the Hessian, and
# the rows double for the next steps, up to this many rows x outputs (a float64 matrix of
# 134 MB). Measured on the synthetic one-output program of bench/gpu.py (n = 20000, d = 128,
# 512 gates, lam = 1e-3, 1 thread): the 698-row subsample hit the cap of 100 at every step
# and the fit was not certified in 2000 iterations; a fixed 3000 rows took 33-59 iterations
# per step at first and certified it (gap 6.0e-7) in 225 s; growing from 698 (to 1396, 2792,
# 4096) certified it to 1.5e-8 in 305 s (1206 iterations), and lam = 1e-2 to 8.2e-9 in 140 s
# (686 iterations, grown once). Digits and Lite0 Fashion binary tasks never hit the cap. With
# GROW_CG below: 8.3e-7 in 313 s (1080 iterations) at lam = 1e-3.
MAX_GROWN_ROWS = 4096
# ... and it grows once CG takes this many iterations (with all rows it takes one or two).
# Digits even vs odd (552 of 1347 rows, CG 10-25 per step): 12 certified in 174 iterations and
# 0.32 s CPU against 238 and 0.38 s with 20 (best of 7, alternating in one process; 0.41 and
# 0.42 s with torch.cholesky_solve); Lite0 tops vs rest (1500 of 10000 rows) 12.2-12.3 s
# against 11.7-12.4 (best and median of 3), digits 3 vs 8 (all rows) unchanged.
GROW_CG = 12
# The smallest relative residual asked of conjugate gradients: float32 products are accurate
# to about this, and a Newton step this accurate still gains five digits.
CG_FLOOR = 1e-5
# ... but no smaller than CG_SAFETY sqrt(tol / gap) when the caller knows the gap: one step at
# that accuracy should reach tol (`_cg_rtol`). Lite0 Fashion tops vs rest (1500 of 10000 rows):
# the last polish went from 7.2e-3 to 3.8e-7 in 16 + 7 + 19 CG iterations (3.75 s) with the
# default rule alone, to 6.7e-7 in 16 + 4 + 10 (3.05 s) with this.
CG_SAFETY = 0.3
# The preconditioner is H + (1 - KAPPA) E (see _RowPreconditioner); below 1 keeps it
# positive definite where H is nearly singular.
KAPPA = 0.9999
# A preconditioner built at an earlier Newton step on the same set is kept when a new one
# would cost more than this many operator products (digits: ~35, kept; Fashion Lite0
# features, d = 1280: ~5, rebuilt).
REUSE_RATIO = 10
# The capacitance matrix is built and factored in float32 (float64 when that factorisation
# fails): a preconditioner only has to be close, and CG's residual is measured with the real
# Hessian. Measured (1 thread, this CPU): Cholesky of 1347 rows 41 ms against 63 in float64,
# of 552 rows 2.7 against 8.7 ms; on Lite0 Fashion tops vs rest (1500 rows) every Newton step
# took the same number of CG iterations as with the float64 factor. Building it in float32
# too: digits even vs odd, 1104 rows, 34 ms against 53 for the whole preconditioner.
FACTOR_DTYPE = torch.float32


def _chol_solve(v: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 v by two triangular solves: half the time of torch.cholesky_solve with one
    right-hand side on this CPU (1 thread: 0.13 against 0.25 ms at 1104 rows, 0.18 against
    0.39 at 1347)."""
    return torch.linalg.solve_triangular(
        L.mT, torch.linalg.solve_triangular(L, v, upper=False), upper=True
    )


def _reuse_pays(sub, rows: int) -> bool:
    """Whether building the preconditioner on ``rows`` rows costs more than REUSE_RATIO
    operator products (flop counts: m^3 / 3 + 3 m^2 |S| c for the build, 4 n d |S| c for a
    product)."""
    if not preconditioned(sub):
        return False
    n, c = sub.Y.shape
    s = sub.op.n_gates
    d = sub.op.X.shape[1]
    m = rows * c
    return m**3 / 3 + 3 * m * m * s > REUSE_RATIO * 4 * n * d * s * c


def capacitance_rows(n: int, c: int, d: int = FEATURES_MEASURED) -> int:
    """Rows of the preconditioner (a subsampled Hessian beyond EXACT_ROWS) for n rows, c
    outputs, d features."""
    scale = min(1.0, d / FEATURES_MEASURED) ** (1 / 3)
    if n * c <= EXACT_ROWS * scale:
        return n
    quarter = -(-n // 4) if c > 1 else 1
    return min(n, max(1, int(SUBSAMPLE_ROWS * scale) // c, quarter))


def _precond_rows(problem) -> int:
    n, c = problem.Y.shape
    return capacitance_rows(n, c, problem.op.X.shape[1])


def _grown(rows: int, n: int, c: int) -> int:
    """The subsample after conjugate gradients took GROW_CG iterations or hit their cap: twice
    as many rows, at most n and MAX_GROWN_ROWS / c."""
    return max(rows, min(n, 2 * rows, MAX_GROWN_ROWS // c))


def preconditioned(problem) -> bool:
    """Whether conjugate gradients get the row-space preconditioner: a gated operator, and
    one output or at least a quarter of the rows in MAX_CAPACITANCE / c."""
    n, c = problem.Y.shape
    return hasattr(problem.op, "take_rows") and (c == 1 or 4 * (MAX_CAPACITANCE // c) >= n)


def applies(problem) -> bool:
    """Whether the polish applies to this program (a smooth penalty on nonzero blocks)."""
    pen = problem.penalty
    c = problem.Y.shape[1]
    return isinstance(pen, GroupFrobenius) or (isinstance(pen, GroupNuclear) and c == 1)


@dataclass
class PolishResult:
    W: torch.Tensor
    b: torch.Tensor
    products: int  # Hessian-vector and gradient products, each one A and one A^T
    steps: int
    dropped: int  # blocks set to zero by the line search
    cert: Certificate | None = None  # the certificate at W, when the polish computed it
    rows: int | None = None  # the preconditioner's rows at the end (grown when CG was slow)


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


class _Local:
    """The second-order model of phi at (w, b) on the active blocks of ``sub``.

    Value and gradient are computed in the program's dtype. Hessian products (and the
    preconditioner's products) run on ``fast``, the same restricted program in float32 when
    the program is float64: a Newton step only needs its direction to a relative accuracy of
    about 1e-5 to keep converging (linearly at that rate once it is that close), and a float32
    product costs half as much.
    """

    def __init__(self, sub, w: torch.Tensor, b: torch.Tensor, fast=None):
        self.sub, self.w, self.b = sub, w, b
        self.fast = sub if fast is None else fast
        loss, Y, lam = sub.loss, sub.Y, sub.lam
        self.F = sub.forward(w) + b
        self.value = float(loss.value(self.F, Y)) + lam * float(sub.penalty_value(w))
        self.nrm = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
        self.u = w / self.nrm
        gF = loss.grad(self.F, Y)
        self.gw = sub.op.rmatvec(gF) + lam * self.u
        self.gb = gF.sum(dim=0) if sub.fit_bias else torch.zeros_like(b)
        low = self.fast.Y.dtype
        self._F_low = self.F.to(low)

    def hess(self, vw: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fast, dtype = self.fast, vw.dtype
        AV = fast.forward(vw.to(fast.Y.dtype)) + (vb.to(fast.Y.dtype) if fast.fit_bias else 0.0)
        HV = fast.loss.hess_vec(self._F_low, fast.Y, AV)
        proj = (self.u * vw).sum(dim=(1, 2), keepdim=True)
        hw = fast.op.rmatvec(HV).to(dtype) + self.sub.lam * (vw - self.u * proj) / self.nrm
        hb = HV.sum(dim=0).to(dtype) if fast.fit_bias else torch.zeros_like(vb)
        return hw, hb

    def preconditioner(self, rows: int | None = None):
        """M^-1 for conjugate gradients on ``rows`` rows (None: `capacitance_rows`), or None
        when the operator offers no row model."""
        if not preconditioned(self.sub):
            return None
        try:
            return _RowPreconditioner(self, self.fast.op, rows)
        except _NotPositiveDefinite:
            return None

    def objective(self, w: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
        """phi at (w, b), and the forward value A_S w it was computed from."""
        sub = self.sub
        AW = sub.forward(w)
        value = float(sub.loss.value(AW + b, sub.Y)) + sub.lam * float(sub.penalty_value(w))
        return value, AW


def newton_polish(
    problem,
    W: torch.Tensor,
    b: torch.Tensor,
    *,
    budget: int,
    tol: float | None = None,
    low=None,
    max_steps: int = 20,
    cg_iters: int = 100,
    rows: int | None = None,
    gap: float | None = None,
    max_activations: int = 0,
) -> PolishResult:
    """Newton-CG steps on the nonzero blocks of W, at most ``budget`` operator products.

    With ``tol``, every step that dropped no block is followed by the full certificate (one
    adjoint product over all gates), and the polish stops as soon as the gap is below tol or
    a gate outside the active set violates its dual constraint: converging further on a set
    that lacks a gate the program wants would be wasted, and the caller's first-order round
    is what adds it. ``low``: the same program in float32, for the Hessian and preconditioner
    products (None: the program's own dtype). ``rows``: the preconditioner's row subsample
    (None: `capacitance_rows`); when conjugate gradients take GROW_CG iterations or hit
    ``cg_iters`` it doubles (`_grown`), and the result's ``rows`` is what the next polish of
    this program should use. ``gap``: the relative gap at W, when the caller knows it.
    """
    used, steps, dropped, activated = 0, 0, 0, 0
    reference = math.inf if gap is None else gap  # the gap an activation must have halved
    cert = None
    low = problem if low is None else low
    pc, pc_set = None, None
    n, c = problem.Y.shape
    if rows is None and preconditioned(problem):
        rows = _precond_rows(problem)
    while steps < max_steps and used < budget:
        S = torch.nonzero(torch.linalg.vector_norm(W, dim=(1, 2)) > 0).squeeze(1)
        if S.numel() == 0:
            break
        m = _Local(problem.restrict(S), W[S], b, low.restrict(S))
        used += 1
        # Rebuilt at every step (exact, CG stops after one or two products) unless the set is
        # unchanged and building costs more than REUSE_RATIO products: then the previous
        # step's, slightly stale, costs a few more (cheap) products instead.
        fresh = pc_set is None or not torch.equal(pc_set, S) or not _reuse_pays(m.sub, rows or n)
        if fresh:
            pc, pc_set = m.preconditioner(rows), S
        rtol = _cg_rtol(m.gw, m.gb, tol, gap)
        dw, db, k = _cg(m.hess, m.gw, m.gb, min(cg_iters, budget - used), pc, rtol)
        used += k
        if rows is not None and pc is not None and k >= min(cg_iters, GROW_CG):
            # A subsample that misses this much of the Hessian costs more in products than
            # a larger factorisation: grow it for the next step (and the next polish). A
            # kept preconditioner that did this badly is only stale: rebuild it, same rows.
            bigger = _grown(rows, n, c)
            if not fresh:
                pc_set = None
            elif bigger > rows:
                rows, pc_set = bigger, None
        slope = _inner(m.gw, dw) + _inner(m.gb, db)
        if k == 0 or slope >= 0:
            break
        t, found = 1.0, None
        while t > 1e-10 and found is None:
            wn = m.w + t * dw
            flips = (m.w * wn).sum(dim=(1, 2)) <= 0
            wn[flips] = 0
            bn = m.b + t * db
            used += 1
            fn, AWn = m.objective(wn, bn)
            if fn <= m.value + ARMIJO * t * slope:
                found = (wn, bn, fn, AWn, int(flips.sum()))
            t *= 0.5
        if found is None:
            break
        wn, b, fn, AWn, n_flips = found
        W = W.clone()
        W[S] = wn
        steps += 1
        dropped += n_flips
        cert, gap = None, None
        if tol is not None and not n_flips:
            cert = certificate(problem, W, b, AWn)
            used += 1
            gap = cert.gap
            if cert.gap <= tol:
                break
            if violated_outside(cert, S, problem.lam):
                # Only while the polish converges: on a set it cannot settle (blocks dropped
                # and brought back step after step) first-order rounds are cheaper.
                if activated >= max_activations or not cert.gap <= 0.5 * reference:
                    break
                reference = cert.gap
                b = cert.b  # the bias the violators' gradients were computed with
                W = _activate(problem, W, b, cert, S, AWn)
                activated += 1
                used += 1
                cert, gap = None, None
                continue
        # Stop when the decrease is at rounding level. Blocks that left the set stay out for
        # the next steps; if the program wants one back, the caller's first-order round
        # finds it violating the dual constraint and adds it again.
        if not n_flips and m.value - fn <= 4 * torch.finfo(W.dtype).eps * abs(m.value):
            break
    return PolishResult(W, b, used, steps, dropped, cert, rows)


class _NotPositiveDefinite(Exception):
    pass


class _RowPreconditioner:
    """M^-1 for conjugate gradients on the active blocks, by the Woodbury identity.

    The Hessian in W on the active set S is H = R + B^T B: R = blockdiag_i lam / ||W_i||
    (I - u_i u_i^T), the penalty's curvature, which is zero along u_i = W_i / ||W_i||; and the
    data term B^T B, with B's rows (sample r, output k) = (h_r^(1/2) A_r)_k / sqrt(n), h_r the
    loss's c x c Hessian at row r (the identity for the squared loss, diag(p) - p p^T for
    cross-entropy). With eps_i the data curvature along u_i, R~ = R + sum_i eps_i u_i u_i^T is
    block diagonal and trivially invertible, and

        M = R~ - KAPPA E + B^T B = H + (1 - KAPPA) E,   E = sum_i eps_i u_i u_i^T,

    is inverted as R~ plus a low-rank term [B^T, U] diag(I, -KAPPA eps) [B^T, U]^T: a
    capacitance matrix C = I + B R~^-1 B^T (n c x n c) and the Schur complement of the U part
    (|S| x |S|), both by Cholesky. An output bias is eliminated exactly (its c x c Schur
    complement, from c extra products). With all rows, M^-1 H = I up to about 1 - KAPPA
    (measured on digits: relative error 4e-4, against 2e-2 at KAPPA = 0.99, for an H of
    condition number 4e4), so CG converges in one or two products. Beyond EXACT_ROWS rows x
    outputs, B uses a fixed random subset of m rows (`capacitance_rows`, or ``rows`` once the
    polish has grown it; divided by sqrt(m)), a subsampled Hessian. Building costs
    O(m^2 (|S| c + m c^3)); each application one product with A and one with A^T on those rows.
    """

    def __init__(self, local: _Local, fast_op, rows: int | None = None):
        sub, W, nrm = local.sub, local.w, local.nrm
        op, loss, lam = sub.op, sub.loss, sub.lam
        c = sub.Y.shape[1]
        s, d = W.shape[0], W.shape[1]
        m = _precond_rows(sub) if rows is None else min(rows, sub.Y.shape[0])
        J = op.sample_rows(m)
        opJ = op.take_rows(J)
        self.fastJ = fast_op.take_rows(J)
        MJ = opJ.float_masks()  # (m, s)
        # Square roots of the per-row output Hessians (times n), None for the identity.
        self.Hh = None if isinstance(loss, SquaredLoss) else _row_hessian_roots(local.F[J])
        nr = nrm.reshape(-1)
        self.U = W / nrm  # (s, d, c)
        self.alpha = (nr / lam).reshape(-1, 1, 1)  # R~^-1 = alpha (I - u u^T) + u u^T / eps
        XU = opJ.X @ self.U.permute(1, 0, 2).reshape(d, s * c)
        PU = XU.view(m, s, c) * MJ.unsqueeze(-1)  # (m, s, c): a_r . u_i, per output
        if self.Hh is not None:
            PU = torch.einsum("rkj,rij->rik", self.Hh, PU)
        Pm = PU.permute(0, 2, 1).reshape(m * c, s) / math.sqrt(m)  # B u_i, rows (r, k)
        eps = Pm.square().sum(dim=0)  # data curvature along u_i
        eps = torch.maximum(eps, lam / nr * 1e-3)  # R~ invertible where the data is flat
        self.inv_eps = (1.0 / eps).reshape(-1, 1, 1)
        beta = nr / lam - 1.0 / eps
        # B R~^-1 B^T: sum_i alpha_i m_ri m_r'i x_r.x_r' (h_r^1/2 h_r'^1/2)_kk' minus the
        # u_i parts, sum_i beta_i (B u_i)(B u_i)^T.
        # C is built and factored in FACTOR_DTYPE, again in the program's dtype if that fails.
        for dtype in dict.fromkeys([FACTOR_DTYPE, W.dtype]):
            op_rows = self.fastJ if dtype == self.fastJ.X.dtype else opJ
            MJd, Pd = MJ.to(dtype), Pm.to(dtype)
            S = op_rows.row_gram().to(dtype) * ((MJd * (nr / lam).to(dtype)) @ MJd.T) / m
            if self.Hh is not None:
                Hh = self.Hh.to(dtype)
                C = torch.einsum("rs,rkj,sjl->rksl", S, Hh, Hh).reshape(m * c, m * c)
            elif c > 1:
                C = torch.kron(S, torch.eye(c, dtype=dtype, device=W.device))
            else:
                C = S
            C.addmm_(Pd * beta.to(dtype), Pd.T, alpha=-1.0)
            C.diagonal().add_(1.0)
            self.L, info = torch.linalg.cholesky_ex(C)
            if int(info) == 0:
                break
        if int(info) != 0:  # C >= I in exact arithmetic; rounding broke it: no preconditioner
            raise _NotPositiveDefinite
        self.K12 = Pm / eps  # (m c, s): B R~^-1 u_i
        self.CK12 = self._csolve(self.K12)
        gram = self.K12.T @ self.CK12
        slack = 1.0 / KAPPA - 1.0
        while True:  # -(Schur complement); nearly singular: leave more of E in M
            self.Ls, info = torch.linalg.cholesky_ex(gram + torch.diag(slack / eps))
            if int(info) == 0:
                break
            if slack >= 1.0:
                raise _NotPositiveDefinite
            slack *= 10.0
        self.m, self.c, self.root_m = m, c, math.sqrt(m)
        self.bias = _BiasElimination(local, self._apply_w, J, opJ) if sub.fit_bias else None

    def _csolve(self, v: torch.Tensor) -> torch.Tensor:
        return _chol_solve(v.to(self.L.dtype), self.L).to(v.dtype)

    def _rinv(self, v: torch.Tensor) -> torch.Tensor:
        proj = (self.U * v).sum(dim=(1, 2), keepdim=True) * self.U
        return self.alpha * (v - proj) + self.inv_eps * proj

    def _rows(self, Z: torch.Tensor) -> torch.Tensor:
        """(m, c) -> h_r^(1/2) z_r / sqrt(m), row by row."""
        if self.Hh is not None:
            Z = torch.einsum("rkj,rj->rk", self.Hh, Z)
        return Z / self.root_m

    def _apply_w(self, vw: torch.Tensor) -> torch.Tensor:
        low = self.fastJ.X.dtype
        y = self._rinv(vw)
        q1 = self._rows(self.fastJ.matvec(y.to(low)).to(y.dtype)).reshape(-1, 1)  # B y
        q2 = (self.U * y).sum(dim=(1, 2)).unsqueeze(1)  # U^T y
        a = self._csolve(q1)
        z2 = -_chol_solve(q2 - self.K12.T @ a, self.Ls)
        z1 = self._rows((a - self.CK12 @ z2).view(self.m, self.c))
        back = self.fastJ.rmatvec(z1.to(low)).to(y.dtype) + self.U * z2.view(-1, 1, 1)
        return y - self._rinv(back)

    def __call__(self, vw: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bias is None:
            return self._apply_w(vw), vb
        return self.bias(vw, vb)


def _row_hessian_roots(F: torch.Tensor) -> torch.Tensor:
    """(m, c, c) symmetric square roots of diag(p_r) - p_r p_r^T (softmax of each row)."""
    P = torch.softmax(F, dim=1)
    H = torch.diag_embed(P) - P.unsqueeze(2) * P.unsqueeze(1)
    vals, vecs = torch.linalg.eigh(H)
    return (vecs * vals.clamp_min(0.0).sqrt().unsqueeze(1)) @ vecs.transpose(1, 2)


class _BiasElimination:
    """Adds the output bias to a preconditioner for W by block elimination: with
    Z = M_ww^-1 H_wb (c applications, at build) and S_b = H_bb - H_bw Z (c x c),
    x_b = S_b^-1 (v_b - Z^T v_w) and x_w = M_ww^-1 v_w - Z x_b.

    H_wb and H_bb come from the same rows as M_ww (`rows`, `op_rows`), so that with a row
    subsample S_b is the Schur complement of one subsampled Hessian and stays positive
    semidefinite; mixing all-row H_wb with a subsampled M_ww made S_b indefinite, and CG then
    hit its cap at every step (digits regressor with intercept, 552 of 1797 rows: uncertified
    after 20000 iterations, against 1.6 s with all rows).
    """

    def __init__(self, local: _Local, apply_w, rows: torch.Tensor, op_rows):
        sub = local.sub
        c = sub.Y.shape[1]
        F, Y, op = local.F, sub.Y, sub.op
        if rows.numel() < F.shape[0]:
            F, Y, op = F[rows], Y[rows], op_rows
        eye = torch.eye(c, dtype=F.dtype, device=F.device)
        cols_w, cols_b = [], []
        for k in range(c):  # H e_b(k): the bias direction's curvature, on W and on b
            HV = sub.loss.hess_vec(F, Y, eye[k].expand_as(F))
            cols_w.append(op.rmatvec(HV))
            cols_b.append(HV.sum(dim=0))
        self.Z = torch.stack([apply_w(col) for col in cols_w])  # (c, s, d, c)
        Hwb = torch.stack(cols_w)
        Hbb = torch.stack(cols_b, dim=1)
        Sb = Hbb - torch.einsum("ksdc,jsdc->kj", Hwb, self.Z)
        # Singular along 1 for the softmax (a constant added to every output changes nothing);
        # invert on its positive part only, so the preconditioner stays positive semidefinite.
        vals, vecs = torch.linalg.eigh(0.5 * (Sb + Sb.T))
        keep = vals > 1e-10 * float(vals.abs().max())
        inv = torch.where(keep, 1.0 / torch.where(keep, vals, 1.0), 0.0)
        self.Sb_inv = (vecs * inv) @ vecs.T
        self.apply_w = apply_w

    def __call__(self, vw: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.apply_w(vw)
        xb = self.Sb_inv @ (vb - torch.einsum("ksdc,sdc->k", self.Z, vw))
        return t - torch.einsum("ksdc,k->sdc", self.Z, xb), xb


def _identity(vw: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return vw, vb


def _violators_outside(cert: Certificate, active: torch.Tensor, lam: float) -> torch.Tensor:
    """Mask of the gates outside ``active`` (indices or a mask) that violate their dual
    constraint."""
    outside = cert.dual_norms > lam * (1 + 1e-6)
    outside[active] = False
    return outside


def violated_outside(cert: Certificate, active: torch.Tensor, lam: float) -> bool:
    """Whether a gate outside ``active`` (indices or a mask) violates its dual constraint."""
    return bool(_violators_outside(cert, active, lam).any())


def _activate(problem, W, b, cert: Certificate, S: torch.Tensor, AW: torch.Tensor) -> torch.Tensor:
    """W with the gates outside S that violate their dual constraint brought in by one
    proximal-gradient step on those blocks, its length minimising the loss's quadratic model
    along it (one product with A and one with its adjoint, on the violating gates only).

    For a zero block the prox-gradient direction is -(1 - lam / ||g_v||) g_v, g_v the block's
    gradient (its norm is the dual-constraint norm, above lam). Newton then turns and scales
    the new blocks with the rest; it cannot start them itself, as phi is not differentiable
    at a zero block.
    """
    lam = problem.lam
    V = torch.nonzero(_violators_outside(cert, S, lam)).squeeze(1)
    sub = problem.restrict(V)
    G = -sub.op.rmatvec(cert.theta)  # the violators' gradient blocks
    scale = 1.0 - lam / cert.dual_norms[V]
    D = -scale.view(-1, 1, 1) * G
    a = sub.forward(D)
    F = problem.outputs(AW) + b
    curv = _inner(a, problem.loss.hess_vec(F, problem.Y, a))
    slope = _inner(G, D) + lam * float(torch.linalg.vector_norm(D, dim=(1, 2)).sum())
    W = W.clone()
    if curv > 0 and slope < 0:
        W[V] = (-slope / curv) * D
    return W


def _cg_rtol(gw: torch.Tensor, gb: torch.Tensor, tol: float | None, gap: float | None) -> float:
    """CG's relative residual: min(0.1, sqrt|g|) (superlinear convergence), loosened to
    CG_SAFETY sqrt(tol / gap) when that is enough to reach tol in one step. Near the
    optimum the gap falls with the square of the gradient, and a step solved to a relative
    residual r leaves a gradient about r times the current one."""
    g = math.sqrt(_inner(gw, gw) + _inner(gb, gb))
    rtol = max(min(0.1, math.sqrt(g)), CG_FLOOR)
    if tol is not None and gap is not None and gap > tol:
        rtol = max(rtol, min(0.1, CG_SAFETY * math.sqrt(tol / gap)))
    return rtol


def _cg(hess, gw: torch.Tensor, gb: torch.Tensor, max_iter: int, precond=None, rtol=None):
    """Preconditioned conjugate gradients on H d = -g, truncated at a relative residual of
    ``rtol`` (default `_cg_rtol`'s, min(0.1, sqrt|g|); the residual in the plain norm)."""
    if precond is None:
        precond = _identity
    xw, xb = torch.zeros_like(gw), torch.zeros_like(gb)
    rw, rb = -gw, -gb
    zw, zb = precond(rw, rb)
    pw, pb = zw.clone(), zb.clone()
    rr = _inner(rw, rw) + _inner(rb, rb)
    rz = _inner(rw, zw) + _inner(rb, zb)
    if rtol is None:
        rtol = _cg_rtol(gw, gb, None, None)
    target = rtol * math.sqrt(rr)
    k = 0
    while k < max_iter and math.sqrt(rr) > target and rz > 0:
        hw, hb = hess(pw, pb)
        k += 1
        curv = _inner(pw, hw) + _inner(pb, hb)
        if curv <= 0:
            break
        alpha = rz / curv
        xw, xb = xw + alpha * pw, xb + alpha * pb
        rw, rb = rw - alpha * hw, rb - alpha * hb
        rr = _inner(rw, rw) + _inner(rb, rb)
        zw, zb = precond(rw, rb)
        rz_new = _inner(rw, zw) + _inner(rb, zb)
        pw, pb = zw + (rz_new / rz) * pw, zb + (rz_new / rz) * pb
        rz = rz_new
    if k == 0 or (not bool(xw.any()) and not bool(xb.any())):
        return -gw, -gb, k
    return xw, xb, k
