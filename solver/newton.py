"""Newton-CG polish on the active gates: the step that turns a good iterate into a certificate.

First-order methods find the active gates (the nonzero blocks) quickly but approach the optimum
on them slowly when the program is ill-conditioned, which is the rule at small lam: the
relative duality gap then lingers at 1e-3..1e-2 for thousands of iterations. On a fixed active
set S with every block nonzero the objective

    phi(W_S, b) = f(A_S W_S + 1 b^T) + lam * sum_{i in S} ||W_i||_F

is twice differentiable, so Newton's method converges fast there. Each Newton system
H d = -grad phi is solved inexactly by conjugate gradients; one Hessian product costs one
product with A_S and one with its adjoint, the price of a FISTA iteration.

H v = A_S^T (hess f) A_S v + lam * (v_i - u_i <u_i, v_i>) / ||W_i||   (u_i = W_i / ||W_i||)

The line search keeps the step honest: a block whose step points through zero (the new block
has a non-positive inner product with the old one) is set to zero, since it should leave the
active set, and the step is halved until phi decreases enough. Newton cannot add gates: the
caller alternates it with first-order rounds on the working set, which do.

Applies to the group-Frobenius penalty (any number of outputs) and to the nuclear penalty with
one output (where the two coincide); the nuclear norm of a rank-deficient block is not
differentiable, so multi-output nuclear programs stay first-order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .penalties import GroupFrobenius, GroupNuclear

ARMIJO = 1e-4


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


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


class _Local:
    """The second-order model of phi at (w, b) on the active blocks of ``sub``."""

    def __init__(self, sub, w: torch.Tensor, b: torch.Tensor):
        self.sub, self.w, self.b = sub, w, b
        loss, Y, lam = sub.loss, sub.Y, sub.lam
        self.F = sub.forward(w) + b
        self.value = float(loss.value(self.F, Y)) + lam * float(sub.penalty_value(w))
        self.nrm = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
        self.u = w / self.nrm
        gF = loss.grad(self.F, Y)
        self.gw = sub.op.rmatvec(gF) + lam * self.u
        self.gb = gF.sum(dim=0) if sub.fit_bias else torch.zeros_like(b)

    def hess(self, vw: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub = self.sub
        AV = sub.forward(vw) + (vb if sub.fit_bias else 0.0)
        HV = sub.loss.hess_vec(self.F, sub.Y, AV)
        proj = (self.u * vw).sum(dim=(1, 2), keepdim=True)
        hw = sub.op.rmatvec(HV) + sub.lam * (vw - self.u * proj) / self.nrm
        hb = HV.sum(dim=0) if sub.fit_bias else torch.zeros_like(vb)
        return hw, hb

    def objective(self, w: torch.Tensor, b: torch.Tensor) -> float:
        sub = self.sub
        F = sub.forward(w) + b
        return float(sub.loss.value(F, sub.Y)) + sub.lam * float(sub.penalty_value(w))


def newton_polish(
    problem,
    W: torch.Tensor,
    b: torch.Tensor,
    *,
    budget: int,
    max_steps: int = 20,
    cg_iters: int = 100,
) -> PolishResult:
    """Newton-CG steps on the nonzero blocks of W, at most ``budget`` operator products."""
    used, steps, dropped = 0, 0, 0
    while steps < max_steps and used < budget:
        S = torch.nonzero(torch.linalg.vector_norm(W, dim=(1, 2)) > 0).squeeze(1)
        if S.numel() == 0:
            break
        m = _Local(problem.restrict(S), W[S], b)
        used += 1
        dw, db, k = _cg(m.hess, m.gw, m.gb, min(cg_iters, budget - used))
        used += k
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
            fn = m.objective(wn, bn)
            if fn <= m.value + ARMIJO * t * slope:
                found = (wn, bn, fn, int(flips.sum()))
            t *= 0.5
        if found is None:
            break
        wn, b, fn, n_flips = found
        W = W.clone()
        W[S] = wn
        steps += 1
        dropped += n_flips
        # Stop when the decrease is at rounding level, or when blocks left the set: the
        # active set changed and the caller's first-order round should look again.
        if n_flips or m.value - fn <= 4 * torch.finfo(W.dtype).eps * abs(m.value):
            break
    return PolishResult(W, b, used, steps, dropped)


def _cg(hess, gw: torch.Tensor, gb: torch.Tensor, max_iter: int):
    """Conjugate gradients on H d = -g (truncated: relative residual min(0.1, sqrt|g|))."""
    xw, xb = torch.zeros_like(gw), torch.zeros_like(gb)
    rw, rb = -gw, -gb
    pw, pb = rw.clone(), rb.clone()
    rr = _inner(rw, rw) + _inner(rb, rb)
    target = min(0.1, math.sqrt(math.sqrt(rr))) * math.sqrt(rr)
    k = 0
    while k < max_iter and math.sqrt(rr) > target:
        hw, hb = hess(pw, pb)
        k += 1
        curv = _inner(pw, hw) + _inner(pb, hb)
        if curv <= 0:
            break
        alpha = rr / curv
        xw, xb = xw + alpha * pw, xb + alpha * pb
        rw, rb = rw - alpha * hw, rb - alpha * hb
        rr_new = _inner(rw, rw) + _inner(rb, rb)
        pw, pb = rw + (rr_new / rr) * pw, rb + (rr_new / rr) * pb
        rr = rr_new
    if k == 0 or (not bool(xw.any()) and not bool(xb.any())):
        return -gw, -gb, k
    return xw, xb, k
