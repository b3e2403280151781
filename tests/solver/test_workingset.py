"""The precision phases of the working-set driver: the bfloat16 start of first-order programs."""

import numpy as np
import pytest
import torch

import solver.workingset as ws
from solver import ConvexMLPClassifier
from solver.losses import CrossEntropyLoss
from solver.operator import GatedOperator
from solver.penalties import GroupFrobenius, GroupNuclear


def _data():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 12)).astype(np.float32)
    y = np.argmax(np.maximum(X @ rng.standard_normal((12, 8)), 0) @ rng.standard_normal((8, 4)), 1)
    return X, y


def _fit(monkeypatch, speedup: float, tol: float = 1e-6):
    """A 4-class nuclear fit with the bfloat16 start allowed at any size; the programs it
    built in bfloat16, counted."""
    built = []
    original = GatedOperator.computing_in

    def spy(self, dtype):
        built.append(dtype)
        return original(self, dtype)

    monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 0)
    monkeypatch.setattr(ws, "bfloat16_speedup", lambda: speedup)
    monkeypatch.setattr(GatedOperator, "computing_in", spy)
    X, y = _data()
    est = ConvexMLPClassifier(gates=16, lam=2e-3, random_state=0, max_iter=20000, tol=tol).fit(X, y)
    return est, built


def test_a_bfloat16_start_ends_at_the_same_certified_optimum(monkeypatch):
    est, built = _fit(monkeypatch, speedup=3.0)
    assert built == [torch.bfloat16]
    assert est.converged_ and est.duality_gap_ <= 1e-6
    ref, none = _fit(monkeypatch, speedup=1.0)  # bfloat16 no faster: no such phase
    assert none == []
    assert ref.converged_
    assert est.objective_ == pytest.approx(ref.objective_, rel=5e-6)
    X, _ = _data()
    assert np.array_equal(est.predict(X), ref.predict(X))


def test_only_first_order_programs_in_float_get_a_bfloat16_start(monkeypatch):
    monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 0)
    monkeypatch.setattr(ws, "bfloat16_speedup", lambda: 3.0)
    X, _ = _data()
    op = GatedOperator(torch.as_tensor(X), torch.rand(300, 5, generator=torch.Generator()) > 0.5)
    Y = torch.zeros(300, 4)
    nuclear = ws.Problem(op, Y, CrossEntropyLoss(), GroupNuclear(), 1e-3, True)
    low = ws._bfloat16_start(nuclear)
    assert low is not None and low.op.compute_dtype == torch.bfloat16
    assert ws._bfloat16_start(low) is None  # already in bfloat16
    frobenius = ws.Problem(op, Y, CrossEntropyLoss(), GroupFrobenius(), 1e-3, True)
    assert ws._bfloat16_start(frobenius) is None  # Newton finishes it from a float32 start
    monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 1e12)
    assert ws._bfloat16_start(nuclear) is None  # too small to pay
    monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 0)
    monkeypatch.setattr(ws, "bfloat16_speedup", lambda: 1.2)
    assert ws._bfloat16_start(nuclear) is None  # a CPU without fast bfloat16


def test_a_tol_above_the_bfloat16_phase_s_gets_none(monkeypatch):
    _, built = _fit(monkeypatch, speedup=3.0, tol=2 * ws.BF16_TOL)
    assert built == []


def test_fista_s_min_decrease_stops_a_phase_whose_objective_no_longer_falls():
    from solver.fista import fista
    from solver.problem import certificate

    X, y = _data()
    op = GatedOperator(torch.as_tensor(X), torch.as_tensor(X[:, :6] > 0))
    Y = torch.nn.functional.one_hot(torch.as_tensor(y)).float()
    prob = ws.Problem(op, Y, CrossEntropyLoss(), GroupNuclear(), 1e-3, True)
    W0, b0 = torch.zeros(6, 12, 4), torch.zeros(4)
    free = fista(prob, W0, b0, tol=0.0, max_iter=60)
    assert free.n_iter == 60
    # asking each check for a decrease no objective can make ends the phase at the first
    stopped = fista(prob, W0, b0, tol=0.0, max_iter=60, min_decrease=1e9)
    assert stopped.n_iter == 10
    start = certificate(prob, W0, b0, op.matvec(W0)).primal
    assert stopped.cert.primal < 0.99 * start  # it did make progress until then


