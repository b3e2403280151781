"""The estimator's contract: lam_max, recovery, storage, errors, warnings, pricing, lam='auto'."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from solver import ConvergenceWarning, ConvexMLPClassifier, ConvexMLPRegressor, estimators, load
from solver.losses import CrossEntropyLoss

from .conftest import small_problem


@pytest.mark.parametrize("penalty", ["nuclear", "frobenius"])
@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_lam_at_lam_max_gives_exactly_zero(loss, penalty):
    X, y = small_problem(seed=5)
    probe = ConvexMLPClassifier(gates=6, lam=1.0, loss=loss, penalty=penalty, random_state=0).fit(
        X, y
    )
    at = ConvexMLPClassifier(
        gates=6, lam=probe.lam_max_, loss=loss, penalty=penalty, random_state=0
    ).fit(X, y)
    assert bool((at.weights_ == 0).all()) and at.n_neurons_ == 0
    below = ConvexMLPClassifier(
        gates=6, lam=0.9 * probe.lam_max_, loss=loss, penalty=penalty, random_state=0
    ).fit(X, y)
    assert below.n_neurons_ > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"penalty": "nuclear"},
        {"penalty": "frobenius"},
        {"penalty": "nuclear", "loss": "squared"},
        {"penalty": "nuclear", "fit_intercept": False},
    ],
)
def test_recovered_gated_network_reproduces_predictions(kwargs, monkeypatch):
    X, y = small_problem(seed=6)
    clf = ConvexMLPClassifier(gates=8, lam=0.01, random_state=0, **kwargs).fit(X, y)
    net = clf.to_torch()
    assert isinstance(net, torch.nn.Module)
    out = net(torch.as_tensor(X))
    monkeypatch.setattr(estimators, "NEURON_ROWS", 0)  # the blocks' sum, not the neurons'
    assert torch.allclose(out, clf.decision_function(X), atol=1e-10)
    assert net.hidden.out_features == clf.n_neurons_


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_few_rows_predict_through_the_neurons_as_the_blocks_do(dtype):
    """Up to NEURON_ROWS rows the gated head sums its neurons, above that its blocks through
    the operator: the same outputs either way, rows of a large batch or a few alone."""
    rng = np.random.default_rng(11)
    X = rng.standard_normal((estimators.NEURON_ROWS + 200, 12)).astype(dtype)
    y = (X[:, 0] + np.maximum(X[:, 1], 0) > 0.3).astype(int) + (X[:, 2] > 1.0)
    clf = ConvexMLPClassifier(gates=16, lam=1e-3, random_state=0, max_iter=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    assert clf.n_neurons_ > 0 and len(np.unique(y)) == 3
    batch = clf.decision_function(X)  # the operator
    for rows in (slice(0, 1), slice(5, 9), slice(0, estimators.NEURON_ROWS)):
        few = clf.decision_function(X[rows])  # the neurons
        tol = 1e-9 if dtype == np.float64 else 1e-5
        assert torch.allclose(few, batch[rows], rtol=tol, atol=tol * float(batch.abs().max()))
    assert (clf.predict(X[:7]) == clf.predict(X)[:7]).all()


def test_recovered_nuclear_network_has_the_convex_objective():
    """loss + lam/2 (||W1||^2 + ||W2||^2) of the recovered gated network (hidden biases are part
    of W1; the output bias is unpenalized) equals the convex objective."""
    X, y = small_problem(seed=7)
    lam = 0.01
    clf = ConvexMLPClassifier(gates=8, lam=lam, penalty="nuclear", random_state=0).fit(X, y)
    net = clf.to_torch()
    logits = net(torch.as_tensor(X))
    ce = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y))
    decay = (
        lam
        / 2
        * (
            net.hidden.weight.square().sum()
            + net.hidden.bias.square().sum()
            + net.output.weight.square().sum()
        )
    )
    assert float(ce + decay) == pytest.approx(clf.objective_, rel=1e-9)


def test_save_load_roundtrip(tmp_path):
    X, y = small_problem(seed=8)
    y = np.array(["cat", "dog", "emu"])[y]
    clf = ConvexMLPClassifier(gates=8, lam=0.01, random_state=0).fit(X, y)
    clf.save(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "head.json",
        "tensors.safetensors",
    ]
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["classes"] == ["cat", "dog", "emu"]
    again = load(tmp_path / "head")
    assert isinstance(again, ConvexMLPClassifier)
    assert np.array_equal(again.predict(X), clf.predict(X))
    assert np.allclose(again.predict_proba(X), clf.predict_proba(X))
    assert again.duality_gap_ == clf.duality_gap_


def test_gates_array_is_used_as_given():
    X, y = small_problem(seed=9, d=3)
    G = np.random.default_rng(0).standard_normal((3, 5))
    clf = ConvexMLPClassifier(gates=G, lam=0.01, fit_intercept=False).fit(X, y)
    kept = clf.gates_.numpy()
    # Every kept gate is one of the given columns (duplicates/empty patterns dropped).
    assert all(any(np.allclose(k, g) for g in G.T) for k in kept.T)


def test_convergence_warning_at_max_iter():
    X, y = small_problem(seed=10)
    with pytest.warns(ConvergenceWarning):
        clf = ConvexMLPClassifier(gates=8, lam=1e-3, max_iter=3, random_state=0).fit(X, y)
    assert not clf.converged_ and clf.duality_gap_ > clf.tol


@pytest.mark.parametrize(
    "kwargs, X, y, message",
    [
        ({"activation": "tanh"}, np.ones((4, 2)), [0, 1, 0, 1], "activation"),
        ({"penalty": "l1"}, np.ones((4, 2)), [0, 1, 0, 1], "penalty"),
        ({"lam": -1.0}, np.ones((4, 2)), [0, 1, 0, 1], "lam"),
        ({}, np.array([[np.nan, 1.0], [0, 1], [1, 0], [1, 1]]), [0, 1, 0, 1], "NaN"),
        ({}, np.ones((4, 2)), [0, 0, 0, 0], "2 classes"),
        ({}, np.ones((4, 2)), [0, 1, 0], "samples"),
    ],
)
def test_bad_input_is_refused_clearly(kwargs, X, y, message):
    with pytest.raises(ValueError, match=message):
        ConvexMLPClassifier(**kwargs).fit(X, y)


def test_predict_refuses_wrong_width_and_unfitted():
    X, y = small_problem(seed=11)
    with pytest.raises(RuntimeError, match="not fitted"):
        ConvexMLPClassifier().predict(X)
    clf = ConvexMLPClassifier(gates=4, lam=0.01, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        clf.predict(X[:, :2])


def test_pricing_reports_the_dual_constraint_on_fresh_gates():
    X, y = small_problem(seed=12, n=60)
    few = ConvexMLPClassifier(gates=2, lam=0.005, random_state=0).fit(X, y)
    many = ConvexMLPClassifier(gates=200, lam=0.005, random_state=0).fit(X, y)
    # With 2 gates the sampled program misses patterns that would help; with 200 far fewer.
    assert few.pricing_violation_ > 1.0
    assert many.pricing_violation_ < few.pricing_violation_


def test_pricing_rounds_add_violating_gates_and_certify_the_grown_program(tmp_path):
    X, y = small_problem(seed=12, n=60)
    base = ConvexMLPClassifier(gates=3, lam=0.005, random_state=0).fit(X, y)
    grown = ConvexMLPClassifier(gates=3, lam=0.005, random_state=0, pricing_rounds=3).fit(X, y)
    added = grown.pricing_added_
    assert added and all(0 < k <= 3 * 2**r for r, k in enumerate(added))
    assert grown.gates_.shape[1] == 3 + sum(added)
    assert torch.equal(grown.gates_[:, :3], base.gates_)
    assert grown.duality_gap_ <= 1e-6 and grown.objective_ < base.objective_ - 1e-4
    assert grown.pricing_violation_ < base.pricing_violation_
    # The certificate is for the program over the grown gates: solving that program from
    # scratch, with the gates given, reaches the same objective.
    again = ConvexMLPClassifier(gates=grown.gates_, lam=0.005, random_state=0).fit(X, y)
    assert again.objective_ == pytest.approx(grown.objective_, rel=1e-5)
    # Priced gates beat as many random ones.
    random = ConvexMLPClassifier(gates=grown.gates_.shape[1], lam=0.005, random_state=0).fit(X, y)
    assert grown.objective_ < random.objective_
    module = grown.to_torch()
    with torch.no_grad():
        out = module(torch.as_tensor(X))
    assert torch.allclose(out, grown.decision_function(X), atol=1e-8)
    grown.save(tmp_path / "h")
    loaded = load(tmp_path / "h")
    assert loaded.pricing_added_ == added and torch.equal(loaded.gates_, grown.gates_)


def test_pricing_rounds_keep_gates_and_weights_aligned_after_dropping_duplicates():
    X, y = small_problem(seed=12, n=60)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((X.shape[1], 2))
    given = np.concatenate([g[:, :1], g[:, :1], g[:, 1:]], axis=1)  # a duplicate pattern
    clf = ConvexMLPClassifier(gates=given, lam=0.005, random_state=0, pricing_rounds=2).fit(X, y)
    assert clf.pricing_added_ and clf.gates_.shape[1] == 2 + sum(clf.pricing_added_)
    again = ConvexMLPClassifier(gates=clf.gates_, lam=0.005, random_state=0).fit(X, y)
    assert again.objective_ == pytest.approx(clf.objective_, rel=1e-5)


def test_pricing_rounds_stop_when_no_fresh_gate_violates():
    X, y = small_problem(seed=12, n=60)
    probe = ConvexMLPClassifier(gates=3, lam=1.0, random_state=0).fit(X, y)
    # Far above every gate's threshold: nothing violates, nothing is added, W stays 0.
    clf = ConvexMLPClassifier(
        gates=3, lam=100 * probe.lam_max_, random_state=0, pricing_rounds=2
    ).fit(X, y)
    assert clf.pricing_added_ == [] and clf.gates_.shape[1] == 3 and clf.n_neurons_ == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pricing_rounds": -1}, "non-negative integer"),
        ({"pricing_rounds": 1.5}, "non-negative integer"),
        ({"pricing_rounds": 1, "activation": "relu"}, "gated_relu"),
        ({"pricing_rounds": 1, "pricing_gates": 0}, "pricing_gates"),
        ({"pricing_rounds": 1, "lam": 0.0}, "lam > 0"),
    ],
)
def test_pricing_rounds_refuses_bad_settings(kwargs, match):
    X, y = small_problem(seed=12, n=30)
    with pytest.raises(ValueError, match=match):
        ConvexMLPClassifier(**{"gates": 3, "lam": 0.01, **kwargs}).fit(X, y)


def test_lam_auto_picks_from_a_warm_started_path():
    X, y = small_problem(seed=13, n=120)
    clf = ConvexMLPClassifier(gates=8, lam="auto", n_lams=6, random_state=0).fit(X, y)
    lams = [row["lam"] for row in clf.path_]
    assert lams == sorted(lams, reverse=True) and lams[0] == pytest.approx(clf.lam_max_)
    best = min(clf.path_, key=lambda r: r["validation_loss"])
    assert clf.lam_ == best["lam"]
    assert clf.score(X, y) > 0.6


def test_lam_auto_keeps_a_training_row_whatever_the_validation_fraction():
    """The path's split holds out at least one row and keeps at least one to train on; with
    four samples and a fraction of 0.9 it used to hold out all four and fail in the solver."""
    X, y = small_problem(seed=14, n=4)
    clf = ConvexMLPClassifier(gates=4, lam="auto", n_lams=2, validation_fraction=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    assert len(clf.path_) == 2 and clf.lam_ in [row["lam"] for row in clf.path_]
    val, tr = clf._validation_split(4, 0.9, 0, "cpu")
    assert len(val) == 3 and len(tr) == 1
    assert sorted(torch.cat([val, tr]).tolist()) == [0, 1, 2, 3]


def test_lam_path_keeps_the_least_validation_loss_not_the_best_accuracy():
    """Held-out outputs whose accuracy keeps rising down the path while the cross-entropy
    turns up (confidently wrong): the loss decides, and both are recorded."""
    Y = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
    outputs = {
        4.0: torch.zeros(5, 2),  # accuracy 0.6 (ties go to class 0), loss log 2
        2.0: torch.tensor([[1.0, 0], [1, 0], [1, 0], [0.2, 0], [0.2, 0]]),  # 0.6, 0.507
        1.0: torch.tensor([[10.0, 0], [10, 0], [10, 0], [0, 10], [30, 0]]),  # 0.8, 6.0
    }
    cert = SimpleNamespace(primal=1.0, gap=0.0)
    weights = {lam: torch.full((1,), lam) for lam in outputs}
    lam, path, W = ConvexMLPClassifier()._lam_path(
        list(outputs),
        lambda lam: (outputs[lam], cert, weights[lam]),
        Y,
        CrossEntropyLoss(),
        (4.0, None),
        None,
    )
    assert lam == 2.0 and W is weights[2.0]
    assert [round(r["validation_score"], 3) for r in path] == [0.6, 0.6, 0.8]
    assert path[0]["validation_loss"] == pytest.approx(np.log(2))
    assert path[1]["validation_loss"] == pytest.approx(
        (3 * np.log1p(np.exp(-1)) + 2 * np.log1p(np.exp(0.2))) / 5
    )


def test_float32_inputs_are_polished_to_the_certificate():
    X, y = small_problem(seed=14)
    clf64 = ConvexMLPClassifier(gates=8, lam=0.01, random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf32 = ConvexMLPClassifier(gates=8, lam=0.01, random_state=0).fit(X.astype(np.float32), y)
    assert clf32.duality_gap_ <= 1e-6
    assert clf32.objective_ == pytest.approx(clf64.objective_, rel=1e-5)


def test_wide_data_in_its_row_space_gives_the_full_programs_solution(monkeypatch):
    """Fewer samples than 3/4 of the features: the fit runs on the row space of [X, 1] and its
    certificate is the full program's; with the reduction switched off, the same optimum."""
    X, y = small_problem(seed=7, n=16, d=50)
    kw = dict(gates=8, lam=0.02, random_state=0, tol=1e-8, max_iter=20000)
    for penalty in ("nuclear", "frobenius"):
        fast = ConvexMLPClassifier(penalty=penalty, **kw).fit(X, y)
        Z = fast._augment(torch.as_tensor(X))
        assert fast._row_space(Z)[0].shape == (16, 16)
        # Every block lies in the row space: projecting it there changes nothing.
        V = torch.linalg.svd(Z, full_matrices=False).Vh.T
        W = fast.weights_.to(torch.float64)
        assert torch.allclose(torch.einsum("dr,er,pec->pdc", V, V, W), W, atol=1e-9)
        with monkeypatch.context() as m:
            m.setattr(ConvexMLPClassifier, "_row_space", lambda self, Z: None)
            full = ConvexMLPClassifier(penalty=penalty, **kw).fit(X, y)
        assert fast.duality_gap_ <= 1e-8 and full.duality_gap_ <= 1e-8
        assert fast.objective_ == pytest.approx(full.objective_, rel=1e-7)
        # (softmax ignores a shift shared by all classes)
        F, G = fast.decision_function(X), full.decision_function(X)
        F, G = F - F.mean(1, keepdim=True), G - G.mean(1, keepdim=True)
        assert torch.allclose(F, G, atol=1e-4)
    # Tall data, and the exact-ReLU program, are left as they are.
    assert ConvexMLPClassifier()._row_space(torch.ones(10, 4)) is None
    assert ConvexMLPClassifier(activation="relu")._row_space(torch.ones(2, 40)) is None


