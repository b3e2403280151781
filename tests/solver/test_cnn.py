"""The convex CNN head: its operator against an explicit sum over patches, its optimum against
CVXPY (Clarabel), lam_max, the recovered Conv2d networks, storage and input checks."""

import json
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from solver.cnn import ConvexCNNClassifier, project_channels
from solver.cnn_operator import ConvGeometry, ConvOperator
from solver.estimators import ConvergenceWarning


def feature_maps(seed: int, n: int = 12, C: int = 2, H: int = 4, n_classes: int = 3):
    """Random maps whose label depends on a ReLU of local channel mixes (learnable by the head)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, C, H, H))
    w = rng.standard_normal((C, n_classes))
    score = np.maximum(np.einsum("nchw,ck->nkhw", X, w), 0).mean(axis=(2, 3))
    y = np.argmax(score + 0.2 * rng.standard_normal((n, n_classes)), axis=1)
    return X, y


def explicit_patches(X: np.ndarray, k: int, s: int, q: int, intercept: bool) -> np.ndarray:
    """(n, B, h) by loops over positions: channel-major, then ky, kx; a trailing 1 if intercept."""
    n, _, H, W = X.shape
    Xp = np.pad(X, ((0, 0), (0, 0), (q, q), (q, q)))
    rows = []
    for top in range(0, H + 2 * q - k + 1, s):
        for left in range(0, W + 2 * q - k + 1, s):
            rows.append(Xp[:, :, top : top + k, left : left + k].reshape(n, -1))
    P = np.stack(rows, axis=1)
    return np.concatenate([P, np.ones((n, P.shape[1], 1))], axis=2) if intercept else P


def explicit_masks(P: np.ndarray, gates: np.ndarray, gate_bias: np.ndarray, intercept: bool):
    """D (n, B, p) = 1[x_b . g_j + g0_j >= 0]."""
    body = P[:, :, :-1] if intercept else P
    return body @ gates.reshape(len(gates), -1).T + gate_bias >= 0


def explicit_phi(P: np.ndarray, D: np.ndarray) -> np.ndarray:
    """phi (n, p, h) = (1/B) sum_b D[:, b, j] x_b."""
    return np.einsum("nbj,nbh->njh", D.astype(float), P) / P.shape[1]


def head_inputs(clf: ConvexCNNClassifier, X: np.ndarray):
    P = explicit_patches(X, clf.kernel_size, clf.stride, clf.padding, clf.fit_intercept)
    D = explicit_masks(P, clf.gates_.numpy(), clf.gate_bias_.numpy(), clf.fit_intercept)
    return P, D


def cvxpy_cnn(P, D, Y, lam, loss, penalty, fit_intercept=True):
    """The same programs written out in CVXPY: gated (penalty 'nuclear' / 'frobenius') or the
    exact ReLU one ('relu': per-class split neurons kept in the cone of every position)."""
    n, B, h = P.shape
    p, c = D.shape[2], Y.shape[1]
    phi = explicit_phi(P, D)
    b = cp.Variable(c) if fit_intercept else np.zeros(c)
    F = np.ones((n, 1)) @ cp.reshape(b, (1, c), order="C")
    cons, reg = [], 0
    for j in range(p):
        if penalty == "relu":
            V, W = cp.Variable((h, c)), cp.Variable((h, c))
            F = F + phi[:, j] @ (V - W)
            K = ((2 * D[:, :, j] - 1)[:, :, None] * P).reshape(n * B, h)
            cons += [K @ V >= 0, K @ W >= 0]
            reg = reg + cp.sum(cp.norm(V, axis=0)) + cp.sum(cp.norm(W, axis=0))
        else:
            Z = cp.Variable((h, c))
            F = F + phi[:, j] @ Z
            reg = reg + (cp.normNuc(Z) if penalty == "nuclear" else cp.norm(Z, "fro"))
    if loss == "squared":
        fit = cp.sum_squares(F - Y) / (2 * n)
    else:
        fit = cp.sum(cp.log_sum_exp(F, axis=1) - cp.sum(cp.multiply(Y, F), axis=1)) / n
    prob = cp.Problem(cp.Minimize(fit + lam * reg), cons)
    prob.solve(solver=cp.CLARABEL)
    return prob.value


# -- the operator -----------------------------------------------------------------------------
@pytest.mark.parametrize("k, s, q, intercept", [(2, 1, 0, False), (3, 2, 1, True), (1, 1, 0, True)])
def test_operator_equals_the_explicit_sum_and_its_adjoint(k, s, q, intercept):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 2, 4, 4))
    gates, g0 = rng.standard_normal((12, 2, k, k)), rng.standard_normal(12)
    geo = ConvGeometry(k, s, q, intercept)
    Xt = torch.as_tensor(X)
    masks = geo.masks(Xt, torch.as_tensor(gates), torch.as_tensor(g0))
    P = explicit_patches(X, k, s, q, intercept)
    D = explicit_masks(P, gates, g0, intercept)
    assert np.array_equal(masks.numpy(), D.transpose(0, 2, 1))
    Z = rng.standard_normal((12, P.shape[2], 3))
    V = rng.standard_normal((8, 3))
    # sum_j sum_b D_jb X_b Z_j / B, one term at a time.
    want = sum(D[:, b, j, None] * (P[:, b] @ Z[j]) for j in range(12) for b in range(P.shape[1]))
    want = want / P.shape[1]
    for Xin in (Xt, Xt.contiguous(memory_format=torch.channels_last)):
        for ones in (True, False):
            rows = geo.patch_rows(Xin, ones=ones).numpy()
            assert np.array_equal(rows, P if ones or not intercept else P[:, :, :-1])
    cached = ConvOperator(Xt, masks, geo)
    blocked = ConvOperator(Xt, masks, geo, cache_bytes=0, max_elems=40)  # many small blocks
    last = ConvOperator(Xt.contiguous(memory_format=torch.channels_last), masks, geo)
    assert cached.cached and not blocked.cached
    for op in (cached, blocked, last):
        AZ = op.matvec(torch.as_tensor(Z)).numpy()
        AtV = op.rmatvec(torch.as_tensor(V)).numpy()
        assert np.allclose(AZ, want, rtol=1e-13, atol=1e-13)
        assert np.sum(AZ * V) == pytest.approx(np.sum(Z * AtV), rel=1e-12)
    idx = torch.tensor([1, 5, 7])
    assert torch.allclose(
        cached.restrict(idx).matvec(torch.as_tensor(Z[idx.numpy()])),
        blocked.restrict(idx).matvec(torch.as_tensor(Z[idx.numpy()])),
    )


@pytest.mark.parametrize("max_elems", [1 << 22, 50])
def test_project_channels_is_the_1x1_convolution(max_elems):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 5, 3, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 5, 1, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    want = torch.nn.functional.conv2d(X, weight, bias)
    for Xin in (X, X.contiguous(memory_format=torch.channels_last)):
        got = project_channels(Xin, weight, bias, max_elems=max_elems)
        assert got.shape == want.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


# -- the optimum ------------------------------------------------------------------------------
def _onehot(y, k=3):
    return np.eye(k)[y]


@pytest.mark.parametrize("penalty", ["nuclear", "frobenius"])
@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_gated_objective_matches_cvxpy(loss, penalty):
    X, y = feature_maps(seed=1)
    clf = ConvexCNNClassifier(
        gates=6,
        kernel_size=2,
        lam=0.02,
        loss=loss,
        penalty=penalty,
        n_components=None,
        random_state=0,
        tol=1e-8,
        max_iter=20000,
    ).fit(X, y)
    P, D = head_inputs(clf, X)
    ref = cvxpy_cnn(P, D, _onehot(y), 0.02, loss, penalty)
    assert clf.duality_gap_ <= 1e-8
    assert clf.objective_ == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_relu_objective_matches_cvxpy(loss):
    """The augmented Lagrangian reaches a gap and violation of 1e-7 on this program."""
    X, y = feature_maps(seed=2, n=10, n_classes=2)
    clf = ConvexCNNClassifier(
        activation="relu",
        gates=4,
        kernel_size=2,
        lam=0.02,
        loss=loss,
        n_components=None,
        random_state=0,
        tol=1e-7,
        max_iter=30000,
    ).fit(X, y)
    P, D = head_inputs(clf, X)
    ref = cvxpy_cnn(P, D, _onehot(y, 2), 0.02, loss, "relu")
    assert clf.converged_ and clf.constraint_violation_ <= 1e-7
    assert clf.objective_ == pytest.approx(ref, rel=1e-5)


# -- lam_max ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"penalty": "nuclear"},
        {"penalty": "frobenius", "loss": "squared"},
        {"penalty": "nuclear", "kernel_size": 3, "padding": 1},
    ],
)
def test_lam_at_lam_max_gives_exactly_zero_and_below_does_not(kwargs):
    X, y = feature_maps(seed=3)
    common = {"gates": 6, "n_components": None, "random_state": 0, **kwargs}
    probe = ConvexCNNClassifier(lam=1.0, **common).fit(X, y)
    at = ConvexCNNClassifier(lam=probe.lam_max_, **common).fit(X, y)
    assert bool((at.weights_ == 0).all()) and at.n_neurons_ == 0
    below = ConvexCNNClassifier(lam=0.95 * probe.lam_max_, **common).fit(X, y)
    assert below.n_neurons_ > 0


def test_relu_lam_max_gives_zero():
    X, y = feature_maps(seed=3, n=8, n_classes=2)
    common = {"activation": "relu", "gates": 3, "n_components": None, "random_state": 0}
    probe = ConvexCNNClassifier(lam=1.0, **common).fit(X, y)
    at = ConvexCNNClassifier(lam=probe.lam_max_, **common).fit(X, y)
    assert bool((at.weights_ == 0).all())


# -- recovered networks -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n_components": 3, "penalty": "frobenius"},
        {"n_components": 3, "kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "padding": 1, "stride": 2, "fit_intercept": False, "loss": "squared"},
        {"activation": "relu", "n_components": 3, "kernel_size": 3, "padding": 1, "max_iter": 600},
        {"activation": "relu", "max_iter": 600},
    ],
)
def test_to_torch_reproduces_the_decision_function(kwargs):
    X, y = feature_maps(seed=4, C=4, H=5)
    common = {"gates": 8, "lam": 0.01, "random_state": 0, "n_components": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the relu fits are cut short
        clf = ConvexCNNClassifier(**{**common, **kwargs}).fit(X, y)
    net = clf.to_torch()
    assert isinstance(net, torch.nn.Module)
    layers = {type(m) for m in net.modules()}
    if clf.activation == "relu":
        assert {torch.nn.Conv2d, torch.nn.ReLU, torch.nn.AdaptiveAvgPool2d} <= layers
        assert clf.constraint_violation_ < 1e-2
    Xt = torch.as_tensor(X)
    assert torch.allclose(net(Xt), clf.decision_function(X), atol=1e-10)
    assert net(Xt.float()).dtype == clf.weights_.dtype  # raw float32 maps are accepted
    fresh = feature_maps(seed=40, C=4, H=5)[0]
    assert torch.allclose(net(torch.as_tensor(fresh)), clf.decision_function(fresh), atol=1e-10)


def test_recovered_gated_network_has_the_convex_objective():
    """CE + lam/2 (||conv||^2 + ||linear||^2) of the recovered gated CNN (conv biases in the
    conv, output bias unpenalized) equals the nuclear-norm objective."""
    X, y = feature_maps(seed=5)
    lam = 0.01
    clf = ConvexCNNClassifier(
        gates=8, kernel_size=2, lam=lam, n_components=None, random_state=0
    ).fit(X, y)
    net = clf.to_torch()
    ce = torch.nn.functional.cross_entropy(net(torch.as_tensor(X)), torch.as_tensor(y))
    decay = sum(t.square().sum() for t in (net.value.weight, net.value.bias, net.output.weight))
    assert float(ce + lam / 2 * decay) == pytest.approx(clf.objective_, rel=1e-9)


# -- storage, input checks, warnings ----------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    X, y = feature_maps(seed=6, C=4)
    y = np.array(["cat", "dog", "emu"])[y]
    clf = ConvexCNNClassifier(
        gates=6, kernel_size=3, padding=1, lam=0.01, n_components=2, random_state=0
    ).fit(X, y)
    clf.save(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "head.json",
        "tensors.safetensors",
    ]
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["class"] == "ConvexCNNClassifier" and meta["classes"] == ["cat", "dog", "emu"]
    again = ConvexCNNClassifier.load(tmp_path / "head")
    assert np.array_equal(again.predict(X), clf.predict(X))
    assert np.allclose(again.predict_proba(X), clf.predict_proba(X))
    assert again.duality_gap_ == clf.duality_gap_ and again.n_neurons_ == clf.n_neurons_
    assert torch.equal(again.components_, clf.components_)


@pytest.mark.parametrize(
    "kwargs, X, y, message",
    [
        ({}, np.ones((4, 8)), [0, 1, 0, 1], "4-dimensional"),
        ({"kernel_size": 5}, np.ones((4, 2, 3, 3)), [0, 1, 0, 1], "kernel_size"),
        ({"n_components": 3}, np.ones((4, 2, 3, 3)), [0, 1, 0, 1], "n_components"),
        (
            {"n_components": None, "gates": np.ones((3, 5, 1, 1))},
            np.ones((4, 2, 3, 3)),
            [0, 1, 0, 1],
            "gates must have shape",
        ),
        ({}, np.ones((4, 2, 3, 3)), [0, 1, 0], "samples"),
        ({"stride": 0}, np.ones((4, 2, 3, 3)), [0, 1, 0, 1], "stride"),
        ({"activation": "tanh"}, np.ones((4, 2, 3, 3)), [0, 1, 0, 1], "activation"),
        ({}, np.where(np.eye(3) > 0, np.nan, 1.0) * np.ones((4, 2, 3, 3)), [0, 1, 0, 1], "NaN"),
        ({}, np.full((4, 2, 3, 3), -np.inf), [0, 1, 0, 1], "NaN or infinite"),
    ],
)
def test_bad_input_is_refused_clearly(kwargs, X, y, message):
    with pytest.raises(ValueError, match=message):
        ConvexCNNClassifier(**kwargs).fit(X, y)


def test_finite_maps_whose_sum_overflows_are_accepted():
    # The cheap check (is the sum finite?) fails here; the entry-wise one must then accept.
    X = np.full((4, 2, 3, 3), 3e38, dtype=np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(X.sum(dtype=np.float32))
    assert ConvexCNNClassifier()._feature_map(X).shape == (4, 2, 3, 3)


def test_predict_refuses_other_channels_and_unfitted():
    X, y = feature_maps(seed=7)
    with pytest.raises(RuntimeError, match="not fitted"):
        ConvexCNNClassifier().predict(X)
    clf = ConvexCNNClassifier(gates=4, lam=0.01, n_components=None, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="channels"):
        clf.predict(X[:, :1])
    with pytest.raises(ValueError, match="4-dimensional"):
        clf.predict(X[0])


def test_gates_array_is_used_as_given():
    X, y = feature_maps(seed=8)
    G = np.random.default_rng(0).standard_normal((5, 2, 1, 1))
    clf = ConvexCNNClassifier(gates=G, lam=0.01, n_components=None).fit(X, y)
    assert all(any(np.allclose(k, g) for g in G) for k in clf.gates_.numpy())
    assert bool((clf.gate_bias_ == 0).all())


def test_convergence_warning_and_progress():
    X, y = feature_maps(seed=9)
    seen = []
    with pytest.warns(ConvergenceWarning):
        clf = ConvexCNNClassifier(
            gates=8, lam=1e-3, max_iter=3, n_components=None, random_state=0
        ).fit(X, y, progress=lambda f, info: seen.append(f))
    assert not clf.converged_ and clf.duality_gap_ > clf.tol
    assert seen[-1] == 1.0


def test_lam_auto_picks_from_a_warm_started_path():
    X, y = feature_maps(seed=10, n=40)
    clf = ConvexCNNClassifier(
        gates=6, lam="auto", n_lams=4, lam_min_ratio=0.05, n_components=None, random_state=0
    )
    clf.fit(X, y)
    lams = [row["lam"] for row in clf.path_]
    assert lams == sorted(lams, reverse=True) and lams[0] == pytest.approx(clf.lam_max_)
    assert clf.lam_ == min(clf.path_, key=lambda r: r["validation_loss"])["lam"]


def test_float32_maps_are_polished_to_the_certificate():
    X, y = feature_maps(seed=11)
    kw = {"gates": 8, "lam": 0.01, "n_components": None, "random_state": 0}
    clf64 = ConvexCNNClassifier(**kw).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf32 = ConvexCNNClassifier(**kw).fit(X.astype(np.float32), y)
    assert clf32.duality_gap_ <= 1e-6
    assert clf32.objective_ == pytest.approx(clf64.objective_, rel=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_fit_on_the_gpu_and_match_the_cpu():
    X, y = feature_maps(seed=12, n=40, C=6, H=5)
    kw = {"gates": 16, "lam": 0.01, "n_components": 4, "kernel_size": 3, "padding": 1}
    cpu = ConvexCNNClassifier(random_state=0, **kw).fit(X, y)
    Xg = torch.as_tensor(X, device="cuda")
    gpu = ConvexCNNClassifier(random_state=0, **kw).fit(Xg, y)
    assert gpu.weights_.device.type == "cuda" and gpu.duality_gap_ <= 1e-6
    assert gpu.objective_ == pytest.approx(cpu.objective_, rel=1e-5)
    assert np.array_equal(gpu.predict(Xg), cpu.predict(X))
    assert torch.allclose(gpu.to_torch()(Xg), gpu.decision_function(Xg), atol=1e-10)
