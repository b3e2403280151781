"""The convex attention head: lifting identities, agreement with CVXPY, lam_max, recovery of the
multi-head network, a nonconvex fit that cannot beat the convex optimum, save/load, errors."""

import json
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from solver.attention import ConvexAttentionClassifier, fit_projection
from solver.attention_operator import (
    BlockNuclear,
    GatedAttentionOperator,
    LinearAttentionOperator,
    pairs,
)
from solver.estimators import ConvergenceWarning

# -- independent references -------------------------------------------------------------------


def explicit_head(z, W1, W2, H=None):
    """Logits 1/T sum_t 1/T sum_s sigma(z_t^T W1 z_s) z_s^T W2, one sample at a time."""
    n, T, _ = z.shape
    out = np.zeros((n, W2.shape[1]))
    for i in range(n):
        S = z[i] @ W1 @ z[i].T
        if H is not None:
            S = S * (z[i] @ H @ z[i].T >= 0)
        out[i] = (S @ z[i] @ W2).sum(axis=0) / T**2
    return out


def explicit_features(z, H=None):
    """phi[i, a, k, l] = 1/T^2 sum_{t,s} m_ts z_t[a] z_s[k] z_s[l], by loops over t and s."""
    n, T, d = z.shape
    phi = np.zeros((n, d, d, d))
    for i in range(n):
        for t in range(T):
            for s in range(T):
                if H is None or z[i, t] @ H @ z[i, s] >= 0:
                    phi[i] += np.einsum("a,k,l->akl", z[i, t], z[i, s], z[i, s])
    return phi.reshape(n, d**3) / T**2


def cvxpy_optimum(z, Y, gates, lam, loss):
    """min loss(sum_g Phi_g vec(Z_g) + 1 b^T) + lam sum_g ||Z_g||_* with Clarabel."""
    n, _, d = z.shape
    c = Y.shape[1]
    feats = [explicit_features(z)] if gates is None else [explicit_features(z, H) for H in gates]
    Zs = [cp.Variable((d * d, d * c)) for _ in feats]
    b = cp.Variable(c)
    F = sum(P @ cp.reshape(Z, (d**3, c), order="C") for P, Z in zip(feats, Zs, strict=True))
    F = F + np.ones((n, 1)) @ cp.reshape(b, (1, c), order="C")
    if loss == "squared":
        fit = cp.sum_squares(F - Y) / (2 * n)
    else:
        fit = cp.sum(cp.log_sum_exp(F, axis=1) - cp.sum(cp.multiply(Y, F), axis=1)) / n
    prob = cp.Problem(cp.Minimize(fit + lam * sum(cp.normNuc(Z) for Z in Zs)))
    prob.solve(solver=cp.CLARABEL)
    return prob.value


def lifted(W1, W2):
    """Z[(a,k),(l,e)] = W1[a,k] W2[l,e] for heads W1 (m, d, d), W2 (m, d, c)."""
    m, d, c = W2.shape
    return torch.einsum("jak,jle->jakle", W1, W2).reshape(m, d * d, d * c)


def tiny(seed=0, n=6, T=3, d=2, c=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, d))
    y = rng.permutation(np.arange(n) % c)
    return X, y


def with_one(X):
    return np.concatenate([X, np.ones((*X.shape[:2], 1))], axis=2)


# -- operators ---------------------------------------------------------------------------------


