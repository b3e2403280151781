"""The convex CNN head's linear map: gates act on the patches of a feature map.

For inputs X (n, C, H, W), kernel k, stride s and padding q, patch b of sample i is column b of
``unfold(X_i, k, s, q)`` (order channel, ky, kx, as in a Conv2d weight ``.view(out, -1)``), with a
constant 1 appended when an intercept is fitted (the conv bias): h = C k^2 [+1] numbers, B
positions. A gate is a conv filter g_j (C, k, k) with offset g0_j; its masks are

    D[i, j, b] = 1[conv2d(X_i, g_j)_b + g0_j >= 0]         (bool, (n, p, B))

and the operator on weights W (p, h, c), one (h, c) block per gate, is the pooled gated conv

    A(W)_i = (1/B) sum_j sum_b D[i, j, b] x_{i,b}^T W_j     (n, c).

Both A and its adjoint go through the masked, pooled patches phi[i, j] = (1/B) sum_b D[i, j, b]
x_{i,b} (n, p, h): A(W) = phi (n, p h) @ W (p h, c) and A*(R) = phi^T R. phi does not depend on W,
so it is computed once and kept when it fits ``cache_bytes``; otherwise each product rebuilds it
in blocks of samples and gates, never holding more than about ``max_elems`` numbers at once and
never an (n, B, p, c) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import CrossEntropyLoss, SquaredLoss
from .operator import matmul_nn, matmul_tn
from .problem import Certificate
from .relu import ReLUProblem, ReLUResult, Schedule, augmented_lagrangian


@dataclass(frozen=True)
class ConvGeometry:
    kernel_size: int
    stride: int
    padding: int
    intercept: bool

    def out_size(self, H: int, W: int) -> tuple[int, int]:
        k, s, q = self.kernel_size, self.stride, self.padding
        return (H + 2 * q - k) // s + 1, (W + 2 * q - k) // s + 1

    def width(self, channels: int) -> int:
        """h: numbers per patch."""
        return channels * self.kernel_size**2 + int(self.intercept)

    def patches(self, X: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, h, B): ``patch_rows`` transposed."""
        return self.patch_rows(X).transpose(1, 2)

    def patch_rows(self, X: torch.Tensor, *, ones: bool = True) -> torch.Tensor:
        """(n, C, H, W) -> (n, B, h): the patches as rows, the constant 1 of an intercept last
        (left out with ``ones=False``: (n, B, C k^2)). A 1x1 unpadded stride-1 conv's patches
        are the positions themselves: a view of a channels_last X (a copy otherwise), no
        unfold."""
        k, s, q = self.kernel_size, self.stride, self.padding
        if (k, s, q) != (1, 1, 0):
            U = F.unfold(X, k, padding=q, stride=s).transpose(1, 2)
        else:
            n, C, H, W = X.shape
            U = X.permute(0, 2, 3, 1).reshape(n, H * W, C)
        if ones and self.intercept:
            U = torch.cat([U, U.new_ones(U.shape[0], U.shape[1], 1)], dim=2)
        return U

    def masks(
        self, X: torch.Tensor, gates: torch.Tensor, gate_bias: torch.Tensor, chunk: int = 256
    ) -> torch.Tensor:
        """Boolean D (n, p, B) for gates (p, C, k, k) and offsets (p,), in chunks of gates."""
        n, p = X.shape[0], gates.shape[0]
        B = self.out_size(X.shape[2], X.shape[3])
        out = torch.empty(n, p, B[0] * B[1], dtype=torch.bool, device=X.device)
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            pre = F.conv2d(X, gates[s:e], gate_bias[s:e], self.stride, self.padding)
            out[:, s:e] = (pre >= 0).flatten(2)
        return out