def _float32_nuclear_program():
    """A small float32 cross-entropy program with the nuclear penalty (6 gates, 3 classes)."""
    from solver.losses import CrossEntropyLoss
    from solver.operator import GatedOperator
    from solver.patterns import compute_patterns
    from solver.penalties import GroupNuclear
    from solver.problem import Problem

    X, y = small_problem(seed=3)
    Z = torch.as_tensor(np.c_[X, np.ones(len(X))], dtype=torch.float32)
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    return Problem(
        GatedOperator(Z, compute_patterns(Z, G)),
        torch.as_tensor(np.eye(3)[y], dtype=torch.float32),
        CrossEntropyLoss(),
        GroupNuclear(),
        1e-3,
        True,
    )


def test_fista_stops_when_its_gap_stalls_if_asked():
    from solver.fista import fista

    prob = _float32_nuclear_program()
    W0 = torch.zeros(6, 4, 3)
    # tol 0 is never met: without `stall` FISTA runs to max_iter; with it, it stops once the
    # float32 gap has stopped halving, long before.
    plain = fista(prob, W0, prob.zero_bias(), tol=0.0, max_iter=3000)
    stalled = fista(prob, W0, prob.zero_bias(), tol=0.0, max_iter=3000, stall=100)
    assert plain.n_iter == 3000
    assert stalled.n_iter < 3000 and not stalled.converged
    assert stalled.cert.gap < 1e-2  # it stopped on a plateau, not at the start