def test_lifted_heads_equal_explicit_attention():
    gen = torch.Generator().manual_seed(0)
    n, T, d, c, m = 5, 4, 3, 2, 3
    z = torch.randn(n, T, d, generator=gen, dtype=torch.float64)
    W1 = torch.randn(m, d, d, generator=gen, dtype=torch.float64)
    W2 = torch.randn(m, d, c, generator=gen, dtype=torch.float64)
    H = torch.randn(m, d, d, generator=gen, dtype=torch.float64)
    zn, Z = z.numpy(), lifted(W1, W2)
    want = sum(explicit_head(zn, W1[j].numpy(), W2[j].numpy()) for j in range(m))
    linear = LinearAttentionOperator(z)
    assert np.allclose(linear.matvec(Z.sum(0, keepdim=True)).numpy(), want, atol=1e-13)
    gated = sum(explicit_head(zn, W1[j].numpy(), W2[j].numpy(), H[j].numpy()) for j in range(m))
    for op in (GatedAttentionOperator(z, H), GatedAttentionOperator(z, H, max_feature_elems=0)):
        assert np.allclose(op.matvec(Z).numpy(), gated, atol=1e-13)
    # ||Z||_* of one head is ||W1||_F ||W2||_F (a rank-one lifting).
    assert BlockNuclear().norms(Z[:1]).item() == pytest.approx(
        (W1[0].norm() * W2[0].norm()).item(), rel=1e-12
    )


def test_adjoints_and_kronecker_form():
    gen = torch.Generator().manual_seed(1)
    n, T, d, c, g = 6, 3, 3, 4, 5
    z = torch.randn(n, T, d, generator=gen, dtype=torch.float64)
    H = torch.randn(g, d, d, generator=gen, dtype=torch.float64)
    R = torch.randn(n, c, generator=gen, dtype=torch.float64)
    linear = LinearAttentionOperator(z)
    # A*(R) = sum_i (zbar_i (x) S_i) (x) r_i^T with rows (a, k) and columns (l, e).
    zbar, S = z.mean(1), z.transpose(1, 2) @ z / T
    kron = sum(torch.kron(torch.kron(zbar[i, :, None], S[i]), R[i, None, :]) for i in range(n))
    assert torch.allclose(linear.rmatvec(R)[0], kron, atol=1e-14)
    cached, streamed = (
        GatedAttentionOperator(z, H),
        GatedAttentionOperator(z, H, max_feature_elems=0),
    )
    assert streamed.phi is None
    assert torch.allclose(cached.rmatvec(R), streamed.rmatvec(R), atol=1e-14)
    for op, p in ((linear, 1), (cached, g)):
        W = torch.randn(p, d * d, d * c, generator=gen, dtype=torch.float64)
        lhs = (op.matvec(W) * R).sum()
        assert lhs.item() == pytest.approx((W * op.rmatvec(R)).sum().item(), rel=1e-13)
    # A zero gate opens every mask (scores 0 >= 0): gated attention becomes linear attention.
    zero = GatedAttentionOperator(z, torch.zeros(1, d, d, dtype=torch.float64))
    assert torch.allclose(zero.rmatvec(R), linear.rmatvec(R), atol=1e-14)
    # The features are the explicit loop over query and key pairs.
    # (kept on the pairs k <= l: the features are symmetric in k and l)
    kl, lk = pairs(d)
    full = explicit_features(z.numpy(), H[2].numpy()).reshape(n, d, d * d)
    assert np.allclose(full[:, :, kl], full[:, :, lk], atol=1e-14)
    phi = cached.phi.view(n, g, d, -1)[:, 2].numpy()
    assert np.allclose(phi, full[:, :, kl], atol=1e-14)
    # A restricted operator is the operator on those gates.
    idx = torch.tensor([3, 1])
    W = torch.randn(2, d * d, d * c, generator=gen, dtype=torch.float64)
    assert torch.allclose(
        cached.restrict(idx).matvec(W), GatedAttentionOperator(z, H[idx]).matvec(W), atol=1e-14
    )


