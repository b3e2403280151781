"""ConvexAttentionClassifier: a self-attention head on tokens, fitted as a convex program.

See the class docstring for the model, the program and its cost; ``attention_operator`` has the
lifting and the operators.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attention_operator import BlockNuclear, GatedAttentionOperator, LinearAttentionOperator
from .base import ClassifierMixin, ConvexHead, Progress, all_finite
from .estimators import _cpu_threads_for, _progress_adapter
from .io import COMMON_SCALARS, head_meta, read_head, write_head
from .losses import LOSSES, CrossEntropyLoss, SquaredLoss
from .network import factor_blocks
from .problem import Problem, zero_threshold
from .workingset import solve

AttentionOperator = LinearAttentionOperator | GatedAttentionOperator

PCA_MAX_TOKENS = 1 << 15  # tokens the projection is fitted on (a seeded random subset)
PCA_EXACT_MAX_FEATURES = 256  # above this, a randomized range finder replaces the covariance
PCA_OVERSAMPLE, PCA_POWER_ITERS = 10, 4
VARIANCE_RTOL = 1e-10  # components with less variance than this times the largest are dropped
TENSORS = ("weights_", "intercept_", "gates_", "token_mean_", "projection_")
SCALARS = (
    *COMMON_SCALARS,
    "n_heads_",
    "n_features_in_",
    "n_components_",
)


class ConvexAttentionClassifier(ClassifierMixin, ConvexHead):
    """Convex self-attention head on tokens X (n, T, d): linear or gated ReLU attention.

    Tokens are first projected, z = (x - mean) P, where P (d, d') holds the top
    d' = ``n_components`` principal directions of the training tokens, each scaled to unit
    variance (``n_components=None`` uses the tokens as given). With ``fit_intercept`` a constant
    1 is appended to every projected token (so queries, keys and values have biases and d' grows
    by one) and an unpenalized output bias b is fitted. The head, for m heads j, is

        f(X_i) = b + 1/T sum_t [ sum_j 1/T sum_s sigma_j(z_t^T W1_j z_s) z_s^T W2_j ]

    with W1_j = Q_j K_j^T (d', d') and W2_j = V_j W_O_j (d', c): no softmax inside the
    attention, scores averaged over the T keys (the 1/T inside keeps the scale independent of T),
    outputs mean pooled over the T queries. ``attention="linear"``: sigma_j(s) = s.
    ``attention="gated_relu"``: sigma_j(s) = 1[z_t^T H_j z_s >= 0] s with fixed random gates H_j
    (``gates`` of them; each head uses one), the gated relaxation of ReLU attention.

    Weight decay lam/2 sum_j (||W1_j||_F^2 + ||W2_j||_F^2) lifts to the convex program

        minimize_{Z, b}  loss(A(Z) + 1 b^T, Y) + lam * sum_g ||Z_g||_*

    over blocks Z_g (d'^2, d' c), one for linear attention and one per gate for gated ReLU
    attention, with A(Z)_i = sum_g <phi_ig, Z_g> and phi_ig[a,k,l] = 1/T^2 sum_{t,s}
    m^g_ts z_t[a] z_s[k] z_s[l] (m = 1 for linear attention). ``loss`` is the mean softmax
    cross-entropy (default) or 1/(2n) ||F - Y||_F^2 on the one-hot Y. Heads are recovered from the
    SVD Z_g = sum_r s_r p_r q_r^T as W1 = sqrt(s_r) p_r and W2 = sqrt(s_r) q_r reshaped; their
    weight decay equals lam ||Z||_*, so ``objective_`` is also the recovered network's value.

    Guarantee: the fit stops when the relative duality gap, from a dual point built from the
    residual and checked on every block, is at most ``tol`` (``duality_gap_`` is that
    certificate), else it warns with a ConvergenceWarning after ``max_iter`` iterations. For
    linear attention the certified optimum is the global optimum of the nonconvex multi-head
    network over any number of heads (at most min(d'^2, d' c) are ever needed); for gated ReLU
    attention it is the global optimum for the sampled gates. Float32 inputs are solved in
    float32 to a gap of 1e-4, then polished in float64.

    Cost: the projection is fitted on at most 2^15 tokens. With m = d'(d'+1)/2 (the features
    are symmetric in two of their three indices), linear attention keeps (n, m) features and each
    iteration costs O(n d' m c); gated attention keeps (n, gates, d' m) features (rebuilt per
    product above 2^28 elements, O(n gates T d' m) each time) and costs O(n gates d' m c) per
    iteration. The prox is an eigendecomposition of a min(d'^2, d' c) square Gram per block.
    Hence the default d' = 16 (17 with the constant): the lifted block and the features grow as
    d'^3; at 16 the features for 2000 samples and 8 gates are about 42M numbers, and one block
    is 289 x 170 for 10 classes. More components can pay for linear attention: on 10000
    EfficientNet-Lite0 Fashion-MNIST maps (49 tokens of 1280), 500 iterations on one CPU
    thread gave test accuracy 0.839 in 21 s with 16 and 0.8745 in 95 s with 32 (bench/README.md).

    The default lam = 1e-2 is meant for the default whitened projection, where lam_max_ is of
    order one (0.85 on a synthetic 49-token, 1280-feature, 10-class task): about 1e-2 lam_max_,
    a regime FISTA certifies in hundreds of iterations. Check ``lam_max_`` or use "auto".

    ``lam="auto"`` fits a geometric path of ``n_lams`` values from ``lam_max_`` down to
    ``lam_min_ratio * lam_max_`` on a (1 - ``validation_fraction``) split, warm-started, and
    keeps the lam of least validation loss (``path_``), then refits on all samples.
    """

    def __init__(
        self,
        attention: str = "linear",
        gates: int = 8,
        n_components: int | None = 16,
        lam: float | str = 1e-2,
        loss: str = "cross_entropy",
        fit_intercept: bool = True,
        tol: float = 1e-6,
        max_iter: int = 5000,
        random_state: int | None = None,
        n_lams: int = 12,
        lam_min_ratio: float = 1e-3,
        validation_fraction: float = 0.2,
    ):
        self.attention = attention
        self.gates = gates
        self.n_components = n_components
        self.lam = lam
        self.loss = loss
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.n_lams = n_lams
        self.lam_min_ratio = lam_min_ratio
        self.validation_fraction = validation_fraction

    # -- parameters ---------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.attention not in {"linear", "gated_relu"}:
            raise ValueError(f"attention must be 'linear' or 'gated_relu', got {self.attention!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if not _is_int(self.gates) or self.gates < 1:
            raise ValueError(f"gates must be a positive integer, got {self.gates!r}")
        if self.n_components is not None and (
            not _is_int(self.n_components) or self.n_components < 1
        ):
            raise ValueError(
                f"n_components must be a positive integer or None, got {self.n_components!r}"
            )
        self._check_lam_and_tol()
        if not 0 < self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in (0, 1)")

    # -- data ---------------------------------------------------------------------------------
    def _fit_projection(self, X: torch.Tensor) -> None:
        d = X.shape[2]
        if self.n_components is None:
            self.token_mean_: torch.Tensor | None = None
            self.projection_: torch.Tensor | None = None
            self.n_components_ = d
            return
        gen = torch.Generator().manual_seed(_seed(self.random_state, 1))
        self.token_mean_, self.projection_ = fit_projection(X, min(int(self.n_components), d), gen)
        self.n_components_ = int(self.projection_.shape[1])

    def _tokens(self, X: torch.Tensor) -> torch.Tensor:
        """Projected tokens (n, T, d') as float64, with the constant 1 when fitting an intercept.

        The projection runs in X's dtype (one GEMM; a float64 copy of the raw tokens would cost
        more than the whole solve) and its result, upcast, is the program's data.
        """
        if self.projection_ is None:
            z = X.to(torch.float64)
        else:
            assert self.token_mean_ is not None
            P = self.projection_.to(X.device)
            shift = self.token_mean_.to(X.device) @ P
            z = (X @ P.to(X.dtype)).to(torch.float64) - shift
        if self.fit_intercept:
            z = torch.cat([z, z.new_ones(*z.shape[:2], 1)], dim=2)
        return z

    def _operator(self, z: torch.Tensor, dtype: torch.dtype) -> AttentionOperator:
        if self.gates_ is None:
            return LinearAttentionOperator(z, dtype)
        return GatedAttentionOperator(z, self.gates_.to(z.device), dtype)

    def _sample_gates(self, dim: int, device: torch.device) -> torch.Tensor | None:
        if self.attention == "linear":
            return None
        gen = torch.Generator().manual_seed(_seed(self.random_state, 0))
        H = torch.randn(int(self.gates), dim, dim, generator=gen, dtype=torch.float64)
        return H.to(device)

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, *, progress: Progress | None = None) -> ConvexAttentionClassifier:
        """Fit the head on tokens X (n, T, d) and labels y (n,); ``progress(fraction, info)``
        is called as the solver goes."""
        self._check_params()
        Xt = _as_tokens(X)
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError("y must be a 1-d array of class labels")
        if y.shape[0] != Xt.shape[0]:
            raise ValueError(f"X has {Xt.shape[0]} samples but y has {y.shape[0]}")
        self.classes_ = self._classes_of(y)
        self.n_features_in_ = int(Xt.shape[2])
        with _cpu_threads_for(Xt, int(self.gates) if self.attention == "gated_relu" else 1):
            return self._fit(Xt, y, progress)

    def _fit(self, X: torch.Tensor, y: np.ndarray, progress: Progress | None):
        Y = self._targets(y, X)
        self._fit_projection(X)
        z = self._tokens(X)
        self.gates_ = self._sample_gates(z.shape[2], z.device)
        loss: SquaredLoss | CrossEntropyLoss = LOSSES[self._loss_name()]()
        pen = BlockNuclear()
        op = self._operator(z, X.dtype)
        self.lam_max_ = zero_threshold(op, Y, loss, pen, self.fit_intercept)
        W = X.new_zeros(op.n_gates, z.shape[2] ** 2, z.shape[2] * Y.shape[1])
        if self.lam == "auto":
            self.lam_, self.path_, W = self._choose_lam(z, Y, loss, pen, W, progress)
        else:
            self.lam_ = float(self.lam)
            self.__dict__.pop("path_", None)  # from an earlier fit with lam="auto"
        problem = Problem(op, Y, loss, pen, self.lam_, self.fit_intercept)
        res = solve(
            problem,
            W.to(X.dtype),
            problem.zero_bias(),
            tol=self.tol,
            max_iter=self.max_iter,
            # The blocks are few (one, or one per gate) and nearly all active below lam_max;
            # working sets would copy the features to save little.
            working_set=False,
            callback=_progress_adapter(progress, self.tol),
        )
        self._store_solution(res.W, res.b, res.cert, res.n_iter, res.converged)
        self._set_heads()
        return self._finish(progress, stacklevel=4)

    def _choose_lam(self, z, Y, loss, pen, W, progress):
        """Geometric path from lam_max down, warm-started; the lam of least validation loss wins
        (``_lam_path``)."""
        seed = _seed(self.random_state, 2)
        val, tr = self._validation_split(z.shape[0], self.validation_fraction, seed, z.device)
        op, op_val = self._operator(z[tr], Y.dtype), self._operator(z[val], torch.float64)
        lam_hi = self.lam_max_ if self.lam_max_ > 0 else 1.0
        b = torch.zeros(Y.shape[1], dtype=Y.dtype, device=Y.device)

        def solve_at(lam: float):
            nonlocal W, b
            prob = Problem(op, Y[tr], loss, pen, lam, self.fit_intercept)
            res = solve(prob, W, b, working_set=False, **self._path_limits())
            W, b = res.W.to(Y.dtype), res.b.to(Y.dtype)
            F = op_val.matvec(res.W.to(torch.float64)) + res.b.to(torch.float64)
            return F, res.cert, W

        lams = lam_hi * np.geomspace(1.0, self.lam_min_ratio, self.n_lams)
        return self._lam_path(lams, solve_at, Y[val], loss, (lam_hi, W), progress)

    def _set_heads(self) -> None:
        owner, U, V = factor_blocks(self.weights_)
        self._heads = (owner, U, V)
        self.n_heads_ = int(owner.numel())

    # -- prediction ---------------------------------------------------------------------------
    def decision_function(self, X: Any) -> torch.Tensor:
        """Logits (n, n_classes) as a tensor, for tokens X (n, T, d) with any T."""
        self._check_fitted()
        Xt = _as_tokens(X).to(self.weights_.device)
        if Xt.shape[2] != self.n_features_in_:
            raise ValueError(
                f"X has {Xt.shape[2]} features per token, the head was fitted on "
                f"{self.n_features_in_}"
            )
        op = self._operator(self._tokens(Xt), self.weights_.dtype)
        return op.matvec(self.weights_) + self.intercept_

    # -- export -------------------------------------------------------------------------------
    def to_torch(self) -> AttentionNetwork:
        """The recovered multi-head network (in the weights' dtype, float64 after a polish); it
        takes raw tokens (n, T, d) and its outputs equal decision_function (for float32 tokens,
        up to the rounding of the float32 projection that decision_function applies)."""
        self._check_fitted()
        owner, U, V = self._heads
        d = math.isqrt(U.shape[0])
        W1 = U.T.reshape(-1, d, d)
        W2 = V.reshape(-1, d, len(self.classes_))
        gates = None if self.gates_ is None else self.gates_.to(U)[owner.to(U.device)]
        proj: nn.Module = nn.Identity()
        if self.projection_ is not None:
            assert self.token_mean_ is not None
            P = self.projection_.to(U)
            proj = _linear(P.T.contiguous(), -(self.token_mean_.to(U) @ P))
        return AttentionNetwork(proj, W1, W2, gates, self.intercept_, self.fit_intercept)

    def save(self, path: str | Path) -> None:
        """Write the fitted head to directory ``path``: tensors.safetensors + head.json."""
        self._check_fitted()
        meta = head_meta(self, self.get_params(), SCALARS)
        if hasattr(self, "path_"):
            meta["path"] = self.path_
        tensors = {k: getattr(self, k) for k in TENSORS if getattr(self, k) is not None}
        write_head(Path(path), tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> ConvexAttentionClassifier:
        est, meta = read_head(Path(path), cls)
        if "path" in meta:
            est.path_ = meta["path"]
        for k in TENSORS:  # the linear head has no gates_, a head without projection none
            if not hasattr(est, k):
                setattr(est, k, None)
        est._set_heads()
        return est


class AttentionNetwork(nn.Module):
    """The recovered head: projection, one attention head per rank-one term, mean pooling.

    forward(x (n, T, d)) = b + 1/T sum_t sum_j [1/T (z Q_j)(z K_j)^T (* gate_j) (z V_j) W_O_j]_t
    with z the projected tokens (and a constant 1 when ``append_one``). Q_j K_j^T = W1_j and
    V_j W_O_j = W2_j are balanced factorizations (SVD square roots) of the recovered heads.
    """

    def __init__(
        self,
        projection: nn.Module,
        W1: torch.Tensor,
        W2: torch.Tensor,
        gates: torch.Tensor | None,
        bias: torch.Tensor,
        append_one: bool,
        head_chunk: int = 32,
    ):
        super().__init__()
        self.projection = projection
        self.append_one = append_one
        self.head_chunk = head_chunk
        Uq, sq, Vq = torch.linalg.svd(W1, full_matrices=False)
        Uv, sv, Vv = torch.linalg.svd(W2, full_matrices=False)
        root_q, root_v = sq.sqrt().unsqueeze(1), sv.sqrt()
        self.query = _frozen(Uq * root_q)  # (m, d', d')
        self.key = _frozen(Vq.transpose(1, 2) * root_q)  # (m, d', d')
        self.value = _frozen(Uv * root_v.unsqueeze(1))  # (m, d', r)
        self.out = _frozen(Vv * root_v.unsqueeze(2))  # (m, r, c)
        self.bias = _frozen(bias)
        self.gate = None if gates is None else _frozen(gates)  # (m, d', d')

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projection(x)
        if self.append_one:
            z = torch.cat([z, z.new_ones(*z.shape[:2], 1)], dim=2)
        T = z.shape[1]
        out = self.bias.expand(z.shape[0], -1).clone()
        zt = z.transpose(1, 2).unsqueeze(1)  # (n, 1, d', T)
        for s in range(0, self.n_heads, self.head_chunk):
            h = slice(s, s + self.head_chunk)
            q = torch.einsum("ntd,mdr->nmtr", z, self.query[h])
            k = torch.einsum("ntd,mdr->nmtr", z, self.key[h])
            v = torch.einsum("ntd,mdr->nmtr", z, self.value[h])
            scores = q @ k.transpose(-1, -2) / T  # (n, m, T, T)
            if self.gate is not None:
                on = torch.einsum("ntd,mde->nmte", z, self.gate[h]) @ zt >= 0
                scores = scores * on.to(scores.dtype)
            pooled = (scores @ v).mean(dim=2)  # (n, m, r)
            out = out + torch.einsum("nmr,mrc->nc", pooled, self.out[h])
        return out


def fit_projection(
    X: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token mean (d,) and whitened principal directions P (d, k') of the rows of X (..., d):
    (N, d) tokens, or (n, T, d) samples of tokens, in float64.

    Fitted on at most PCA_MAX_TOKENS rows drawn with ``generator``, gathered from X as it is
    laid out (flattening a transposed (n, T, d) view first copied all of it: 7.5 s for 10000 x
    49 x 1280 tokens, to keep 32768). Up to
    PCA_EXACT_MAX_FEATURES features the covariance is diagonalised; above, a randomized range
    finder (k + 10 columns, 4 power iterations) works in X's dtype with the small factorizations
    in float64. Directions with variance below VARIANCE_RTOL times the largest are dropped.
    """
    lead, d = X.shape[:-1], X.shape[-1]
    N = math.prod(lead)
    if N > PCA_MAX_TOKENS:
        pick = torch.randperm(N, generator=generator)[:PCA_MAX_TOKENS].to(X.device)
        X = X[torch.unravel_index(pick, lead)]
    else:
        X = X.reshape(N, d)
    mu = X.mean(dim=0).to(torch.float64)  # (a float64 copy of X would double the memory)
    if d <= PCA_EXACT_MAX_FEATURES:
        Xc = X.to(torch.float64) - mu
        var, vecs = torch.linalg.eigh(Xc.T @ Xc / X.shape[0])
        var, vecs = var.flip(0)[:k], vecs.flip(1)[:, :k]
    else:
        var, vecs = _randomized_pca(X, mu, k, generator)
    if not float(var[0]) > 0:
        raise ValueError("the tokens do not vary; there is nothing to project")
    # Eigen- and singular vectors come with an arbitrary sign, which differs between LAPACK
    # and cuSOLVER; gates act on the projected tokens, so the sign changes the program. Each
    # direction's largest entry is made positive: the same projection on every device.
    cols = torch.arange(vecs.shape[1], device=vecs.device)
    vecs = vecs * torch.sign(vecs[vecs.abs().argmax(dim=0), cols])
    keep = var > VARIANCE_RTOL * var[0]
    return mu, vecs[:, keep] / var[keep].sqrt()


def _randomized_pca(X, mu, k, generator):
    N, d = X.shape
    w = X.dtype
    muw = mu.to(w)

    def times(M):  # (X - 1 mu^T) M
        return X @ M - muw @ M

    def times_t(M):  # (X - 1 mu^T)^T M
        return X.T @ M - muw.unsqueeze(1) * M.sum(dim=0)

    def orth(M):
        return torch.linalg.qr(M.to(torch.float64)).Q.to(w)

    q = min(d, k + PCA_OVERSAMPLE)
    omega = torch.randn(d, q, generator=generator, dtype=torch.float64).to(X.device, w)
    Q = orth(times(omega))
    for _ in range(PCA_POWER_ITERS):
        Q = orth(times(orth(times_t(Q))))
    B = times_t(Q).to(torch.float64).T  # (q, d): the rows of X - 1 mu^T live near span(Q)
    _, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return (s[:k] ** 2 / N), Vh[:k].T


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def _as_tokens(X: Any) -> torch.Tensor:
    T = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if not torch.is_floating_point(T):
        T = T.to(torch.float64)
    if T.ndim != 3:
        raise ValueError(
            f"X must be 3-dimensional (n_samples, n_tokens, n_features), got shape {tuple(T.shape)}"
        )
    if min(T.shape) < 1:
        raise ValueError(f"X needs at least one sample, token and feature, got {tuple(T.shape)}")
    if not all_finite(T):
        raise ValueError("X contains NaN or infinite values")
    return T


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _seed(random_state: int | None, stream: int) -> int:
    """A seed per random stream (gates, projection, validation split) of one random_state."""
    if random_state is None:
        return int(np.random.default_rng().integers(2**31))
    return int(np.random.SeedSequence([random_state, stream]).generate_state(1)[0])


__all__ = ["AttentionNetwork", "ConvexAttentionClassifier", "fit_projection"]
