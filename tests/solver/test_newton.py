"""The Newton-CG polish: its Hessian products, and what it does to a certificate."""

import math

import numpy as np
import pytest
import torch

from solver.fista import fista
from solver.losses import CrossEntropyLoss, SquaredLoss
from solver.newton import _Local, applies, newton_polish
from solver.operator import GatedOperator
from solver.patterns import compute_patterns
from solver.penalties import GroupFrobenius, GroupNuclear
from solver.problem import Problem, certificate, zero_threshold


def _problem(loss, c: int, fit_bias: bool, ratio: float, seed: int = 0, n: int = 80, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    G = torch.randn(d, 12, generator=g, dtype=torch.float64)
    F = torch.relu(X @ torch.randn(d, 4, generator=g, dtype=torch.float64))
    F = F @ torch.randn(4, c, generator=g, dtype=torch.float64)
    if isinstance(loss, SquaredLoss):
        Y = F + 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)
    else:
        Y = torch.nn.functional.one_hot(F.argmax(dim=1), c).to(torch.float64)
    op = GatedOperator(X, compute_patterns(X, G))
    lam = ratio * zero_threshold(op, Y, loss, GroupFrobenius(), fit_bias)
    return Problem(op, Y, loss, GroupFrobenius(), lam, fit_bias)


