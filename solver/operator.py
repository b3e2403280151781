"""The gated operator A(W) = sum_i D_i X W_i and its adjoint, chunked over gates.

Weights have shape (p, d, c): one (d, c) block per gate. Work is done in chunks of gates so
the largest temporary is (n, chunk, c), bounded by ``max_elems``, never (n, p, c).
"""

from __future__ import annotations

import functools
import time
from typing import Protocol

import torch

# With one output and at least this many features, matvec computes W X^T (g x n) rather than
# X W^T (n x g): the same flops, but MKL on this CPU (AMD EPYC) was 1.1-1.9x faster that way
# for d = 1280 in float64 at every gate count tried, and in float32 at 61 and 92 gates (5-8 %
# slower at 128); with d = 64 it was up to 1.5x slower. Measured on the operator itself, one
# thread, n = 10000 / 2013 / 1347 / 268 (bench/README.md).
WIDE = 256

# A product with a skinny right operand (at most this many columns, e.g. one column per class)
# goes through BLAS the other way round: A^T R as (R^T A)^T and A B as (B^T A^T)^T. MKL on this
# CPU takes slow paths for the direct forms. One thread, 10 columns: A (10000 x 4160): A^T R
# 316 -> 30 ms, A B 61 -> 43 ms; A (10000 x 1281): 96 -> 10 ms and 28 -> 13 ms; no slower from
# 20 to 64 columns (bench/README.md, "Skinny products").
SKINNY = 32