def test_a_stalled_float32_phase_hands_the_rest_to_float64(monkeypatch):
    # A float32 certificate can stall above its tol at small lam; the float64 phase used to get
    # whatever it left, which could be nothing (all 5000 iterations spent in float32).
    import solver.workingset as ws

    monkeypatch.setattr(ws, "LOW_PRECISION_TOL", 1e-13)  # out of float32's reach
    monkeypatch.setattr(ws, "LOW_PRECISION_STALL", 100)
    X, y = small_problem(seed=3)
    phases = []
    real = ws._solve_phase

    def recording(problem, W, b, tol, budget, *args):
        out = real(problem, W, b, tol, budget, *args)
        phases.append((problem.Y.dtype, budget, out[3], out[2].gap))
        return out

    monkeypatch.setattr(ws, "_solve_phase", recording)
    clf = ConvexMLPClassifier(gates=6, lam=1e-3, tol=1e-14, max_iter=3000, random_state=0)
    with pytest.warns(ConvergenceWarning):  # tol 1e-14 is out of reach on purpose
        clf.fit(X.astype(np.float32), y)
    (low, _, low_used, low_gap), (high, high_budget, high_used, high_gap) = phases
    assert (low, high) == (torch.float32, torch.float64)
    assert low_used < 3000 and high_budget == 3000 - low_used and high_used > 0
    assert high_gap < low_gap  # float64 went on where float32 had stalled


