import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The solver tests use tiny problems, where torch's intra-op threads only add overhead
    # (and contend with the other test processes on a 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_problem(seed: int, n: int = 30, d: int = 3, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal((d, n_classes))
    y = np.argmax(np.maximum(X @ w, 0) + 0.3 * rng.standard_normal((n, n_classes)), axis=1)
    return X, y