def matmul_tn(A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A^T R for A (n, m) and R (n, k); a (m, k) result, not always contiguous."""
    if R.shape[1] <= SKINNY:
        return (R.T @ A).T
    return A.T @ R


def matmul_nn(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A B for A (n, m) and B (m, k); a (n, k) result, not always contiguous."""
    if B.shape[1] <= SKINNY:
        return (B.T @ A.T).T
    return A @ B


class Operator(Protocol):
    """What the solvers need of a linear map from gate blocks (p, ...) to outputs (n, c).

    ``GatedOperator`` (MLP heads) is one; the CNN and attention heads bring their own. The
    working-set driver restricts it to a subset of gates and changes its precision.
    """

    @property
    def n_gates(self) -> int: ...
    def matvec(self, W: torch.Tensor) -> torch.Tensor: ...
    def rmatvec(self, R: torch.Tensor) -> torch.Tensor: ...
    def restrict(self, idx: torch.Tensor) -> Operator: ...
    def to(self, dtype: torch.dtype) -> Operator: ...


class GatedOperator:
    """A: R^{p x d x c} -> R^{n x c}, A(W) = sum_i diag(masks[:, i]) X W_i.

    X: (n, d); masks: bool (n, p).
    """

    def __init__(
        self,
        X: torch.Tensor,
        masks: torch.Tensor,
        max_elems: int = 1 << 24,
        max_float_mask_bytes: int = 1 << 29,
        _shared: dict | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        self.X = X
        self.masks = masks
        self.max_elems = max_elems
        # What restricted copies of this operator can reuse (same X): the sampled rows and
        # their Gram X_J X_J^T, for the Newton preconditioner; X in the compute dtype.
        self._shared = {} if _shared is None else _shared
        # With a compute dtype (bfloat16), the two big products take their operands in it and
        # accumulate in float32; inputs, outputs and the sums over gates stay in X's dtype.
        self.compute_dtype = compute_dtype
        self._Xc = X
        if compute_dtype is not None:
            if ("X", compute_dtype) not in self._shared:
                self._shared["X", compute_dtype] = X.to(compute_dtype)
            self._Xc = self._shared["X", compute_dtype]
        # Float copies of the masks make each product one fused multiply; keep them only while
        # they cost no more than ``max_float_mask_bytes`` (else convert chunk by chunk).
        nbytes = masks.numel() * X.element_size()
        self._float_masks = masks.to(X.dtype) if nbytes <= max_float_mask_bytes else None

    @property
    def n_gates(self) -> int:
        return int(self.masks.shape[1])

    def _mask(self, s: int, e: int) -> torch.Tensor:
        if self._float_masks is not None:
            return self._float_masks[:, s:e]
        return self.masks[:, s:e].to(self.X.dtype)

    def _step(self, c: int) -> int:
        n, p = self.masks.shape
        return max(1, min(p, self.max_elems // max(1, n * c)))

    def matvec(self, W: torch.Tensor) -> torch.Tensor:
        """(p, d, c) -> (n, c)."""
        p, c = W.shape[0], W.shape[2]
        step = self._step(c)
        if step >= p:  # one chunk: no accumulator
            return self._matvec_chunk(W, 0, p)
        out = torch.zeros(self.X.shape[0], c, dtype=self.X.dtype, device=self.X.device)
        for s in range(0, p, step):
            out += self._matvec_chunk(W, s, min(p, s + step))
        return out

    def _mm(self, a: torch.Tensor, b: torch.Tensor, mm=torch.matmul) -> torch.Tensor:
        """mm(a, b) (a @ b, or ``matmul_nn`` / ``matmul_tn``) in the compute dtype (one
        operand is X's copy in it), returned in X's."""
        if self.compute_dtype is None:
            return mm(a, b)
        dt = self.compute_dtype
        return mm(a.to(dt), b.to(dt)).to(self.X.dtype)

    def _matvec_chunk(self, W: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """The (n, c) contribution of gates s:e."""
        d, c = W.shape[1], W.shape[2]
        Xc = self._Xc
        if c == 1 and d >= WIDE:  # (g, n) products, masked in place: no copy of W
            Z = self._mm(W[s:e].reshape(e - s, d), Xc.T)
            return Z.mul_(self._mask(s, e).T).sum(dim=0).unsqueeze(1)
        if c == 1:  # (n, g) products, masked in place
            Z = self._mm(Xc, W[s:e].reshape(e - s, d).T)
            return Z.mul_(self._mask(s, e)).sum(dim=1, keepdim=True)
        Wc = W[s:e].permute(1, 0, 2).reshape(d, (e - s) * c)
        Z = self._mm(Xc, Wc, matmul_nn).reshape(-1, e - s, c)
        return torch.einsum("ngc,ng->nc", Z, self._mask(s, e))

    def rmatvec(self, R: torch.Tensor) -> torch.Tensor:
        """(n, c) -> (p, d, c): block i is X^T diag(masks[:, i]) R."""
        n, c = R.shape
        p = self.n_gates
        d = self.X.shape[1]
        out = torch.empty(p, d, c, dtype=self.X.dtype, device=self.X.device)
        step = self._step(c)
        for s in range(0, p, step):
            e = min(p, s + step)
            M = self._mask(s, e)
            if c == 1 and self.compute_dtype is None:  # (g, d) = (M * R)^T X, in place
                torch.mm((M * R).T, self.X, out=out[s:e].view(e - s, d))
            elif c == 1:
                out[s:e] = self._mm((M * R).T, self._Xc).view(e - s, d, 1)
            else:
                MR = (M.unsqueeze(-1) * R.unsqueeze(1)).reshape(n, (e - s) * c)
                XtMR = self._mm(self._Xc, MR, matmul_tn)
                out[s:e] = XtMR.reshape(d, e - s, c).permute(1, 0, 2)
        return out

    def restrict(self, idx: torch.Tensor) -> GatedOperator:
        """The operator on a subset of gates (a working set)."""
        return GatedOperator(
            self.X,
            self.masks[:, idx],
            self.max_elems,
            _shared=self._shared,
            compute_dtype=self.compute_dtype,
        )

    def to(self, dtype: torch.dtype) -> GatedOperator:
        return GatedOperator(self.X.to(dtype), self.masks, self.max_elems)

    def computing_in(self, dtype: torch.dtype) -> GatedOperator:
        """The same operator (float32 inputs and outputs) with its products in ``dtype``."""
        return GatedOperator(self.X.float(), self.masks, self.max_elems, compute_dtype=dtype)

    def sample_rows(self, m: int) -> torch.Tensor:
        """m row indices: all rows when m >= n, else a fixed random subset (seeded, sorted)."""
        n = self.X.shape[0]
        if m >= n:
            return torch.arange(n, device=self.X.device)
        key = ("rows", m)
        if key not in self._shared:
            g = torch.Generator().manual_seed(0)
            self._shared[key] = torch.randperm(n, generator=g)[:m].sort().values.to(self.X.device)
        return self._shared[key]

    def take_rows(self, rows: torch.Tensor) -> GatedOperator:
        """The operator on a subset of the samples (rows of X and of the masks)."""
        n = self.X.shape[0]
        if rows.numel() == n:
            return self
        shared = self._shared.setdefault(("sub", rows.numel()), {})
        if "X" not in shared:  # the rows' features do not depend on the gates: copied once
            shared["X"] = self.X[rows]
        return GatedOperator(shared["X"], self.masks[rows], self.max_elems, _shared=shared)

    def row_gram(self) -> torch.Tensor:
        """X X^T (n x n), computed once per X."""
        if "row_gram" not in self._shared:
            self._shared["row_gram"] = self.X @ self.X.T
        return self._shared["row_gram"]

    def float_masks(self) -> torch.Tensor:
        return self._mask(0, self.n_gates)


def _bfloat16_ratio(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """float32 seconds / bfloat16 seconds of a @ b, each the best of ``repeats`` after a
    warm-up product."""
    best = []
    for dt in (torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        x @ y
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        best.append(min(times))
    return best[0] / max(best[1], 1e-9)


@functools.cache
def bfloat16_speedup() -> float:
    """How many times faster a bfloat16 matrix product (float32 accumulation) is than a float32
    one on this CPU, timed once per process (best of 3, a (1024 x 1024) @ (1024 x 256) product,
    about 20 ms in all). CPUs with native bfloat16 (AVX512-BF16, AMX) measure 2-3x; others
    emulate it and measure far below 1: a first product 16 times smaller tells those apart
    without the full one (which took 2.2 s on an AVX2-only EPYC, where bfloat16 ran at 0.008x
    the float32 speed)."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 256)
    small = _bfloat16_ratio(a[:256, :256], b[:256], 1)
    return small if small < 0.25 else _bfloat16_ratio(a, b, 3)