def test_the_cnn_operator_computes_in_bfloat16_when_its_patches_are_cached(monkeypatch):
    from solver.cnn_operator import ConvGeometry, ConvOperator

    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 3, 4, 4, generator=g, dtype=torch.float64)
    geo = ConvGeometry(2, 1, 0, True)
    masks = geo.masks(
        X,
        torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64),
        torch.zeros(6, dtype=torch.float64),
    )
    exact = ConvOperator(X, masks, geo)
    low = exact.computing_in(torch.bfloat16)
    assert low is not None and low.compute_dtype == torch.bfloat16
    W = torch.randn(6, exact.h, 3, generator=g, dtype=torch.float64)
    R = torch.randn(40, 3, generator=g, dtype=torch.float64)
    for idx in (None, [4, 1]):  # all gates, and a working set of two
        op = low if idx is None else low.restrict(torch.tensor(idx))
        ref = exact if idx is None else exact.restrict(torch.tensor(idx))
        Wi = W if idx is None else W[idx]
        got, got_adj = op.matvec(Wi.float()), op.rmatvec(R.float())
        assert got.dtype == got_adj.dtype == torch.float32
        want, want_adj = ref.matvec(Wi), ref.rmatvec(R)
        err = float((got.double() - want).norm() / want.norm())
        err_adj = float((got_adj.double() - want_adj).norm() / want_adj.norm())
        assert 1e-6 < err < 2e-2 and 1e-6 < err_adj < 2e-2  # rounded, but only that much
    # Without the cached patches there is no bfloat16 copy to compute with.
    assert ConvOperator(X, masks, geo, cache_bytes=0).computing_in(torch.bfloat16) is None
    monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 0)
    monkeypatch.setattr(ws, "bfloat16_speedup", lambda: 3.0)
    Y = torch.zeros(40, 3, dtype=torch.float64)
    start = ws._bfloat16_start(ws.Problem(exact, Y, CrossEntropyLoss(), GroupNuclear(), 1e-3, True))
    assert start is not None and start.op.compute_dtype == torch.bfloat16
    blocked = ConvOperator(X, masks, geo, cache_bytes=0)
    assert (
        ws._bfloat16_start(ws.Problem(blocked, Y, CrossEntropyLoss(), GroupNuclear(), 1e-3, True))
        is None
    )


def test_a_cnn_fit_with_a_bfloat16_start_ends_at_the_same_certified_optimum(monkeypatch):
    from solver import ConvexCNNClassifier
    from solver.cnn_operator import ConvOperator

    rng = np.random.default_rng(4)
    X = rng.standard_normal((120, 4, 5, 5)).astype(np.float32)
    y = (X[:, 0].mean(axis=(1, 2)) > 0).astype(int) + (X[:, 1, 2, 2] > 0.5).astype(int)
    built = []
    original = ConvOperator.computing_in

    def spy(self, dtype):
        built.append(dtype)
        return original(self, dtype)

    def fit(speedup):
        monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 0)
        monkeypatch.setattr(ws, "bfloat16_speedup", lambda: speedup)
        monkeypatch.setattr(ConvOperator, "computing_in", spy)
        return ConvexCNNClassifier(
            gates=8, lam=3e-3, n_components=None, random_state=0, max_iter=20000
        ).fit(X, y)

    fast = fit(3.0)
    assert built == [torch.bfloat16] and fast.converged_ and fast.duality_gap_ <= 1e-6
    built.clear()
    ref = fit(1.0)
    assert built == [] and ref.converged_
    assert fast.objective_ == pytest.approx(ref.objective_, rel=5e-6)
    assert np.array_equal(fast.predict(X), ref.predict(X))