def test_a_stalled_low_precision_round_ends_the_phase_with_working_sets(monkeypatch):
    # Without this, the driver went on with longer and longer float32 rounds on the working
    # set, each stalling in turn, while the objective moved only at rounding level. (A
    # bfloat16 start gives the float32 phase a nonzero point, hence a working set.)
    import solver.workingset as ws

    monkeypatch.setattr(ws, "LOW_PRECISION_TOL", 1e-9)  # out of float32's reach
    monkeypatch.setattr(ws, "LOW_PRECISION_STALL", 100)
    monkeypatch.setattr(ws, "BF16_MIN_FLOPS", 0)
    monkeypatch.setattr(ws, "bfloat16_speedup", lambda: 3.0)
    X, y = small_problem(seed=3)
    rounds = []
    real = ws.fista

    def recording(problem, W, b, **kw):
        res = real(problem, W, b, **kw)
        bf16 = problem.op.compute_dtype is not None
        rounds.append((W.dtype, bf16, problem.op.n_gates, kw.get("stall", 0), res, kw["max_iter"]))
        return res

    monkeypatch.setattr(ws, "fista", recording)
    clf = ConvexMLPClassifier(gates=40, lam=1e-2, tol=1e-10, max_iter=20000, random_state=0)
    clf.fit(X.astype(np.float32), y)
    low = [r for r in rounds if r[0] == torch.float32 and not r[1]]
    assert all(r[2] < 40 for r in low)  # rounds on a working set
    stalled = [k for k, r in enumerate(low) if r[3] and r[4].n_iter < r[5] and not r[4].converged]
    assert stalled == [len(low) - 1]  # the first stalled round was the phase's last
    assert rounds[-1][0] == torch.float64 and clf.duality_gap_ <= 1e-10


