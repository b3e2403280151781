"""Recovered networks: ordinary torch modules equal to a fitted convex head.

GatedReLUNetwork:  f(x) = V^T [ 1[G^T x + g0 >= 0] * (U^T x + u0) ] + b
ReLUNetwork:       f(x) = V^T relu(U^T x + u0) + b
"""

from __future__ import annotations

import torch
from torch import nn


class GatedReLUNetwork(nn.Module):
    def __init__(self, gate: nn.Linear, hidden: nn.Linear, output: nn.Linear):
        super().__init__()
        self.gate = gate
        self.hidden = hidden
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = (self.gate(x) >= 0).to(x.dtype)
        return self.output(on * self.hidden(x))


class ReLUNetwork(nn.Module):
    def __init__(self, hidden: nn.Linear, output: nn.Linear):
        super().__init__()
        self.hidden = hidden
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x)))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """nn.Linear(in, out) holding weight (out, in) and bias (out,), in their dtype/device."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def split_augmented(
    M: torch.Tensor, fit_intercept: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split (d [+1], m) first-layer columns into weight (m, d) and bias (m,)."""
    if fit_intercept:
        return M[:-1].T.contiguous(), M[-1].contiguous()
    return M.T.contiguous(), None


def gated_network(
    gates: torch.Tensor, U: torch.Tensor, V: torch.Tensor, b: torch.Tensor, fit_intercept: bool
) -> GatedReLUNetwork:
    """gates, U: (d [+1], m) per neuron; V: (m, c); b: (c,)."""
    gw, gb = split_augmented(gates, fit_intercept)
    uw, ub = split_augmented(U, fit_intercept)
    if gb is None:
        gb = torch.zeros(gw.shape[0], dtype=gw.dtype, device=gw.device)
    return GatedReLUNetwork(_linear(gw, gb), _linear(uw, ub), _linear(V.T.contiguous(), b))


def relu_network(
    U: torch.Tensor, V: torch.Tensor, b: torch.Tensor, fit_intercept: bool
) -> ReLUNetwork:
    uw, ub = split_augmented(U, fit_intercept)
    return ReLUNetwork(_linear(uw, ub), _linear(V.T.contiguous(), b))


def factor_blocks(
    W: torch.Tensor, rtol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split gate blocks W_i (d, c) into neurons by SVD.

    W_i = sum_k (sqrt(s_k) a_k)(sqrt(s_k) b_k)^T.

    Returns (owner (m,) gate index of each neuron, U (d, m), V (m, c)); singular values below
    rtol times the largest of all blocks are dropped. Each neuron's first- and second-layer
    weights have equal norms, so lam/2 (||U||^2 + ||V||^2) = lam * sum_i ||W_i||_*.
    """
    p, d, c = W.shape
    if p == 0:
        return (torch.zeros(0, dtype=torch.long), W.new_zeros(d, 0), W.new_zeros(0, c))
    A, s, Bh = torch.linalg.svd(W, full_matrices=False)  # (p,d,k), (p,k), (p,k,c)
    cut = rtol * float(s.max()) if s.numel() and float(s.max()) > 0 else float("inf")
    gate_idx, comp = torch.nonzero(s > cut, as_tuple=True)
    root = s[gate_idx, comp].sqrt()
    U = (A[gate_idx, :, comp] * root.unsqueeze(1)).T
    V = Bh[gate_idx, comp, :] * root.unsqueeze(1)
    return gate_idx, U.contiguous(), V.contiguous()


def relu_neurons(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neurons of an exact ReLU head with blocks U = [V; W] (2p, d, c), one per nonzero column.

    Column k of V_i gives the neuron (v / sqrt||v||, +sqrt||v|| e_k); of W_i, (w / sqrt||w||,
    -sqrt||w|| e_k). Returns (block index (m,), first layer (d, m), second layer (m, c)).
    """
    q, _, c = U.shape
    norms = torch.linalg.vector_norm(U, dim=1)  # (2p, c)
    block, cls = torch.nonzero(norms > 0, as_tuple=True)
    root = norms[block, cls].sqrt()
    first = (U[block, :, cls] / root.unsqueeze(1)).T
    sign = torch.where(block < q // 2, 1.0, -1.0).to(U.dtype)
    second = U.new_zeros(block.numel(), c)
    second[torch.arange(block.numel()), cls] = sign * root
    return block, first.contiguous(), second
