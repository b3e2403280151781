"""Each loss and penalty against its stated formula, autograd, and its optimality conditions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from solver.losses import CrossEntropyLoss, SquaredLoss
from solver.penalties import GroupFrobenius, GroupNuclear

LOSSES = [SquaredLoss(), CrossEntropyLoss()]
PENALTIES = [GroupFrobenius(), GroupNuclear()]


def _data(seed, n=7, c=3):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, c, generator=g, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.randint(0, c, (n,), generator=g), c).to(torch.float64)
    return F, Y


def test_loss_formulas():
    F, Y = _data(0)
    assert float(SquaredLoss().value(F, Y)) == pytest.approx(
        float(((F - Y) ** 2).sum() / (2 * len(F)))
    )
    ce = torch.nn.functional.cross_entropy(F, Y.argmax(1))
    assert float(CrossEntropyLoss().value(F, Y)) == pytest.approx(float(ce))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: l.name)
def test_loss_gradient_matches_autograd(loss):
    F, Y = _data(1)
    F.requires_grad_(True)
    loss.value(F, Y).backward()
    assert torch.allclose(F.grad, loss.grad(F.detach(), Y), atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: l.name)
def test_conjugate_fenchel_young_equality(loss):
    # At theta = -grad f(F): -f*(-theta) = f(F) + <theta, F>, the equality case of Fenchel-Young.
    F, Y = _data(2)
    theta = -loss.grad(F, Y)
    assert float(loss.dual(theta, Y)) == pytest.approx(float(loss.value(F, Y) + (theta * F).sum()))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: l.name)
def test_optimal_bias_zeroes_bias_gradient(loss):
    F, Y = _data(3, n=20)
    b = loss.optimal_bias(F, Y, torch.zeros(3, dtype=F.dtype))
    assert torch.allclose(loss.grad(F + b, Y).sum(0), torch.zeros(3, dtype=F.dtype), atol=1e-12)


def test_penalty_formulas():
    W = torch.randn(4, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Wn = W.numpy()
    assert float(GroupFrobenius().value(W)) == pytest.approx(sum(np.linalg.norm(b) for b in Wn))
    assert float(GroupNuclear().value(W)) == pytest.approx(
        sum(np.linalg.norm(b, "nuc") for b in Wn)
    )
    assert torch.allclose(
        GroupNuclear().dual_norms(W), torch.as_tensor([np.linalg.norm(b, 2) for b in Wn])
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    t=st.floats(1e-3, 5.0),
    c=st.integers(1, 4),
    which=st.sampled_from(PENALTIES),
)
def test_prox_is_the_minimizer(seed, t, c, which):
    """prox(V, t) minimizes 1/2||W - V||^2 + t R(W): no random perturbation does better, and
    the optimality condition V - W in t * dR(W) holds (checked through the dual norm)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(3, 4, c, generator=g, dtype=torch.float64) * 2

    def obj(W):
        return float(0.5 * (W - V).square().sum() + t * which.value(W))

    P = which.prox(V, t)
    best = obj(P)
    for _ in range(20):
        assert best <= obj(P + 1e-3 * torch.randn(P.shape, generator=g, dtype=P.dtype)) + 1e-12
    # Subgradient: ||V_i - P_i||_dual <= t for every block, with equality where P_i != 0.
    dn = which.dual_norms(V - P)
    assert bool((dn <= t * (1 + 1e-9)).all())
    active = which.norms(P) > 0
    assert torch.allclose(dn[active], torch.full_like(dn[active], t), rtol=1e-8)
