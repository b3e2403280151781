"""solver.load opens a saved head of any kind and gives back the class that saved it."""

import numpy as np
import pytest

import solver


@pytest.mark.parametrize(
    ("cls", "shape", "kwargs"),
    [
        (solver.ConvexMLPClassifier, (36,), {"gates": 8}),
        (solver.ConvexCNNClassifier, (4, 3, 3), {"gates": 8, "n_components": None}),
        (solver.ConvexAttentionClassifier, (5, 4), {"n_components": None}),
    ],
)
def test_load_dispatches_on_the_saved_class(tmp_path, cls, shape, kwargs):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, *shape))
    y = rng.integers(0, 3, 40)
    head = cls(lam=0.05, max_iter=200, tol=1e-3, random_state=0, **kwargs).fit(X, y)
    head.save(tmp_path / "h")
    back = solver.load(tmp_path / "h")
    assert type(back) is cls
    np.testing.assert_allclose(back.predict_proba(X), head.predict_proba(X), rtol=1e-6, atol=1e-9)


def test_load_refuses_an_unknown_class(tmp_path):
    (tmp_path / "head.json").write_text('{"class": "SomethingElse"}')
    with pytest.raises(ValueError, match="unknown head class"):
        solver.load(tmp_path)
