"""ConvexCNNClassifier: a Conv -> ReLU -> average pool -> Linear head fitted as a convex program.

Inputs are feature maps X (n, C, H, W), e.g. a backbone's last 1280 x 7 x 7 map. With patches
x_{i,b} (b = 1..B positions of a k x k, stride s, padding q conv; a constant 1 appended when
``fit_intercept``, the conv bias), gate filters g_j and masks D[i, j, b] = 1[x_{i,b}^T g_j >= 0],
weights W_j of shape (C k^2 [+1], n_classes) and an unpenalized output bias b, the objective is

    cross_entropy:  1/n sum_i CE(softmax(f_i + b), y_i)          +  lam * sum_j ||W_j||
    squared:        1/(2n) sum_i ||f_i + b - onehot(y_i)||^2     +  lam * sum_j ||W_j||
    with            f_i = (1/B) sum_j sum_b D[i, j, b] x_{i,b}^T W_j.

``penalty="nuclear"``: ||.|| is the nuclear norm, exactly the weight decay lam/2 (||conv||^2 +
||linear||^2) of the recovered gated CNN (conv biases included, output bias not);
``penalty="frobenius"``: a group lasso, a cheaper relaxation. ``activation="relu"`` solves the
exact ReLU program instead: per-class neurons V_jk, W_jk (penalty lam * sum ||V_jk||_2 +
||W_jk||_2) constrained to (2 D_jb - I) X_b V_jk >= 0 for every position b, so the recovered
Conv2d -> ReLU network has exactly that objective; it runs an augmented Lagrangian whose
multipliers take n B 2p n_classes numbers, so it is for moderate sizes (a few hundred samples
and gates), and reports ``constraint_violation_``.

What the default guarantees: the fit stops when the relative duality gap (primal - dual) /
primal of the program with the sampled gates, checked on every gate, is at most ``tol`` (1e-6);
``duality_gap_`` is that certificate, and at ``max_iter`` a ConvergenceWarning says how far the
result is. Float32 inputs are solved in float32 to a gap of 1e-4 (1e-2 with the Frobenius
penalty, where the float64 phase has the Newton polish), then polished in float64.
``lam >= lam_max_`` gives all-zero weights (the outputs are then the class log-frequencies);
for ``activation="relu"`` lam_max_ is the gated program's threshold, a bound above the exact one.

Memory and time. With ``n_components`` (default 64) the channels are first projected by PCA
(mean and components fitted on at most 65536 training positions, stored and applied again at
predict, and part of the exported module), so a patch has h = n_components k^2 + 1 numbers.
The solver keeps the masks (n p B bytes) and, when n p h numbers fit ``cache_bytes``, the
masked pooled patches phi (n, p, h); then an iteration costs about 4 n p h n_classes flops.
For n = 10k, 1280 x 7 x 7 inputs, k = 1 and the defaults (64 components, 128 gates) phi is
333 MB in float32 (666 MB for the float64 polish) where 1280 raw channels would need 6.5 GB;
500 iterations with 64 gates took 46 s on one core (512 components: 294 s, phi 1.3 GB, so
``cache_bytes`` raised). Beyond the budget phi is rebuilt in blocks at each
product (about B times slower): with k = 3, lower n_components or gates.
Device and dtype follow the inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierMixin, NeuronHead, Progress, all_finite
from .cnn_operator import ConvGeometry, ConvOperator, solve_conv_relu
from .estimators import _cpu_threads_for, _progress_adapter
from .io import COMMON_SCALARS, head_meta, read_head, write_head
from .losses import LOSSES, CrossEntropyLoss, SquaredLoss
from .patterns import unique_patterns
from .penalties import PENALTIES, GroupFrobenius, GroupNuclear
from .problem import Problem, zero_threshold
from .workingset import solve

PCA_MAX_POSITIONS = 1 << 16
TENSORS = ("gates_", "gate_bias_", "weights_", "intercept_", "pca_mean_", "components_")
SCALARS = (
    *COMMON_SCALARS,
    "constraint_violation_",
    "n_features_in_",
    "path_",
)


class ConvexCNNClassifier(ClassifierMixin, NeuronHead):
    __doc__ = __doc__

    def __init__(
        self,
        activation: str = "gated_relu",
        gates: int | Any = 128,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        lam: float | str = 1e-3,
        penalty: str = "nuclear",
        loss: str | None = None,
        fit_intercept: bool = True,
        tol: float = 1e-6,
        max_iter: int = 5000,
        random_state: int | None = None,
        working_set: bool = True,
        n_lams: int = 12,
        lam_min_ratio: float = 1e-3,
        validation_fraction: float = 0.2,
        n_components: int | None = 64,
        cache_bytes: int = 1 << 30,
    ):
        self.activation = activation
        self.gates = gates
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.lam = lam
        self.penalty = penalty
        self.loss = loss
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.working_set = working_set
        self.n_lams = n_lams
        self.lam_min_ratio = lam_min_ratio
        self.validation_fraction = validation_fraction
        self.n_components = n_components
        self.cache_bytes = cache_bytes

    # -- parameters ---------------------------------------------------------------------------
    def _check_params(self) -> None:
        self._check_activation_and_penalty()
        if self._loss_name() not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        self._check_lam_and_tol()
        for name in ("kernel_size", "stride"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.padding, (int, np.integer)) or self.padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {self.padding!r}")
        if self.n_components is not None and (
            not isinstance(self.n_components, (int, np.integer)) or self.n_components < 1
        ):
            raise ValueError(
                f"n_components must be None or a positive integer, got {self.n_components!r}"
            )

    def _geometry(self) -> ConvGeometry:
        return ConvGeometry(
            int(self.kernel_size), int(self.stride), int(self.padding), bool(self.fit_intercept)
        )

    # -- data ---------------------------------------------------------------------------------
    def _feature_map(self, X: Any) -> torch.Tensor:
        T = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
        if not torch.is_floating_point(T):
            T = T.to(torch.float64)
        if T.ndim != 4:
            raise ValueError(
                "X must be a 4-dimensional feature map (n_samples, channels, height, width), "
                f"got shape {tuple(T.shape)}"
            )
        k, q = int(self.kernel_size), int(self.padding)
        if min(T.shape[2], T.shape[3]) + 2 * q < k:
            raise ValueError(
                f"X's spatial size {tuple(T.shape[2:])} with padding {q} is smaller than "
                f"kernel_size {k}"
            )
        if not all_finite(T):
            raise ValueError("X contains NaN or infinite values")
        return T

    def _fit_projection(self, X: torch.Tensor, gen: torch.Generator) -> None:
        """PCA of the channels over (a sample of) the training positions: the mean in float64,
        the covariance of the centred sample in at least float32 (the eigenvectors of a float32
        Gram matrix of 65536 positions are ample for a projection, at a third of float64's
        time), its eigenvectors in float64."""
        n, C, H, W = X.shape
        q = int(self.n_components)  # type: ignore[arg-type]
        if q > C:
            raise ValueError(f"n_components={q} exceeds the {C} channels of X")
        total = n * H * W
        if total <= PCA_MAX_POSITIONS:
            pick = torch.arange(total)
        else:
            pick = torch.randperm(total, generator=gen)[:PCA_MAX_POSITIONS]
        pick = pick.to(X.device)
        work = torch.promote_types(X.dtype, torch.float32)
        rows = X.flatten(2)[pick // (H * W), :, pick % (H * W)].to(work)  # (m, C)
        mean = rows.to(torch.float64).mean(dim=0)
        centered = rows - mean.to(work)
        evals, evecs = torch.linalg.eigh((centered.T @ centered).to(torch.float64))
        comps = evecs[:, torch.argsort(evals, descending=True)[:q]]
        # A fixed sign per component, so refits on the same data store the same projection.
        flip = torch.sign(
            comps[torch.argmax(comps.abs(), dim=0), torch.arange(q, device=comps.device)]
        )
        self.pca_mean_ = mean.to(X.dtype)
        self.components_ = (comps * flip).to(X.dtype)

    def _project(self, X: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Channels -> PCA coordinates (the same op the exported module runs), channels_last."""
        if not hasattr(self, "components_"):
            return X if dtype is None else X.to(dtype)
        dtype = dtype or self.components_.dtype
        weight, bias = _projection_conv(self.components_.to(dtype), self.pca_mean_.to(dtype))
        return project_channels(X.to(device=weight.device, dtype=dtype), weight, bias)

    def _sample_gates(
        self, X: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian conv filters; with an intercept each offset puts the gate's hyperplane
        through a random point between two training patches (as the MLP's anchored gates)."""
        n, C = X.shape[:2]
        k, p = int(self.kernel_size), int(self.gates)
        G = torch.randn(p, C, k, k, generator=gen, dtype=torch.float64).to(X.device, X.dtype)
        bias = X.new_zeros(p)
        if self.fit_intercept:
            geo = ConvGeometry(k, int(self.stride), int(self.padding), False)
            H, W = geo.out_size(X.shape[2], X.shape[3])
            i = torch.randint(0, n, (2, p), generator=gen).to(X.device)
            b = torch.randint(0, H * W, (2, p), generator=gen).to(X.device)
            u = torch.rand(p, 1, generator=gen, dtype=torch.float64).to(X.device, X.dtype)
            ends = [
                geo.patches(X[i[t]])[torch.arange(p, device=X.device), :, b[t]] for t in range(2)
            ]
            anchors = u * ends[0] + (1 - u) * ends[1]  # (p, C k^2)
            bias = -(anchors * G.flatten(1)).sum(dim=1)
        return G, bias

    def _gates_for(
        self, X: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.gates, (int, np.integer)):
            if self.gates < 1:
                raise ValueError("gates must be a positive integer or an array (p, C, k, k)")
            return self._sample_gates(X, gen)
        G = (
            self.gates
            if isinstance(self.gates, torch.Tensor)
            else torch.as_tensor(np.asarray(self.gates))
        )
        G = G.to(device=X.device, dtype=X.dtype)
        k = int(self.kernel_size)
        if G.ndim != 4 or tuple(G.shape[1:]) != (X.shape[1], k, k):
            raise ValueError(
                f"gates must have shape (p, {X.shape[1]}, {k}, {k}) (channels after any "
                f"projection), got {tuple(G.shape)}"
            )
        return G, X.new_zeros(G.shape[0])

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, *, progress: Progress | None = None) -> ConvexCNNClassifier:
        """Fit the head on feature maps X (n, C, H, W). ``progress(fraction, info)`` is called
        as the solver goes."""
        self._check_params()
        Xt = self._feature_map(X)
        classes = self._classes_of(y)
        if len(np.asarray(y)) != Xt.shape[0]:
            raise ValueError(f"X has {Xt.shape[0]} samples but y has {len(np.asarray(y))}")
        self.classes_ = classes
        for name in ("pca_mean_", "components_", "path_"):
            if hasattr(self, name):
                delattr(self, name)
        gates = int(self.gates) if isinstance(self.gates, (int, np.integer)) else 0
        with _cpu_threads_for(Xt, gates):
            return self._fit(Xt, y, progress)

    def _fit(self, X: torch.Tensor, y: Any, progress: Progress | None) -> ConvexCNNClassifier:
        Y = self._targets(y, X)
        self.n_features_in_ = int(X.shape[1])
        seed = self.random_state
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        gen = torch.Generator().manual_seed(seed)
        if self.n_components is not None:
            self._fit_projection(X, gen)
            X = self._project(X)
        geo = self._geometry()
        G, g0 = self._gates_for(X, gen)
        masks = geo.masks(X, G, g0)
        n, p, B = masks.shape
        keep = unique_patterns(masks.transpose(1, 2).reshape(n * B, p))
        self.gates_, self.gate_bias_ = G[keep].contiguous(), g0[keep].contiguous()
        masks = masks[:, keep]
        op = ConvOperator(X, masks, geo, cache_bytes=int(self.cache_bytes))
        loss: SquaredLoss | CrossEntropyLoss = LOSSES[self._loss_name()]()
        pen: GroupFrobenius | GroupNuclear = PENALTIES[self.penalty]()
        exact = _ColumnNorms() if self.activation == "relu" else pen
        self.lam_max_ = zero_threshold(op, Y, loss, exact, self.fit_intercept)  # type: ignore[arg-type]
        W0 = None
        if self.lam == "auto":
            self.lam_, self.path_, W0 = self._choose_lam(op, Y, loss, pen, progress)
        else:
            self.lam_ = float(self.lam)
        callback = _progress_adapter(progress, self.tol)
        if self.activation == "relu":
            del op  # the stacked patches and multipliers take its place
            patches = geo.patch_rows(X).reshape(n * B, -1)
            rows = masks.transpose(1, 2).reshape(n * B, -1)
            res = solve_conv_relu(
                patches,
                rows,
                Y,
                loss,
                self.lam_,
                self.fit_intercept,
                tol=self.tol,
                max_iter=self.max_iter,
                callback=callback,
            )
            self._store(res.U, res.b, res.cert, res.n_iter, res.converged, res.violation)
            return self._finish(progress, stacklevel=4)
        problem = Problem(op, Y, loss, pen, self.lam_, self.fit_intercept)
        W = W0 if W0 is not None else X.new_zeros(op.n_gates, op.h, Y.shape[1])
        sol = solve(
            problem,
            W,
            problem.zero_bias(),
            tol=self.tol,
            max_iter=self.max_iter,
            working_set=self.working_set,
            callback=callback,
        )
        self._store(sol.W, sol.b, sol.cert, sol.n_iter, sol.converged, 0.0)
        return self._finish(progress, stacklevel=4)

    def _choose_lam(self, op: ConvOperator, Y, loss, pen, progress: Progress | None):
        """Geometric path from lam_max down on a training split, warm-started; the lam of
        least validation loss wins (``_lam_path``)."""
        seed = 0 if self.random_state is None else self.random_state
        val, tr = self._validation_split(Y.shape[0], self.validation_fraction, seed, Y.device)
        train_op, val_op = op.rows(tr), op.rows(val)
        lams = (self.lam_max_ or 1.0) * np.geomspace(1.0, self.lam_min_ratio, self.n_lams)
        W = Y.new_zeros(op.n_gates, op.h, Y.shape[1])
        b = torch.zeros(Y.shape[1], dtype=Y.dtype, device=Y.device)

        def solve_at(lam: float):
            nonlocal W, b
            prob = Problem(train_op, Y[tr], loss, pen, lam, self.fit_intercept)
            res = solve(
                prob,
                W,
                b,
                working_set=self.working_set,
                **self._path_limits(),
            )
            W, b = res.W.to(Y.dtype), res.b.to(Y.dtype)
            return val_op.matvec(W) + b, res.cert, W

        return self._lam_path(lams, solve_at, Y[val], loss, (float(lams[0]), W), progress)

    # -- prediction ---------------------------------------------------------------------------
    def _conv_layer(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Neuron columns U (h, m) -> Conv2d weight (m, C, k, k) and bias (m,)."""
        k = int(self.kernel_size)
        bias = U[-1].contiguous() if self.fit_intercept else None
        body = U[:-1] if self.fit_intercept else U
        return body.T.reshape(U.shape[1], -1, k, k).contiguous(), bias

    def decision_function(self, X: Any) -> torch.Tensor:
        """Logits (n, n_classes) as a tensor, on the device of the fitted weights."""
        self._check_fitted()
        Xt = self._feature_map(X).to(self.weights_.device)
        if Xt.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Xt.shape[1]} channels, the head was fitted on {self.n_features_in_}"
            )
        dtype = self.weights_.dtype
        if self.activation == "relu":
            _, U, V = self._neurons
            weight, bias = self._conv_layer(U)
            Xp = self._project(Xt, dtype)
            S = F.conv2d(Xp, weight, bias, int(self.stride), int(self.padding))
            return torch.relu(S).mean(dim=(2, 3)) @ V + self.intercept_
        # Masks in the precision of the fit, so training inputs get their training patterns.
        Xp = self._project(Xt.to(self.gates_.dtype))
        masks = self._geometry().masks(Xp, self.gates_, self.gate_bias_)
        op = ConvOperator(Xp.to(dtype), masks, self._geometry(), cache_bytes=0)
        return op.matvec(self.weights_) + self.intercept_

    # -- export -------------------------------------------------------------------------------
    def to_torch(self) -> nn.Module:
        """The recovered network on the raw feature map (PCA folded in as a 1x1 conv, zero
        neurons pruned); its outputs equal decision_function."""
        self._check_fitted()
        owner, U, V = self._neurons
        if U.shape[1] == 0:  # lam >= lam_max: one silent neuron keeps the layers well formed
            owner = owner.new_zeros(1)
            U, V = U.new_zeros(U.shape[0], 1), V.new_zeros(1, V.shape[1])
        weight, bias = self._conv_layer(U)
        s, q = int(self.stride), int(self.padding)
        output = _linear(V.T.contiguous(), self.intercept_)
        if self.activation == "relu":
            layers: list[nn.Module] = []
            if hasattr(self, "components_"):
                layers.append(_projection(self.components_, self.pca_mean_, V.dtype))
            conv = _conv(weight, bias, s, q)
            return ConvReLUHead(
                *layers, conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), output
            )
        project = None
        if hasattr(self, "components_"):
            project = _projection(self.components_, self.pca_mean_, self.gates_.dtype)
        gate = _conv(self.gates_[owner], self.gate_bias_[owner], s, q)
        return GatedConvHead(project, gate, _conv(weight, bias, s, q), output)

    # -- storage ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the fitted head to directory ``path``: tensors.safetensors + head.json."""
        self._check_fitted()
        params = self.get_params()
        if not isinstance(params["gates"], (int, np.integer)):
            params["gates"] = int(self.gates_.shape[0])  # the array itself is in gates_
        tensors = {k: getattr(self, k) for k in TENSORS if hasattr(self, k)}
        write_head(Path(path), tensors, head_meta(self, params, SCALARS))

    @classmethod
    def load(cls, path: str | Path) -> ConvexCNNClassifier:
        est, _ = read_head(Path(path), cls)
        est._set_neurons()
        return est


class _ColumnNorms:
    """Dual norm of the relu program's per-class penalty without its cones: the largest column
    norm of each block, a bound above the cone-projected norms."""

    def dual_norms(self, G: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(G, dim=1).amax(dim=1)


class GatedConvHead(nn.Module):
    """[1x1 projection ->] gate conv -> step mask times value conv -> average pool -> linear.

    Each layer runs in its own dtype (the gates in the fit's precision, so masks match it).
    """

    def __init__(
        self, project: nn.Conv2d | None, gate: nn.Conv2d, value: nn.Conv2d, output: nn.Linear
    ):
        super().__init__()
        self.project = project
        self.gate = gate
        self.value = value
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            x = self.project(x.to(self.project.weight.dtype))
        on = self.gate(x.to(self.gate.weight.dtype)) >= 0
        v = self.value(x.to(self.value.weight.dtype))
        return self.output((on.to(v.dtype) * v).mean(dim=(2, 3)))


class ConvReLUHead(nn.Sequential):
    """[1x1 projection ->] Conv2d -> ReLU -> AdaptiveAvgPool2d(1) -> Flatten -> Linear, taking
    inputs of any float dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = next(self.parameters())
        return super().forward(x.to(first.dtype))


def _projection_conv(components: torch.Tensor, mean: torch.Tensor):
    weight = components.T.contiguous()[:, :, None, None]  # (q, C, 1, 1)
    return weight, -(components.T @ mean)


def project_channels(
    X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, max_elems: int = 1 << 22
) -> torch.Tensor:
    """A 1x1 convolution (weight (q, C, 1, 1), bias (q,)) as one matrix product per block of
    samples: positions (rows) x channels times weight^T, written into a channels_last result.

    A CPU conv2d in NCHW runs this at about half the speed (10000 x 1280 x 7 x 7 -> 512
    channels, one thread: 21 s against 13 s); the input is read in blocks of ``max_elems``
    numbers, so the only full-size allocation is the result.
    """
    n, C, H, W = X.shape
    q = weight.shape[0]
    w = weight.reshape(q, C).T
    out = X.new_empty(n, H, W, q)
    step = max(1, max_elems // max(1, C * H * W))
    for s in range(0, n, step):
        block = X[s : s + step].permute(0, 2, 3, 1).reshape(-1, C)
        torch.addmm(bias, block, w, out=out[s : s + step].view(-1, q))
    return out.permute(0, 3, 1, 2)


class Projection(nn.Conv2d):
    """The PCA projection as a 1x1 Conv2d whose forward is ``project_channels``: the fit, the
    estimator's predictions and the exported module compute it by the same arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bias is not None
        return project_channels(x, self.weight, self.bias)


def _projection(components: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> nn.Conv2d:
    weight, bias = _projection_conv(components.to(dtype), mean.to(dtype))
    return _conv(weight, bias, 1, 0, layer=Projection)


def _conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    layer: type[nn.Conv2d] = nn.Conv2d,
) -> nn.Conv2d:
    m, C, k, _ = weight.shape
    conv = layer(C, m, k, stride=stride, padding=padding, bias=bias is not None)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None and conv.bias is not None:
            conv.bias.copy_(bias)
    return conv.requires_grad_(False)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.requires_grad_(False)


__all__ = ["ConvReLUHead", "ConvexCNNClassifier", "GatedConvHead", "Projection", "project_channels"]
