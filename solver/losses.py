"""Data-fit terms f(F) of the convex programs, with the conjugate used by the dual.

F (n, c) are the model outputs and Y (n, c) the targets (one-hot for classification).
Each loss is averaged over the n samples. For a dual point U (n, c) the dual objective is
``dual(U) = -f*(-U)``; by weak duality ``f(F) + lam R(W) >= dual(U)`` whenever U is
dual-feasible (``||A_i^T U||_dual <= lam`` for every gate block, and ``1^T U = 0`` when an
unpenalized output bias is fitted).
"""

from __future__ import annotations

import torch


class SquaredLoss:
    """f(F) = 1/(2n) ||F - Y||_F^2;  grad = (F - Y)/n;  -f*(-U) = <U, Y> - (n/2) ||U||_F^2."""

    name = "squared"

    def value(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        r = (F - Y).reshape(-1)
        return torch.dot(r, r) * (0.5 / Y.shape[0])

    def grad(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return (F - Y) / Y.shape[0]

    def dual(self, U: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return (U * Y).sum() - 0.5 * Y.shape[0] * U.square().sum()

    def hess_vec(self, F: torch.Tensor, Y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """The Hessian of f at F applied to V: V/n."""
        return V / Y.shape[0]

    def optimal_bias(self, F: torch.Tensor, Y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """argmin_b f(F + 1 b^T): the column means of the residual."""
        return (Y - F).mean(dim=0)


class CrossEntropyLoss:
    """f(F) = 1/n sum_j [logsumexp(F_j) - <Y_j, F_j>] (softmax cross-entropy, Y one-hot).

    grad = (softmax(F) - Y)/n. For U = (Y - Q)/n with rows of Q in the simplex,
    -f*(-U) = -1/n sum_j sum_k Q_jk log Q_jk (the entropy of Q), and -inf elsewhere.
    """

    name = "cross_entropy"

    def value(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(F, dim=1) - (Y * F).sum(dim=1)).mean()

    def grad(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(F, dim=1) - Y) / Y.shape[0]

    def hess_vec(self, F: torch.Tensor, Y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """The Hessian of f at F applied to V, row by row: (diag(p) - p p^T) v / n."""
        P = torch.softmax(F, dim=1)
        PV = P * V
        return (PV - P * PV.sum(dim=1, keepdim=True)) / Y.shape[0]

    def dual(self, U: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        Q = (Y - Y.shape[0] * U).clamp_min(0.0)
        return -torch.special.xlogy(Q, Q).sum() / Y.shape[0]

    def optimal_bias(
        self, F: torch.Tensor, Y: torch.Tensor, b: torch.Tensor, iters: int = 50
    ) -> torch.Tensor:
        """argmin_b f(F + 1 b^T) by Newton's method (c unknowns; the Hessian is c x c).

        The softmax is invariant to adding a constant to b, so the Hessian is singular along 1;
        the pseudo-inverse step keeps b in the complement and converges all the same.
        """
        n = Y.shape[0]
        target = Y.mean(dim=0)
        # The gradient's entries are O(1); stop once they are at rounding level.
        small = 50 * torch.finfo(F.dtype).eps
        for _ in range(iters):
            P = torch.softmax(F + b, dim=1)
            g = P.mean(dim=0) - target
            if float(g.abs().max()) <= small:
                break
            H = torch.diag(P.mean(dim=0)) - (P.T @ P) / n
            step = torch.linalg.lstsq(H, g.unsqueeze(1), rcond=None).solution.squeeze(1)
            # Backtrack on the (convex) objective to keep Newton safe far from the optimum.
            f0 = self.value(F + b, Y)
            t = 1.0
            while t > 1e-8 and self.value(F + b - t * step, Y) > f0:
                t *= 0.5
            b = b - t * step
        return b


LOSSES: dict[str, type[SquaredLoss] | type[CrossEntropyLoss]] = {
    "squared": SquaredLoss,
    "cross_entropy": CrossEntropyLoss,
}