class ConvOperator:
    """A: R^{p x h x c} -> R^{n x c}, the pooled gated conv above.

    X: (n, C, H, W); masks: bool (n, p, B).
    """

    def __init__(
        self,
        X: torch.Tensor,
        masks: torch.Tensor,
        geometry: ConvGeometry,
        *,
        cache_bytes: int = 1 << 30,
        max_elems: int = 1 << 23,
        phi: torch.Tensor | None = None,
    ):
        self.X = X
        self.masks = masks
        self.geometry = geometry
        self.cache_bytes = cache_bytes
        self.max_elems = max_elems
        n, p, _ = masks.shape
        self.h = geometry.width(X.shape[1])
        if phi is None and n * p * self.h * X.element_size() <= cache_bytes:
            phi = self._build_phi()
        self.phi = phi

    @property
    def n_gates(self) -> int:
        return int(self.masks.shape[1])

    @property
    def cached(self) -> bool:
        return self.phi is not None

    def _chunks(self) -> tuple[int, int]:
        n, p, B = self.masks.shape
        rows = max(1, min(n, self.max_elems // (self.h * B)))
        gates = max(1, min(p, self.max_elems // (rows * max(self.h, B))))
        return rows, gates

    def _blocks(self):
        """Yield (row slice, gate slice, phi block (rows, gates, h)) covering phi."""
        n, p, B = self.masks.shape
        step_n, step_p = self._chunks()
        body = self.h - int(self.geometry.intercept)
        for r in range(0, n, step_n):
            rows = slice(r, min(n, r + step_n))
            Ut = self.geometry.patch_rows(self.X[rows], ones=False)  # (rows, B, C k^2)
            for g in range(0, p, step_p):
                gates = slice(g, min(p, g + step_p))
                D = self.masks[rows, gates].to(self.X.dtype)  # (rows, gates, B)
                block = self.X.new_empty(D.shape[0], D.shape[1], self.h)
                torch.bmm(D, Ut, out=block[:, :, :body])
                if body < self.h:  # the intercept's column: the pooled mask itself
                    torch.sum(D, dim=2, out=block[:, :, body])
                yield rows, gates, block.div_(B)

    def _build_phi(self) -> torch.Tensor:
        n, p, _ = self.masks.shape
        phi = self.X.new_empty(n, p, self.h)
        for rows, gates, block in self._blocks():
            phi[rows, gates] = block
        return phi

    def matvec(self, W: torch.Tensor) -> torch.Tensor:
        """(p, h, c) -> (n, c)."""
        p, h, c = W.shape
        n = self.masks.shape[0]
        if self.phi is not None:
            return matmul_nn(self.phi.reshape(n, p * h), W.reshape(p * h, c))
        out = self.X.new_zeros(n, c)
        for rows, gates, block in self._blocks():
            m, g = block.shape[0], block.shape[1]
            out[rows] += matmul_nn(block.reshape(m, g * h), W[gates].reshape(g * h, c))
        return out

    def rmatvec(self, R: torch.Tensor) -> torch.Tensor:
        """(n, c) -> (p, h, c): block j is (1/B) sum_b X_b^T D_jb R."""
        n, c = R.shape
        p, h = self.n_gates, self.h
        if self.phi is not None:
            return matmul_tn(self.phi.reshape(n, p * h), R).reshape(p, h, c)
        out = self.X.new_zeros(p, h, c)
        for rows, gates, block in self._blocks():
            m, g = block.shape[0], block.shape[1]
            out[gates] += matmul_tn(block.reshape(m, g * h), R[rows]).reshape(g, h, c)
        return out

    def _like(self, X, masks, phi) -> ConvOperator:
        return ConvOperator(
            X,
            masks,
            self.geometry,
            cache_bytes=self.cache_bytes,
            max_elems=self.max_elems,
            phi=phi,
        )

    def restrict(self, idx: torch.Tensor) -> ConvOperator:
        """The operator on a subset of gates (a working set)."""
        phi = None if self.phi is None else self.phi[:, idx]
        return self._like(self.X, self.masks[:, idx], phi)

    def rows(self, idx: torch.Tensor) -> ConvOperator:
        """The operator on a subset of samples (a training or validation split)."""
        phi = None if self.phi is None else self.phi[idx]
        return self._like(self.X[idx], self.masks[idx], phi)

    def to(self, dtype: torch.dtype) -> ConvOperator:
        # phi is rebuilt from X in the new precision rather than cast, so a float64 polish
        # certifies the program on the inputs themselves.
        return self._like(self.X.to(dtype), self.masks, None)


class ConvReLUProblem(ReLUProblem):
    """An augmented-Lagrangian subproblem of the exact ReLU CNN head.

    The cone constraints hold per patch, so the base class runs on the stacked patch rows
    (n B, h) and their masks (n B, p); only the model outputs pool over the B positions of
    each sample: F_i = (1/B) sum_b sum_j s_j D[i, j, b] x_{i,b}^T U_j (s = +1 for V, -1 for W).
    """

    def __init__(
        self,
        patches: torch.Tensor,
        masks: torch.Tensor,
        Y: torch.Tensor,
        loss: SquaredLoss | CrossEntropyLoss,
        lam: float,
        fit_bias: bool,
        delta: float,
        mult: torch.Tensor | None,
    ):
        super().__init__(patches, masks, Y, loss, lam, fit_bias, delta, mult)
        self.n_positions = patches.shape[0] // Y.shape[0]

    def _pool(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(self.Y.shape[0], self.n_positions, -1).mean(dim=1)

    def _spread(self, G: torch.Tensor) -> torch.Tensor:
        """The adjoint of _pool: (n, c) -> (n B, c)."""
        return G.repeat_interleave(self.n_positions, dim=0) / self.n_positions

    def outputs(self, raw: torch.Tensor) -> torch.Tensor:
        return self._pool(torch.einsum("rjc,rj->rc", raw, self.out))

    def smooth_grad(self, raw: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gF = self.loss.grad(self.outputs(raw) + b, self.Y)
        R = self.out.unsqueeze(-1) * self._spread(gF).unsqueeze(1)
        R = R - self.cone.unsqueeze(-1) * self.updated_multipliers(raw)
        gb = gF.sum(dim=0) if self.fit_bias else torch.zeros_like(b)
        return self._adjoint(R), gb

    def dual_norms(self, theta: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        R = self.out.unsqueeze(-1) * self._spread(theta).unsqueeze(1)
        R = R + self.cone.unsqueeze(-1) * self.updated_multipliers(raw)
        return torch.linalg.vector_norm(self._adjoint(R), dim=1).reshape(-1)


# Augmented Lagrangian schedule, tuned on small programs against CVXPY: the penalty starts at
# DELTA0 / (n B) (a patch's weight in the pooled loss is 1 / (n B)), and each round runs a fixed
# number of FISTA iterations (INNER, then 2 INNER): the subproblem's own stopping test cannot be
# the gap, since with infeasible iterates the dual bound can exceed the primal value. The penalty
# stays once the violation is at most tol.
DELTA0, INNER = 300.0, 300


def solve_conv_relu(
    patches: torch.Tensor,
    masks: torch.Tensor,
    Y: torch.Tensor,
    loss: SquaredLoss | CrossEntropyLoss,
    lam: float,
    fit_bias: bool,
    *,
    tol: float,
    max_iter: int,
    max_outer: int = 200,
    callback: Callable[[int, Certificate], None] | None = None,
) -> ReLUResult:
    """The exact ReLU CNN program by augmented Lagrangian (the scheme of ``relu.solve_relu``).

    patches: (n B, h) stacked patch rows, sample-major; masks: bool (n B, p).
    Returns U = [V; W] (2p, h, c) with the violation relative to the largest |x_b^T U_jk|.
    """
    n_rows = Y.shape[0] * (patches.shape[0] // Y.shape[0])  # n B
    args = (patches, masks, Y, loss, lam, fit_bias)
    schedule = Schedule(delta=DELTA0 / n_rows, inner=INNER, settled=tol)
    return augmented_lagrangian(ConvReLUProblem, args, schedule, tol, max_iter, max_outer, callback)


__all__ = ["ConvGeometry", "ConvOperator", "ConvReLUProblem", "solve_conv_relu"]