@pytest.mark.parametrize("shape", [(3, 9, 6), (3, 6, 9)])
def test_block_nuclear_prox_is_singular_value_thresholding(shape):
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(*shape, generator=gen, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(V, full_matrices=False)
    want = U @ torch.diag_embed((s - 1.5).clamp_min(0)) @ Vh
    assert torch.allclose(BlockNuclear().prox(V, 1.5), want, atol=1e-13)
    assert torch.equal(BlockNuclear().prox(V, float(s.max()) * 1.0001), torch.zeros_like(V))
    assert torch.allclose(BlockNuclear().prox(V.float(), 1.5), want.float(), atol=1e-5)


# -- the program's optimum -------------------------------------------------------------------


# The squared loss needs a few thousand iterations on these tiny programs (seconds each).
@pytest.mark.parametrize("loss", ["cross_entropy", pytest.param("squared", marks=pytest.mark.slow)])
@pytest.mark.parametrize("attention", ["linear", "gated_relu"])
def test_objective_matches_cvxpy(attention, loss):
    X, y = tiny(seed=3)
    clf = ConvexAttentionClassifier(
        attention=attention,
        gates=4,
        n_components=None,
        lam=0.02,
        loss=loss,
        random_state=0,
        tol=1e-8,
        max_iter=50000,
    ).fit(X, y)
    gates = None if clf.gates_ is None else clf.gates_.numpy()
    ref = cvxpy_optimum(with_one(X), np.eye(3)[y], gates, 0.02, loss)
    assert clf.duality_gap_ <= 1e-8
    assert clf.objective_ == pytest.approx(ref, rel=1e-5)
    assert clf.n_heads_ >= 1


@pytest.mark.parametrize("attention", ["linear", "gated_relu"])
def test_lam_max_is_exact(attention):
    X, y = tiny(seed=4, n=12, T=4, d=3)
    kw = dict(attention=attention, gates=3, n_components=2, random_state=1, max_iter=20000)
    lam_max = ConvexAttentionClassifier(lam=1.0, **kw).fit(X, y).lam_max_
    for lam in (lam_max, 2 * lam_max):
        at = ConvexAttentionClassifier(lam=lam, **kw).fit(X, y)
        assert torch.count_nonzero(at.weights_) == 0
        assert at.n_heads_ == 0
    below = ConvexAttentionClassifier(lam=0.98 * lam_max, **kw).fit(X, y)
    assert below.n_heads_ >= 1


# -- recovery ---------------------------------------------------------------------------------


def nonconvex_objective(net, X, y, lam):
    logits = net(torch.as_tensor(X))
    W1 = net.query @ net.key.transpose(1, 2)
    W2 = net.value @ net.out
    decay = 0.5 * lam * (W1.square().sum() + W2.square().sum())
    return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)) + decay)


@pytest.mark.parametrize("attention", ["linear", "gated_relu"])
def test_recovered_network_reproduces_predictions_and_objective(attention):
    X, y = tiny(seed=5, n=20, T=5, d=6)
    clf = ConvexAttentionClassifier(
        attention=attention, gates=3, n_components=3, lam=3e-3, random_state=2, max_iter=20000
    ).fit(X, y)
    net = clf.to_torch()
    assert net.n_heads == clf.n_heads_ >= 2
    assert torch.allclose(net(torch.as_tensor(X)), clf.decision_function(X), atol=1e-10)
    assert nonconvex_objective(net, X, y, clf.lam_) == pytest.approx(clf.objective_, rel=1e-9)
    assert np.allclose(net(torch.as_tensor(X)).softmax(1).numpy(), clf.predict_proba(X))
    assert clf.duality_gap_ <= 1e-6


def test_nonconvex_multihead_fit_does_not_beat_the_convex_optimum():
    X, y = tiny(seed=6)
    lam = 0.02
    clf = ConvexAttentionClassifier(n_components=None, lam=lam, tol=1e-9, max_iter=50000).fit(X, y)
    z = torch.as_tensor(with_one(X))
    yt = torch.as_tensor(y)
    _, T, d = z.shape
    best = np.inf
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        W1 = (0.3 * torch.randn(6, d, d, generator=gen, dtype=torch.float64)).requires_grad_()
        W2 = (0.3 * torch.randn(6, d, 3, generator=gen, dtype=torch.float64)).requires_grad_()
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [W1, W2, b],
            max_iter=1000,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def objective(W1=W1, W2=W2, b=b):
            scores = torch.einsum("ntd,jde,nse->njts", z, W1, z) / T
            logits = torch.einsum("njts,nsd,jdc->nc", scores, z, W2) / T + b
            decay = 0.5 * lam * (W1.square().sum() + W2.square().sum())
            return torch.nn.functional.cross_entropy(logits, yt) + decay

        def closure(objective=objective, opt=opt):
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            best = min(best, float(objective()))
    assert best >= clf.objective_ * (1 - 1e-8)
    # Multi-head attention is a factorization of the convex program: no spurious minima here.
    assert best == pytest.approx(clf.objective_, rel=1e-4)


