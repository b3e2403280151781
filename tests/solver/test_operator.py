"""The gated operator: its products equal the explicit sum over gates, in every code path."""

import pytest
import torch

from solver.operator import WIDE, GatedOperator


@pytest.mark.parametrize("d", [5, WIDE + 3])  # both matvec layouts of one output
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_equal_the_explicit_sum_over_gates_and_are_adjoint(d, c, dtype):
    g = torch.Generator().manual_seed(d * 10 + c)
    n, p = 40, 7
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    masks = torch.rand(n, p, generator=g) > 0.4
    W = torch.randn(p, d, c, generator=g, dtype=torch.float64)
    R = torch.randn(n, c, generator=g, dtype=torch.float64)
    want = sum(masks[:, i, None] * (X @ W[i]) for i in range(p))
    want_adj = torch.stack([X.T @ (masks[:, i, None] * R) for i in range(p)])
    # max_elems small enough that the products run in several chunks of gates
    for op in (GatedOperator(X.to(dtype), masks), GatedOperator(X.to(dtype), masks, 3 * n * c)):
        rtol = 1e-12 if dtype == torch.float64 else 1e-4
        got = op.matvec(W.to(dtype)).double()
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
        adj = op.rmatvec(R.to(dtype)).double()
        torch.testing.assert_close(
            adj, want_adj, rtol=rtol, atol=rtol * float(want_adj.abs().max())
        )
        sub = op.restrict(torch.tensor([5, 1]))
        torch.testing.assert_close(
            sub.matvec(W[[5, 1]].to(dtype)).double(),
            masks[:, 5, None] * (X @ W[5]) + masks[:, 1, None] * (X @ W[1]),
            rtol=rtol,
            atol=rtol * float(want.abs().max()),
        )


@pytest.mark.parametrize("d", [5, WIDE + 3])
@pytest.mark.parametrize("c", [1, 3])
def test_bfloat16_products_are_float32_values_close_to_the_exact_ones(d, c):
    g = torch.Generator().manual_seed(d + c)
    n, p = 64, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    masks = torch.rand(n, p, generator=g) > 0.4
    W = torch.randn(p, d, c, generator=g, dtype=torch.float64)
    R = torch.randn(n, c, generator=g, dtype=torch.float64)
    exact = GatedOperator(X, masks)
    low = exact.computing_in(torch.bfloat16)
    for op in (low, low.restrict(torch.tensor([3, 0, 4]))):
        idx = torch.arange(p) if op is low else torch.tensor([3, 0, 4])
        ref = exact.restrict(idx)
        got, got_adj = op.matvec(W[idx].float()), op.rmatvec(R.float())
        assert got.dtype == got_adj.dtype == torch.float32
        want, want_adj = ref.matvec(W[idx]), ref.rmatvec(R)
        # bfloat16 keeps 8 significant bits: about 3e-3 relative per operand
        err = float((got.double() - want).norm() / want.norm())
        err_adj = float((got_adj.double() - want_adj).norm() / want_adj.norm())
        assert 1e-6 < err < 2e-2 and 1e-6 < err_adj < 2e-2  # rounded, but only that much
