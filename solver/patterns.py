"""Gates and activation patterns.

A gate g (a column of ``gates``, shape (n_features, p)) defines the pattern
``D = diag(1[X g >= 0])`` on the data. Patterns are stored as a boolean matrix of shape
(n_samples, p): one byte per entry, never an (n, p, n_classes) tensor.
"""

from __future__ import annotations

import torch


def sample_gates(
    X: torch.Tensor, p: int, generator: torch.Generator, *, anchored: bool
) -> torch.Tensor:
    """Sample ``p`` Gaussian gate directions, shape (n_features, p).

    With ``anchored`` the last feature of X is the constant 1 of an intercept, and each gate's
    offset is set so its hyperplane passes through a random point on the segment between two
    training points: on embeddings, which are far from centered, hyperplanes through the
    origin would put almost every sample on the same side and give near-empty or near-full
    patterns. (Not through a training point itself: that point would sit exactly on the
    boundary, where rounding decides its side.)
    """
    n, d = X.shape
    cpu = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    G = torch.randn(d, p, generator=cpu, dtype=torch.float64).to(X.device, X.dtype)
    if anchored:
        G[-1] = 0.0
        a, b = torch.randint(0, n, (2, p), generator=cpu).to(X.device)
        u = torch.rand(p, 1, generator=cpu, dtype=torch.float64).to(X.device, X.dtype)
        anchors = u * X[a] + (1 - u) * X[b]
        G[-1] = -(anchors * G.T).sum(dim=1)
    return G


def compute_patterns(X: torch.Tensor, gates: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Boolean patterns 1[X g >= 0], shape (n_samples, p), computed in chunks of gates."""
    n, p = X.shape[0], gates.shape[1]
    masks = torch.empty(n, p, dtype=torch.bool, device=X.device)
    for s in range(0, p, chunk):
        masks[:, s : s + chunk] = (X @ gates[:, s : s + chunk]) >= 0
    return masks


def unique_patterns(masks: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct non-empty pattern column, in order."""
    p = masks.shape[1]
    _, inverse = torch.unique(masks.T.to(torch.uint8), dim=0, return_inverse=True)
    order = torch.arange(p, device=masks.device)
    first = torch.full((int(inverse.max()) + 1 if p else 0,), p, device=masks.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    keep = torch.zeros(p, dtype=torch.bool, device=masks.device)
    keep[first] = True
    keep &= masks.any(dim=0)
    return torch.nonzero(keep).squeeze(1)
