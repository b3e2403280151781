"""Lifted operators of the convex attention head, and the nuclear-norm penalty for their blocks.

Tokens z_i (T, d) are the head's inputs after projection (with a constant 1 appended when an
intercept is fitted). One attention head with W1 (d, d) (= Q K^T) and W2 (d, c) (= V W_O),
scores averaged over the T keys and outputs mean pooled over the T queries, gives the logits

    f(z_i) = 1/T^2 sum_{t,s} sigma(z_t^T W1 z_s) z_s^T W2                          (c,)

For linear sigma, or for a fixed 0/1 mask m_ts in place of sigma's sign (gated ReLU attention,
m_ts = 1[z_t^T H z_s >= 0] for a gate H), this is linear in the lifted block

    Z = vec(W1) vec(W2)^T,   Z[(a, k), (l, e)] = W1[a, k] W2[l, e],   shape (d^2, d c),

namely f(z_i)[e] = sum_{a,k,l} phi_i[a, k, l] Z[(a, k), (l, e)] with the token features

    phi_i[a, k, l] = 1/T^2 sum_{t,s} m_ts z_t[a] z_s[k] z_s[l]                     (d^3,)

and ||Z||_* = min sum_j ||W1_j||_F ||W2_j||_F over the ways of writing Z as a sum of heads.
phi_i is symmetric in (k, l), so A(Z) only sees Z summed over its (k, l) and (l, k) entries, and
A*(R) is symmetric in (k, l): the operators keep phi on the pairs k <= l only (m = d(d+1)/2
of the d^2), which halves their memory and the cost of every product.
For linear attention phi_i = zbar_i (x) S_i with zbar_i = z_i^T 1 / T and S_i = z_i^T z_i / T,
so the operator keeps only (n, d) and (n, m). The gated operator keeps phi for every sample
and gate, (n, gates, d m), when that fits ``max_feature_elems``, and otherwise rebuilds it in
chunks of samples for every product (about T / c times slower). Features are always computed
in float64 from float64 tokens and stored in the working dtype, so the float32 and float64
phases of a solve see the same masks.
"""

from __future__ import annotations

import torch

from .operator import matmul_nn, matmul_tn
from .penalties import GroupNuclear

CHUNK_ELEMS = 1 << 24  # largest temporary while building features
MAX_FEATURE_ELEMS = 1 << 28  # cached gated features above this are rebuilt per product