def test_fista_s_stall_also_watches_the_objective(monkeypatch):
    import solver.fista as fista_mod

    prob = _float32_nuclear_program()
    W0 = torch.zeros(6, 4, 3)
    free = fista_mod.fista(prob, W0, prob.zero_bias(), tol=0.0, max_iter=3000, stall=200)
    # progress that no positive objective can make: the objective's window runs out first
    monkeypatch.setattr(fista_mod, "STALL_DECREASE", 2.0)
    strict = fista_mod.fista(prob, W0, prob.zero_bias(), tol=0.0, max_iter=3000, stall=200)
    assert strict.n_iter == 200 < free.n_iter


def test_lam_path_points_stop_at_a_fifth_of_max_iter(monkeypatch):
    import solver.estimators as est_mod

    calls = []
    real = est_mod.solve

    def recording(problem, W, b, **kw):
        calls.append((kw["tol"], kw["max_iter"]))
        return real(problem, W, b, **kw)

    monkeypatch.setattr(est_mod, "solve", recording)
    X, y = small_problem(seed=5)
    clf = ConvexMLPClassifier(gates=6, lam="auto", n_lams=4, max_iter=1000, random_state=0)
    clf.fit(X, y)
    assert calls[:4] == [(1e-3, 200)] * 4  # the path: enough to rank lam
    assert calls[4:] == [(1e-6, 1000)]  # the fit at the chosen lam: the full budget
    assert clf.duality_gap_ <= 1e-6


def test_regressor_fits_a_relu_shaped_target():
    rng = np.random.default_rng(15)
    X = rng.standard_normal((200, 2))
    y = np.maximum(X[:, 0], 0) - np.maximum(X[:, 1], 0)
    reg = ConvexMLPRegressor(gates=32, lam=1e-4, random_state=0).fit(X, y)
    assert reg.score(X, y) > 0.95


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_fit_on_the_gpu_and_match_the_cpu():
    X, y = small_problem(seed=16, n=200)
    cpu = ConvexMLPClassifier(gates=16, lam=0.01, random_state=0).fit(X, y)
    Xg = torch.as_tensor(X, device="cuda")
    gpu = ConvexMLPClassifier(gates=16, lam=0.01, random_state=0).fit(Xg, y)
    assert gpu.weights_.device.type == "cuda"
    assert gpu.duality_gap_ <= 1e-6
    assert gpu.objective_ == pytest.approx(cpu.objective_, rel=1e-5)
    assert np.array_equal(gpu.predict(Xg), cpu.predict(X))
