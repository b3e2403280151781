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