# -- estimator API ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["linear", "gated_relu"])
def test_save_load_round_trip(tmp_path, attention):
    X, y = tiny(seed=7, n=15, T=4, d=5)
    labels = np.array(["cat", "dog", "eel"])[y]
    clf = ConvexAttentionClassifier(
        attention=attention, gates=2, n_components=3, lam=1e-2, random_state=0
    ).fit(X, labels)
    clf.save(tmp_path / "head")
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["class"] == "ConvexAttentionClassifier"
    back = ConvexAttentionClassifier.load(tmp_path / "head")
    assert torch.equal(back.decision_function(X), clf.decision_function(X))
    assert list(back.predict(X)) == list(clf.predict(X))
    assert back.get_params() == clf.get_params()
    assert back.duality_gap_ == clf.duality_gap_ and back.n_heads_ == clf.n_heads_
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "head.json",
        "tensors.safetensors",
    ]


def test_float32_tokens_are_polished_in_float64_and_report_progress():
    X, y = tiny(seed=8, n=30, T=4, d=8)
    seen = []
    clf = ConvexAttentionClassifier(n_components=4, lam=1e-2, random_state=0).fit(
        X.astype(np.float32), y, progress=lambda f, info: seen.append(f)
    )
    assert clf.weights_.dtype == torch.float64
    assert clf.duality_gap_ <= 1e-6 and clf.converged_
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert clf.score(X, y) == clf.score(X.astype(np.float32), y)


def test_max_iter_warns():
    X, y = tiny(seed=9, n=30, T=4, d=8)
    with pytest.warns(ConvergenceWarning):
        clf = ConvexAttentionClassifier(n_components=4, lam=1e-4, max_iter=5).fit(X, y)
    assert not clf.converged_ and clf.n_iter_ == 5


def test_auto_lam_walks_the_path():
    X, y = tiny(seed=10, n=30, T=4, d=5)
    clf = ConvexAttentionClassifier(
        n_components=3, lam="auto", n_lams=4, lam_min_ratio=1e-2, random_state=0
    ).fit(X, y)
    lams = [p["lam"] for p in clf.path_]
    assert lams[0] == pytest.approx(clf.lam_max_) and len(lams) == 4
    assert clf.lam_ == min(clf.path_, key=lambda r: r["validation_loss"])["lam"]
    assert clf.duality_gap_ <= 1e-6