@pytest.mark.parametrize("loss", [SquaredLoss(), CrossEntropyLoss()])
def test_hessian_products_match_autograd(loss):
    prob = _problem(loss, 3, True, 0.05)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(prob.op.n_gates, 5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    vw = torch.randn_like(w)
    vb = torch.randn_like(b)
    local = _Local(prob, w, b)

    def phi(w_, b_):
        return (
            loss.value(prob.op.matvec(w_) + b_, prob.Y)
            + prob.lam * torch.linalg.vector_norm(w_, dim=(1, 2)).sum()
        )

    gw, gb = torch.autograd.functional.jacobian(phi, (w, b))
    assert torch.allclose(local.gw, gw, atol=1e-12)
    assert torch.allclose(local.gb, gb, atol=1e-12)
    _, (hw, hb) = torch.autograd.functional.hvp(phi, (w, b), (vw, vb))
    mw, mb = local.hess(vw, vb)
    assert torch.allclose(mw, hw, atol=1e-10)
    assert torch.allclose(mb, hb, atol=1e-10)


@pytest.mark.parametrize(
    ("loss", "c", "fit_bias"), [(SquaredLoss(), 1, False), (CrossEntropyLoss(), 3, True)]
)
def test_polish_never_raises_the_objective_and_certifies_once_the_support_is_found(
    loss, c, fit_bias
):
    prob = _problem(loss, c, fit_bias, 0.02)
    W0 = torch.zeros(prob.op.n_gates, 5, c, dtype=torch.float64)
    rough = fista(prob, W0, prob.zero_bias(), tol=1e-12, max_iter=60)
    pol = newton_polish(prob, rough.W, rough.b, budget=2000)
    after = certificate(prob, pol.W, pol.b, prob.forward(pol.W))
    assert after.primal <= rough.cert.primal + 1e-12
    # From an iterate whose nonzero blocks are the optimal ones (gap 1e-5), Newton alone
    # certifies 1000 times tighter than where first-order steps had got.
    near = fista(prob, W0, prob.zero_bias(), tol=1e-5, max_iter=20000)
    assert 1e-9 < near.cert.gap <= 1e-5
    pol = newton_polish(prob, near.W, near.b, budget=2000)
    tight = certificate(prob, pol.W, pol.b, prob.forward(pol.W))
    assert pol.dropped == 0
    assert tight.gap < 1e-8
    assert pol.products < near.n_iter


def test_estimator_with_frobenius_certifies_far_below_default_tol():
    from solver import ConvexMLPClassifier

    rng = np.random.default_rng(0)
    X = rng.standard_normal((150, 6))
    y = (np.maximum(X[:, 0], 0) - np.maximum(X[:, 1], 0) > 0.1).astype(int)
    est = ConvexMLPClassifier(gates=24, lam=1e-3, penalty="frobenius", random_state=0).fit(X, y)
    assert est.converged_
    assert est.duality_gap_ <= 1e-6


def test_applies_only_where_the_penalty_is_smooth_on_nonzero_blocks():
    sq = _problem(SquaredLoss(), 1, False, 0.1)
    assert applies(sq)
    nuc1 = Problem(sq.op, sq.Y, sq.loss, GroupNuclear(), sq.lam, False)
    assert applies(nuc1)
    ce = _problem(CrossEntropyLoss(), 3, True, 0.1)
    nuc3 = Problem(ce.op, ce.Y, ce.loss, GroupNuclear(), ce.lam, True)
    assert not applies(nuc3)


def _cg_iterations(local, precond, tol: float = 1e-8) -> int:
    """Iterations conjugate gradients take to a relative residual of tol on H d = -g."""
    from solver import newton

    dw, db, k = newton._cg(local.hess, local.gw, local.gb, 500, precond, rtol=tol)
    hw, hb = local.hess(dw, db)
    res = torch.cat([(hw + local.gw).reshape(-1), hb + local.gb])
    g = torch.cat([local.gw.reshape(-1), local.gb])
    assert float(res.norm() / g.norm()) < 10 * tol
    return k


def _active_point(prob, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    c = prob.Y.shape[1]
    w = torch.randn(prob.op.n_gates, prob.op.X.shape[1], c, generator=g, dtype=torch.float64)
    b = torch.zeros(c, dtype=torch.float64) if not prob.fit_bias else 0.1 * torch.ones(c)
    # Blocks of very different sizes, as at a solution: the penalty's curvature lam/||W_i||
    # then spans orders of magnitude.
    scales = torch.logspace(-3, 0, prob.op.n_gates, dtype=torch.float64)
    return _Local(prob, w * scales.view(-1, 1, 1), b.to(torch.float64))


@pytest.mark.parametrize("c", [1, 3])
def test_row_preconditioner_makes_the_squared_loss_newton_system_a_two_step_solve(c):
    prob = _problem(SquaredLoss(), c, False, 0.05, n=60, d=6)
    local = _active_point(prob)
    plain = _cg_iterations(local, None)
    pre = _cg_iterations(local, local.preconditioner())
    assert pre <= 3 < 10 <= plain


def test_row_preconditioner_on_a_row_subsample_and_on_cross_entropy_still_helps(monkeypatch):
    from solver import newton

    prob = _problem(CrossEntropyLoss(), 3, True, 0.05, n=60, d=6)
    local = _active_point(prob)
    plain = _cg_iterations(local, None)
    assert _cg_iterations(local, local.preconditioner()) < plain / 2
    sq = _problem(SquaredLoss(), 1, False, 0.05, n=60, d=6)
    local = _active_point(sq)
    monkeypatch.setattr(newton, "EXACT_ROWS", 30)
    monkeypatch.setattr(newton, "SUBSAMPLE_ROWS", 30)  # half the rows
    monkeypatch.setattr(newton, "FEATURES_MEASURED", 6)  # this problem's d: no scaling
    pre = local.preconditioner()
    assert pre.m == 30
    assert _cg_iterations(local, pre) < _cg_iterations(local, None) / 2


def test_a_subsample_that_leaves_cg_at_its_cap_grows_for_the_next_steps(monkeypatch):
    from solver import newton

    prob = _problem(SquaredLoss(), 1, False, 0.01)
    W0 = torch.zeros(prob.op.n_gates, 5, 1, dtype=torch.float64)
    near = fista(prob, W0, prob.zero_bias(), tol=1e-2, max_iter=20000)
    monkeypatch.setattr(newton, "EXACT_ROWS", 8)
    monkeypatch.setattr(newton, "SUBSAMPLE_ROWS", 8)
    monkeypatch.setattr(newton, "FEATURES_MEASURED", 5)  # no scaling by d
    built = []
    real = newton._RowPreconditioner.__init__

    def spy(self, local, fast_op, rows=None):
        real(self, local, fast_op, rows)
        built.append(self.m)

    monkeypatch.setattr(newton._RowPreconditioner, "__init__", spy)
    pol = newton_polish(prob, near.W, near.b, budget=200, cg_iters=2, max_steps=3)
    assert built[0] == 8 and pol.rows is not None and pol.rows > 8
    assert built == sorted(built) and len(set(built)) > 1  # grown between steps
    built.clear()
    again = newton_polish(prob, near.W, near.b, budget=200, cg_iters=50, rows=pol.rows)
    assert built and built[0] == pol.rows  # the next polish starts from the grown size
    assert again.rows == pol.rows  # CG converged: no more growth
    # Below the cap, GROW_CG iterations grow it too.
    ks = []
    real_cg = newton._cg

    def cg(*args, **kwargs):
        out = real_cg(*args, **kwargs)
        ks.append(out[2])
        return out

    monkeypatch.setattr(newton, "_cg", cg)
    monkeypatch.setattr(newton, "GROW_CG", 2)
    built.clear()
    pol = newton_polish(prob, near.W, near.b, budget=5000, cg_iters=1000, max_steps=1)
    assert 2 <= ks[0] < 1000 and built == [8] and pol.rows == 16
    assert newton._grown(3000, 20_000, 1) == newton.MAX_GROWN_ROWS
    assert newton._grown(100, 150, 1) == 150  # never beyond n
    assert newton._grown(newton.MAX_GROWN_ROWS, 20_000, 1) == newton.MAX_GROWN_ROWS


def test_capacitance_rows_all_then_a_subsample_keeping_a_quarter_with_several_outputs():
    from solver.newton import EXACT_ROWS, SUBSAMPLE_ROWS, capacitance_rows

    assert capacitance_rows(EXACT_ROWS, 1) == EXACT_ROWS  # exact
    assert capacitance_rows(EXACT_ROWS + 1, 1) == SUBSAMPLE_ROWS
    assert capacitance_rows(10_000, 1) == SUBSAMPLE_ROWS
    assert capacitance_rows(EXACT_ROWS // 3, 3) == EXACT_ROWS // 3
    assert capacitance_rows(2000, 3) == 500  # SUBSAMPLE_ROWS // 3, also a quarter
    assert capacitance_rows(1200, 10) == 300  # a quarter, above SUBSAMPLE_ROWS // 10
    # Fewer features make products cheaper: smaller factorisations pay, by (d / 1280)^(1/3).
    assert capacitance_rows(1347, 1, d=64) == int(SUBSAMPLE_ROWS * 0.05 ** (1 / 3))
    assert capacitance_rows(268, 1, d=64) == 268
    assert capacitance_rows(EXACT_ROWS, 1, d=4096) == EXACT_ROWS  # no growth beyond 1280


def test_one_output_is_always_preconditioned_several_only_while_a_quarter_fits():
    from types import SimpleNamespace

    from solver.newton import MAX_CAPACITANCE, preconditioned

    def program(n, c, gated=True):
        op = SimpleNamespace(take_rows=None) if gated else SimpleNamespace()
        return SimpleNamespace(Y=torch.zeros(n, c), op=op)

    assert preconditioned(program(60_000, 1))  # 4 x 3000 rows no longer bounds one output
    assert preconditioned(program(4 * (MAX_CAPACITANCE // 10), 10))
    assert not preconditioned(program(4 * (MAX_CAPACITANCE // 10) + 1, 10))
    assert not preconditioned(program(100, 1, gated=False))  # no row subsets to take


def test_polish_with_tol_stops_at_a_certificate_it_reports():
    prob = _problem(SquaredLoss(), 1, False, 0.02)
    W0 = torch.zeros(prob.op.n_gates, 5, 1, dtype=torch.float64)
    near = fista(prob, W0, prob.zero_bias(), tol=1e-3, max_iter=20000)
    pol = newton_polish(prob, near.W, near.b, budget=2000, tol=1e-7)
    assert pol.cert is not None
    fresh = certificate(prob, pol.W, pol.b, prob.forward(pol.W))
    assert pol.cert.gap == pytest.approx(fresh.gap, rel=1e-6, abs=1e-14)
    if fresh.gap > 1e-7:  # stopped for a gate outside the set: one must violate
        outside = fresh.dual_norms > prob.lam
        outside[torch.linalg.vector_norm(pol.W, dim=(1, 2)) > 0] = False
        assert bool(outside.any())


def test_float64_input_is_certified_in_float64():
    from solver import ConvexMLPRegressor

    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 8))
    y = np.maximum(X @ rng.standard_normal(8), 0) + 0.1 * rng.standard_normal(200)
    est = ConvexMLPRegressor(gates=32, lam=1e-3, penalty="frobenius", random_state=0)
    est.fit(torch.as_tensor(X), y)
    assert est.converged_ and est.duality_gap_ <= 1e-6
    assert est.weights_.dtype == torch.float64


def test_a_preconditioner_that_cannot_be_factored_leaves_plain_cg(monkeypatch):
    prob = _problem(SquaredLoss(), 1, False, 0.02)
    local = _active_point(prob)
    assert local.preconditioner() is not None
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda A: (real(A)[0], torch.tensor(1))
    )  # every factorisation reports a non-positive pivot
    assert local.preconditioner() is None
    W0 = torch.zeros(prob.op.n_gates, 5, 1, dtype=torch.float64)
    near = fista(prob, W0, prob.zero_bias(), tol=1e-4, max_iter=20000)
    pol = newton_polish(prob, near.W, near.b, budget=5000, tol=1e-8)
    assert certificate(prob, pol.W, pol.b, prob.forward(pol.W)).primal <= near.cert.primal


def test_frobenius_cross_entropy_with_bias_on_a_row_subsample_certifies():
    # Digits' 64 features put 276 of these 600 rows x 2 classes in the preconditioner. When its
    # bias block mixed all rows with the subsample, this fit did not certify in 20000
    # iterations; now it takes a few hundred.
    from sklearn.datasets import load_digits

    from solver import ConvexMLPClassifier
    from solver.newton import capacitance_rows

    X, y = load_digits(return_X_y=True)
    X, y = (X[:600] / 16.0).astype(np.float32), y[:600] % 2
    clf = ConvexMLPClassifier(gates=64, lam=1e-3, penalty="frobenius", random_state=0)
    clf.set_params(max_iter=3000).fit(X, y)
    assert clf.duality_gap_ <= 1e-6
    assert capacitance_rows(600, 2, 64) < 600  # the subsample did apply


def test_the_first_polish_runs_in_float32_far_from_the_optimum_then_float64_certifies(
    monkeypatch,
):
    import solver.workingset as ws

    prob = _problem(SquaredLoss(), 1, False, 0.01, n=300, d=8)
    W0 = torch.zeros(prob.op.n_gates, 8, 1, dtype=torch.float64)
    start = fista(prob.to(torch.float32), W0.float(), prob.zero_bias().float(), tol=0.3,
                  max_iter=20000)  # fmt: skip
    W, b = start.W.double(), start.b.double()
    cert = certificate(prob, W, b, prob.forward(W))
    assert cert.gap > ws.FAST_POLISH_GAP
    dtypes = []
    real = ws.newton_polish

    def recording(problem, *args, **kwargs):
        dtypes.append(problem.Y.dtype)
        return real(problem, *args, **kwargs)

    monkeypatch.setattr(ws, "newton_polish", recording)
    fast = prob.to(torch.float32)
    args = (prob, W, b, cert, 1e-8, 5000, None, 0, fast)
    W1, _, cert1, used, _ = ws._polish(*args, start=True)
    assert dtypes[0] == torch.float32 and W1.dtype == torch.float64 and used > 0
    if cert1.gap > ws.FAST_POLISH_GAP:  # still far: back to first-order rounds, no float64
        assert dtypes == [torch.float32]
    dtypes.clear()
    ws._polish(*args)  # a later polish stays in float64
    assert dtypes == [torch.float64]
    result = ws.solve(prob, W, b, tol=1e-8, max_iter=5000)
    assert result.cert.gap <= 1e-8 and result.W.dtype == torch.float64


def test_cg_is_asked_only_for_the_accuracy_that_reaches_tol_in_one_step():
    from solver.newton import CG_FLOOR, CG_SAFETY, _cg_rtol

    g = torch.full((4, 3, 1), 1e-6, dtype=torch.float64)  # |g| = 3.5e-6
    zero = torch.zeros(1, dtype=torch.float64)
    default = _cg_rtol(g, zero, None, None)
    assert default == pytest.approx(math.sqrt(math.sqrt(12) * 1e-6))
    assert _cg_rtol(g, zero, 1e-6, None) == default  # gap unknown: the default
    assert _cg_rtol(g, zero, 1e-6, 1e-6) == default  # already certified: the default
    assert _cg_rtol(g, zero, 1e-6, 1e-4) == pytest.approx(CG_SAFETY * 0.1)  # loosened
    assert _cg_rtol(g, zero, 1e-6, 1e2) == default  # far off: never tighter than the default
    assert _cg_rtol(g, zero, 1e-6, 1e-6 * (1 + 1e-9)) == 0.1  # capped
    assert _cg_rtol(torch.zeros_like(g), zero, None, None) == CG_FLOOR


@pytest.mark.parametrize(("loss", "c"), [(SquaredLoss(), 1), (CrossEntropyLoss(), 3)])
def test_gates_outside_the_set_are_brought_in_by_a_prox_step_and_newton_certifies(loss, c):
    from solver.newton import _activate

    prob = _problem(loss, c, False, 0.02)
    W0 = torch.zeros(prob.op.n_gates, 5, c, dtype=torch.float64)
    opt = fista(prob, W0, prob.zero_bias(), tol=1e-9, max_iter=50000)
    active = torch.nonzero(torch.linalg.vector_norm(opt.W, dim=(1, 2)) > 0).squeeze(1)
    assert active.numel() >= 3
    # Drop the two largest optimal blocks: Newton on the rest cannot bring them back.
    big = active[torch.linalg.vector_norm(opt.W[active], dim=(1, 2)).argsort()[-2:]]
    W = opt.W.clone()
    W[big] = 0
    b = prob.zero_bias()
    cert = certificate(prob, W, b, prob.forward(W))
    S = torch.nonzero(torch.linalg.vector_norm(W, dim=(1, 2)) > 0).squeeze(1)
    assert bool((cert.dual_norms[big] > prob.lam).all())
    # One prox step on the violators: they become nonzero, along minus their gradient; the
    # set and the gates that do not violate stay as they were; the objective falls.
    stepped = _activate(prob, W, b, cert, S, prob.forward(W))
    grad = prob.op.restrict(big).rmatvec(loss.grad(prob.forward(W), prob.Y))
    cos = (stepped[big] * -grad).sum(dim=(1, 2)) / (
        torch.linalg.vector_norm(stepped[big], dim=(1, 2))
        * torch.linalg.vector_norm(grad, dim=(1, 2))
    )
    assert torch.allclose(cos, torch.ones_like(cos))
    keep = cert.dual_norms <= prob.lam
    keep[S] = True
    assert not bool(keep[big].any())
    assert torch.equal(stepped[keep], W[keep])
    after = certificate(prob, stepped, b, prob.forward(stepped))
    assert after.primal < cert.primal
    # The polish: without activations it stops on the violation; with them it certifies ...
    stuck = newton_polish(prob, W, b, budget=3000, tol=1e-8)
    assert stuck.cert is None or stuck.cert.gap > 1e-8
    assert not bool(torch.linalg.vector_norm(stuck.W[big], dim=(1, 2)).any())
    # ... nor while its gap has not halved since the reference it was given.
    held = newton_polish(prob, W, b, budget=3000, tol=1e-8, max_activations=3, gap=1e-9)
    assert not bool(torch.linalg.vector_norm(held.W[big], dim=(1, 2)).any())
    pol = newton_polish(prob, W, b, budget=3000, tol=1e-8, max_activations=3)
    final = certificate(prob, pol.W, pol.b, prob.forward(pol.W))
    assert final.gap <= 1e-8
    assert bool((torch.linalg.vector_norm(pol.W[big], dim=(1, 2)) > 0).all())
