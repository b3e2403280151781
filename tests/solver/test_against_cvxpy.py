"""The solver's optimum equals CVXPY's (Clarabel) on small random programs, for every loss,
penalty and activation: objective to 1e-5 relative, model outputs to 1e-3."""

import numpy as np
import pytest
import torch

from solver import ConvergenceWarning, ConvexMLPClassifier, ConvexMLPRegressor

from .conftest import small_problem
from .reference import solve_gated, solve_relu


def _onehot(y, k):
    return np.eye(k)[y]


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("penalty", ["nuclear", "frobenius"])
@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_gated_classifier_matches_cvxpy(loss, penalty, fit_intercept):
    X, y = small_problem(seed=1)
    clf = ConvexMLPClassifier(
        gates=6,
        lam=0.02,
        loss=loss,
        penalty=penalty,
        fit_intercept=fit_intercept,
        random_state=0,
        tol=1e-8,
        max_iter=20000,
    ).fit(X, y)
    ref_obj, ref_F = solve_gated(
        X, _onehot(y, 3), clf.gates_.numpy(), 0.02, loss, penalty, fit_intercept
    )
    assert clf.duality_gap_ <= 1e-8
    assert clf.objective_ == pytest.approx(ref_obj, rel=1e-5)
    F = clf.decision_function(X).numpy()
    if loss == "cross_entropy":  # softmax ignores a shift shared by all classes
        F, ref_F = F - F.mean(1, keepdims=True), ref_F - ref_F.mean(1, keepdims=True)
    assert np.allclose(F, ref_F, atol=1e-3)


@pytest.mark.parametrize("penalty", ["nuclear", "frobenius"])
@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_wide_data_solved_in_its_row_space_matches_cvxpy(loss, penalty):
    # 12 samples of 30 features: the estimator solves the program in the 12-dimensional row
    # space of [X, 1] and maps back; CVXPY solves it over all 31 columns.
    X, y = small_problem(seed=3, n=12, d=30)
    clf = ConvexMLPClassifier(
        gates=5, lam=0.05, loss=loss, penalty=penalty, random_state=0, tol=1e-8, max_iter=20000
    ).fit(X, y)
    assert clf._row_space(torch.as_tensor(clf._augment(torch.as_tensor(X)))) is not None
    ref_obj, ref_F = solve_gated(X, _onehot(y, 3), clf.gates_.numpy(), 0.05, loss, penalty, True)
    assert clf.duality_gap_ <= 1e-8
    assert clf.objective_ == pytest.approx(ref_obj, rel=1e-5)
    F = clf.decision_function(X).numpy()
    if loss == "cross_entropy":
        F, ref_F = F - F.mean(1, keepdims=True), ref_F - ref_F.mean(1, keepdims=True)
    assert np.allclose(F, ref_F, atol=1e-3)


def test_gated_regressor_matches_cvxpy():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((40, 3))
    y = np.abs(X[:, 0]) - X[:, 1] + 0.1 * rng.standard_normal(40)
    reg = ConvexMLPRegressor(gates=8, lam=0.01, random_state=1, tol=1e-8, max_iter=20000).fit(X, y)
    ref_obj, ref_F = solve_gated(
        X, y[:, None], reg.gates_.numpy(), 0.01, "squared", "nuclear", True
    )
    assert reg.objective_ == pytest.approx(ref_obj, rel=1e-5)
    assert np.allclose(reg.predict(X), ref_F[:, 0], atol=1e-3)


@pytest.mark.slow
def test_relu_squared_matches_cvxpy():
    X, y = small_problem(seed=2, n=24, n_classes=2)
    clf = ConvexMLPClassifier(
        activation="relu",
        gates=4,
        lam=0.02,
        loss="squared",
        random_state=0,
        tol=1e-7,
        max_iter=30000,
    ).fit(X, y)
    ref_obj, _ = solve_relu(X, _onehot(y, 2), clf.gates_.numpy(), 0.02, "squared", True)
    assert clf.constraint_violation_ <= 1e-6
    assert clf.objective_ == pytest.approx(ref_obj, rel=1e-5)


@pytest.mark.slow
def test_relu_cross_entropy_approaches_cvxpy():
    # The augmented Lagrangian converges slowly with the cross-entropy loss: after 8000
    # iterations it is within 1e-3 of the optimum, not yet 1e-5 (see the solver issue's note).
    X, y = small_problem(seed=2, n=24, n_classes=2)
    with pytest.warns(ConvergenceWarning):
        clf = ConvexMLPClassifier(
            activation="relu",
            gates=4,
            lam=0.02,
            loss="cross_entropy",
            random_state=0,
            tol=1e-7,
            max_iter=8000,
        ).fit(X, y)
    ref_obj, _ = solve_relu(X, _onehot(y, 2), clf.gates_.numpy(), 0.02, "cross_entropy", True)
    assert clf.constraint_violation_ <= 1e-2
    assert clf.objective_ == pytest.approx(ref_obj, rel=1e-3)