def test_bad_inputs_raise_clear_errors():
    X, y = tiny(seed=11, n=10, T=3, d=4)
    clf = ConvexAttentionClassifier(n_components=2, lam=1e-2)
    with pytest.raises(ValueError, match="3-dimensional"):
        clf.fit(X[:, 0], y)
    with pytest.raises(ValueError, match="samples but y has"):
        clf.fit(X, y[:-1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        clf.fit(X, np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(np.where(X > 1, np.nan, X), y)
    with pytest.raises(RuntimeError, match="not fitted"):
        clf.predict(X)
    for bad in (
        {"attention": "softmax"},
        {"gates": 0},
        {"n_components": 0},
        {"lam": -1.0},
        {"loss": "hinge"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ConvexAttentionClassifier(**bad).fit(X, y)
    clf.fit(X, y)
    with pytest.raises(ValueError, match="features per token"):
        clf.predict(X[:, :, :3])
    assert clf.predict(X[:, :2]).shape == (10,)  # any number of tokens


@pytest.mark.parametrize("d", [6, 300])
def test_projection_does_not_depend_on_the_eigensolvers_signs(monkeypatch, d):
    # LAPACK and cuSOLVER return eigen- and singular vectors with different signs; gates act on
    # the projected tokens, so a sign that followed the solver changed the program on a GPU
    # (a gated fit's objective differed by 3 % from the CPU's).
    X, y = tiny(seed=5, n=30, T=4, d=d)
    kw = dict(attention="gated_relu", gates=3, n_components=3, lam=1e-2, random_state=0)
    ref = ConvexAttentionClassifier(**kw).fit(X, y)
    eigh, svd = torch.linalg.eigh, torch.linalg.svd

    def flipped_eigh(A, *a, **k):
        w, V = eigh(A, *a, **k)
        return torch.return_types.linalg_eigh((w, -V))

    def flipped_svd(A, *a, **k):
        U, S, Vh = svd(A, *a, **k)
        return torch.return_types.linalg_svd((-U, S, -Vh))

    monkeypatch.setattr(torch.linalg, "eigh", flipped_eigh)
    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    other = ConvexAttentionClassifier(**kw).fit(X, y)
    assert torch.equal(other.projection_, ref.projection_)
    assert other.objective_ == pytest.approx(ref.objective_, rel=1e-12)
    P = ref.projection_
    assert bool((P[P.abs().argmax(dim=0), torch.arange(P.shape[1])] > 0).all())


def test_projection_draws_its_tokens_whatever_the_layout(monkeypatch):
    # Above PCA_MAX_TOKENS the projection is fitted on a seeded draw of tokens, gathered from X
    # as it is laid out: a transposed view gives the projection of the same values stored
    # contiguously, which is fit_projection's on the flattened tokens with the same seed.
    from solver import attention

    monkeypatch.setattr(attention, "PCA_MAX_TOKENS", 50)
    X, y = tiny(seed=6, n=20, T=5, d=6)
    Xt = torch.as_tensor(X)
    view = Xt.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not view.is_contiguous()
    kw = dict(n_components=3, lam=1e-2, max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = ConvexAttentionClassifier(**kw).fit(Xt, y)
        b = ConvexAttentionClassifier(**kw).fit(view, y)
    assert torch.equal(a.projection_, b.projection_)
    gen = torch.Generator().manual_seed(attention._seed(0, 1))
    mu, P = fit_projection(Xt.reshape(-1, 6), 3, gen)
    assert torch.equal(a.projection_, P)
    assert torch.equal(a.token_mean_, mu)


@pytest.mark.parametrize("d", [6, 300])
def test_projection_whitens_the_top_components(d):
    gen = torch.Generator().manual_seed(12)
    scales = torch.cat([torch.tensor([9.0, 7.0, 5.0]), 0.1 * torch.ones(d - 3)])
    X = torch.randn(400, d, generator=gen, dtype=torch.float64) * scales + 3.0
    mu, P = fit_projection(X, 3, torch.Generator().manual_seed(0))
    Z = (X - mu) @ P
    assert torch.allclose(Z.T @ Z / len(X), torch.eye(3, dtype=torch.float64), atol=1e-6)
    # The directions are the coordinate axes of the three large scales.
    assert torch.allclose(P[3:].abs().sum(0), torch.zeros(3, dtype=torch.float64), atol=0.05)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["linear", "gated_relu"])
def test_cuda_tokens_fit_on_the_gpu_and_match_the_cpu(attention):
    X, y = tiny(seed=13, n=40, T=6, d=10)
    kw = dict(attention=attention, gates=3, n_components=4, lam=1e-2, random_state=0)
    cpu = ConvexAttentionClassifier(**kw).fit(X, y)
    gpu = ConvexAttentionClassifier(**kw).fit(torch.as_tensor(X, device="cuda"), y)
    assert gpu.weights_.device.type == "cuda" and gpu.duality_gap_ <= 1e-6
    assert gpu.objective_ == pytest.approx(cpu.objective_, rel=1e-5)
    Xg = torch.as_tensor(X, device="cuda")
    assert torch.allclose(gpu.to_torch()(Xg), gpu.decision_function(Xg), atol=1e-8)