def pairs(d: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices k d + l and l d + k of the m = d(d+1)/2 pairs k <= l."""
    k, l = torch.triu_indices(d, d, device=device)
    return k * d + l, l * d + k


def linear_features(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """zbar (n, d) and the token second moments S (n, m) on the pairs k <= l, of z (n, T, d)."""
    n, T, d = z.shape
    kl, _ = pairs(d, z.device)
    S = torch.einsum("ntk,ntl->nkl", z, z).reshape(n, d * d)[:, kl] / T
    return z.mean(dim=1), S


def attention_masks(z: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Masks 1[z_t^T H_j z_s >= 0], bool (n, gates, T, T) for tokens (n, T, d), gates (g, d, d)."""
    zH = torch.einsum("ntd,gde->ngte", z, gates)
    return (zH @ z.transpose(1, 2).unsqueeze(1)) >= 0


def gated_features(z: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """phi (n, gates, d, m) on the pairs k <= l, of tokens z (n, T, d) for gates (g, d, d).

    phi[i, j] = 1/T sum_s q_s (x) z_s (x) z_s with q_s = 1/T sum_t m_ts z_t, the mean of the
    queries that key s is gated on for.
    """
    _, T, d = z.shape
    M = attention_masks(z, gates).to(z.dtype)
    q = M.transpose(-1, -2) @ z.unsqueeze(1) / T  # (n, g, T_keys, d)
    k, l = torch.triu_indices(d, d, device=z.device)
    zz = (z[:, :, k] * z[:, :, l]).unsqueeze(1)  # (n, 1, T, m)
    return q.transpose(-1, -2) @ zz / T


def fold(W: torch.Tensor, d: int) -> torch.Tensor:
    """(g, d^2, d c) blocks -> (g, d, m, c): entries (k, l) and (l, k) summed onto k <= l."""
    g, _, dc = W.shape
    kl, lk = pairs(d, W.device)
    W4 = W.reshape(g, d, d * d, dc // d)
    return W4[:, :, kl] + (kl != lk).to(W.dtype).view(-1, 1) * W4[:, :, lk]


def unfold(G: torch.Tensor, d: int) -> torch.Tensor:
    """(g, d, m, c) on the pairs k <= l -> symmetric (g, d^2, d c) blocks."""
    g, _, _, c = G.shape
    kl, lk = pairs(d, G.device)
    out = G.new_empty(g, d, d * d, c)
    out[:, :, kl] = G
    out[:, :, lk] = G
    return out.reshape(g, d * d, d * c)


def _sample_step(n: int, per_sample: int) -> int:
    return max(1, min(n, CHUNK_ELEMS // max(1, per_sample)))


class LinearAttentionOperator:
    """A(W) (n, c) for one lifted block W (1, d^2, d c): linear attention, sigma = identity."""

    def __init__(self, tokens: torch.Tensor, dtype: torch.dtype | None = None, active=True):
        self.tokens = tokens  # (n, T, d) float64: the program's data
        self.dtype = dtype or tokens.dtype
        self.active = active
        zbar, S = linear_features(tokens)
        self.zbar, self.S = zbar.to(self.dtype), S.to(self.dtype)

    @property
    def n_gates(self) -> int:
        return int(self.active)

    def _dims(self) -> tuple[int, int]:
        return self.tokens.shape[0], self.tokens.shape[2]

    def matvec(self, W: torch.Tensor) -> torch.Tensor:
        """(1, d^2, d c) -> (n, c)."""
        n, d = self._dims()
        c = W.shape[2] // d
        if not self.active:
            return self.zbar.new_zeros(n, c)
        # Pairs (k, l) against the second moments first, then the query mean over a.
        Wp = fold(W, d)[0].permute(1, 0, 2).reshape(-1, d * c)  # (m, (a, e))
        M = (self.S @ Wp).view(n, d, c)
        return torch.einsum("na,nae->ne", self.zbar, M)

    def rmatvec(self, R: torch.Tensor) -> torch.Tensor:
        """(n, c) -> (1, d^2, d c): sum_i (zbar_i (x) S_i) (x) r_i^T."""
        n, d = self._dims()
        c = R.shape[1]
        if not self.active:
            return R.new_zeros(0, d * d, d * c)
        ZR = (self.zbar.unsqueeze(2) * R.unsqueeze(1)).reshape(n, d * c)
        G = (self.S.T @ ZR).view(-1, d, c).permute(1, 0, 2)  # (d, m, c)
        return unfold(G.unsqueeze(0), d)

    def restrict(self, idx: torch.Tensor) -> LinearAttentionOperator:
        return LinearAttentionOperator(self.tokens, self.dtype, active=idx.numel() > 0)

    def to(self, dtype: torch.dtype) -> LinearAttentionOperator:
        return LinearAttentionOperator(self.tokens, dtype, self.active)


class GatedAttentionOperator:
    """A(W) = sum_j <phi_j, W_j> (n, c) for blocks W (gates, d^2, d c): gated ReLU attention."""

    def __init__(
        self,
        tokens: torch.Tensor,
        gates: torch.Tensor,
        dtype: torch.dtype | None = None,
        max_feature_elems: int = MAX_FEATURE_ELEMS,
    ):
        self.tokens = tokens  # (n, T, d) float64
        self.gates = gates  # (g, d, d) float64
        self.dtype = dtype or tokens.dtype
        self.max_feature_elems = max_feature_elems
        n, _, d = tokens.shape
        self.phi: torch.Tensor | None = None
        if n * gates.shape[0] * d * d * (d + 1) // 2 <= max_feature_elems:
            m = d * (d + 1) // 2
            self.phi = torch.empty(
                n, gates.shape[0] * d * m, dtype=self.dtype, device=tokens.device
            )
            for s, e, chunk in self._chunks():
                self.phi[s:e] = chunk

    @property
    def n_gates(self) -> int:
        return int(self.gates.shape[0])

    def _chunks(self):
        """(start, end, phi of samples start:end as (m, g * d^3)) in the working dtype."""
        n, T, d = self.tokens.shape
        g = self.n_gates
        step = _sample_step(n, g * max(T * T, T * d, d**3) + T * d * d)
        for s in range(0, n, step):
            e = min(n, s + step)
            phi = gated_features(self.tokens[s:e], self.gates)
            yield s, e, phi.reshape(e - s, -1).to(self.dtype)

    def _features(self):
        if self.phi is not None:
            yield 0, self.phi.shape[0], self.phi
        else:
            yield from self._chunks()

    def matvec(self, W: torch.Tensor) -> torch.Tensor:
        """(g, d^2, d c) -> (n, c)."""
        n, d = self.tokens.shape[0], self.tokens.shape[2]
        c = W.shape[2] // d
        Wf = fold(W, d).reshape(-1, c)
        out = W.new_zeros(n, c)
        for s, e, phi in self._features():
            out[s:e] = matmul_nn(phi, Wf)
        return out

    def rmatvec(self, R: torch.Tensor) -> torch.Tensor:
        """(n, c) -> (g, d^2, d c): block j is sum_i phi_ij (x) r_i reshaped."""
        d = self.tokens.shape[2]
        out = R.new_zeros(self.n_gates * d * (d * (d + 1) // 2), R.shape[1])
        for s, e, phi in self._features():
            out += matmul_tn(phi, R[s:e])
        return unfold(out.view(self.n_gates, d, -1, R.shape[1]), d)

    def restrict(self, idx: torch.Tensor) -> GatedAttentionOperator:
        op = GatedAttentionOperator.__new__(GatedAttentionOperator)
        op.tokens, op.gates, op.dtype = self.tokens, self.gates[idx], self.dtype
        op.max_feature_elems = self.max_feature_elems
        op.phi = None
        if self.phi is not None:
            n = self.tokens.shape[0]
            op.phi = self.phi.view(n, self.n_gates, -1)[:, idx].reshape(n, -1)
        return op

    def to(self, dtype: torch.dtype) -> GatedAttentionOperator:
        return GatedAttentionOperator(self.tokens, self.gates, dtype, self.max_feature_elems)


class BlockNuclear(GroupNuclear):
    """R(W) = sum_j ||W_j||_* for blocks W_j of any shape (m, k); dual norm: spectral norm.

    The prox soft-thresholds the singular values through the eigenvectors of the smaller Gram
    (m x m or k x k; the lifted blocks are d^2 x d c, and either side can be the smaller one),
    formed and diagonalised in float64: a float32 Gram squares the rounding of the small
    singular values near the threshold.
    """

    def prox(self, V: torch.Tensor, t: float) -> torch.Tensor:
        _, m, k = V.shape
        V64 = V.to(torch.float64)
        left = m <= k
        gram = V64 @ V64.transpose(1, 2) if left else V64.transpose(1, 2) @ V64
        evals, Q = torch.linalg.eigh(gram)
        s = evals.clamp_min(0.0).sqrt()
        shrink = (1.0 - t / s.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(0.0)
        P = ((Q * shrink.unsqueeze(1)) @ Q.transpose(1, 2)).to(V.dtype)
        return P @ V if left else V @ P


__all__ = [
    "BlockNuclear",
    "GatedAttentionOperator",
    "LinearAttentionOperator",
    "attention_masks",
    "gated_features",
    "linear_features",
    "pairs",
]
