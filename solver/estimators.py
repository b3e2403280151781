"""ConvexMLPRegressor and ConvexMLPClassifier: two-layer (gated) ReLU heads as convex programs.

Objective, with Z = [X, 1] when ``fit_intercept`` (else Z = X), fixed gates g_i and patterns
D_i = diag(1[Z g_i >= 0]), weights W_i of shape (n_features [+1], n_outputs) and an
unpenalized output bias b:

    squared:        1/(2n) || sum_i D_i Z W_i + 1 b^T - Y ||_F^2  +  lam * sum_i ||W_i||
    cross_entropy:  1/n sum_j CE(softmax(row j of sum_i D_i Z W_i + 1 b^T), y_j)
                    +  lam * sum_i ||W_i||

||.|| is the nuclear norm (``penalty="nuclear"``: exactly the weight decay
lam/2 (||W1||^2 + ||W2||^2) of the recovered gated network) or the Frobenius norm
(``penalty="frobenius"``: a group lasso, cheaper, a relaxation when n_outputs > 1).
For the classifier with the squared loss, Y is the one-hot encoding of y.

The fit stops when the relative duality gap (primal - dual) / primal, computed from a dual
point built from the residual and checked on every gate, is at most ``tol``; the returned
``duality_gap_`` is that certificate. If ``max_iter`` iterations come first, a
ConvergenceWarning is issued and ``duality_gap_`` says how far the result is from certified.
Float32 inputs are solved in float32 to a gap of 1e-4, then polished in float64. With the
Frobenius penalty (or one output) Newton-CG finishes instead: float32 accelerated
proximal-gradient rounds find the nonzero blocks (to a gap of 0.3, or 1e-2 when the
preconditioner below does not apply), then float64 Newton steps on those blocks converge fast,
dropping blocks that leave the support and bringing in gates that violate the dual constraint
with a proximal-gradient step on them; short float32 first-order rounds remain for a support
that keeps changing (float64 inputs take the same route). The Newton systems are solved by
conjugate gradients with a row-space (Woodbury) preconditioner that is exact up to 1e-4 when n
x n_outputs <= 2250 (so a step costs a Cholesky factorisation of that size and one or two
operator products) and built on a 1500-row subsample for larger n (any n with one output,
up to 1200 rows with 10 outputs; a few more products per step), both sizes smaller with fewer
than 1280 features; the gap
then falls to 1e-9 or below in a handful of steps. With the nuclear penalty and several outputs
(the classifier's default) the norm is not differentiable at rank-deficient blocks and the
solve stays first-order; on a CPU with native bfloat16 (AVX512-BF16, AMX), programs where one
operator product costs at least 1e9 flops start with products in bfloat16 (float32
accumulation, about twice as fast) until the objective stops falling, then go on in float32
and float64 as above, so the certificate is unchanged. Moderately regularised programs reach
tol=1e-6 in seconds, but at small lam (below about 1e-2 * lam_max_, nearly every gate active)
the default max_iter may not suffice for 1e-6, and the warning is the honest outcome.
``n_iter_`` counts first-order iterations and Newton-CG operator products (each costs one
product with the gated operator and one with its adjoint).

After the fit, ``pricing_violation_`` is the largest ratio ||(D_g Z)^T theta||_dual / lam over
``pricing_gates`` fresh random gates (theta = -grad of the loss at the fit): above 1, some
pattern outside the sample would lower the objective. With ``pricing_rounds=k`` (gated ReLU
only) the estimator acts on it, as column generation: up to k times it prices a fresh draw,
appends the violating gates (the most violating first, at most as many as it has, so a round
at most doubles the program; duplicate patterns dropped), and solves the grown program from
the current weights (each solve with its own ``max_iter``; ``n_iter_`` sums them). ``gates_``
and the certificate are then those of the grown program, ``pricing_added_`` lists the gates
each round added, and ``pricing_violation_`` is measured on a draw no round used.
``lam="auto"`` fits a geometric path of ``n_lams`` values from ``lam_max_`` down to
``lam_min_ratio * lam_max_`` on a (1 - ``validation_fraction``) split, warm-started, each point
to a gap of 1e-3 or a fifth of ``max_iter``; the lam of least validation loss (the program's
own loss on the held-out rows) wins, ``path_`` records each point's validation loss, score
(accuracy, or R^2) and certificate, and the head is refitted on all samples at that lam.
Inputs are used as given; no centering or scaling happens inside.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ClassifierMixin, ConvergenceWarning, NeuronHead, Progress, all_finite
from .losses import LOSSES, CrossEntropyLoss, SquaredLoss
from .network import gated_network, relu_network
from .operator import GatedOperator
from .patterns import compute_patterns, sample_gates, unique_patterns
from .penalties import PENALTIES, GroupFrobenius, GroupNuclear
from .problem import Problem, certificate, zero_threshold
from .relu import solve_relu
from .workingset import solve

# Up to this many rows, a gated head predicts through its neurons instead of its blocks (one
# row of a 32-gate, 10-class head on 1281 features: 0.27 -> 0.10 ms; 256 rows 3.1 -> 2.6 ms;
# 4096 rows 46 -> 64 ms, where the operator's products are faster; bench/README.md).
NEURON_ROWS = 256


def _as_tensor(X: Any) -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        T = X
    else:
        T = torch.as_tensor(np.asarray(X))
    if not torch.is_floating_point(T):
        T = T.to(torch.float64)
    if T.ndim != 2:
        raise ValueError(
            f"X must be 2-dimensional (n_samples, n_features), got shape {tuple(T.shape)}"
        )
    if not all_finite(T):
        raise ValueError("X contains NaN or infinite values")
    return T


class _ConvexMLP(NeuronHead):
    _estimator_type = "regressor"

    def __init__(
        self,
        activation: str = "gated_relu",
        gates: int | Any = 128,
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
        pricing_gates: int = 256,
        pricing_rounds: int = 0,
    ):
        self.activation = activation
        self.gates = gates
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
        self.pricing_gates = pricing_gates
        self.pricing_rounds = pricing_rounds

    # -- parameters ---------------------------------------------------------------------------
    def _check_params(self) -> None:
        self._check_activation_and_penalty()
        if self._loss_name() not in self._allowed_losses():
            raise ValueError(f"loss must be one of {self._allowed_losses()}, got {self.loss!r}")
        self._check_lam_and_tol()
        rounds = self.pricing_rounds
        if not isinstance(rounds, (int, np.integer)) or isinstance(rounds, bool) or rounds < 0:
            raise ValueError(f"pricing_rounds must be a non-negative integer, got {rounds!r}")
        if rounds and self.activation == "relu":
            raise ValueError(
                "pricing_rounds needs activation='gated_relu' (the exact ReLU "
                "program's patterns carry cone constraints pricing does not check)"
            )
        if rounds and self.pricing_gates <= 0:
            raise ValueError("pricing_rounds needs pricing_gates > 0: the fresh gates to price")
        if rounds and self.lam == 0:
            raise ValueError("pricing_rounds needs lam > 0 (at lam = 0 every gate violates)")

    def _allowed_losses(self) -> tuple[str, ...]:
        return ("squared",)

    # -- data ---------------------------------------------------------------------------------
    def _augment(self, X: torch.Tensor) -> torch.Tensor:
        if not self.fit_intercept:
            return X
        return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], dim=1)

    def _targets(self, y: Any, X: torch.Tensor) -> torch.Tensor:
        Y = torch.as_tensor(np.asarray(y), dtype=X.dtype).to(X.device)
        return Y.reshape(-1, 1) if Y.ndim == 1 else Y

    def _gates_for(self, Z: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gates, (int, np.integer)):
            if self.gates < 1:
                raise ValueError("gates must be a positive integer or an array of gate vectors")
            gen = torch.Generator().manual_seed(
                self.random_state
                if self.random_state is not None
                else int(np.random.default_rng().integers(2**31))
            )
            return sample_gates(Z, int(self.gates), gen, anchored=self.fit_intercept)
        G = torch.as_tensor(
            np.asarray(self.gates) if not isinstance(self.gates, torch.Tensor) else self.gates
        )
        G = G.to(device=Z.device, dtype=Z.dtype)
        d = Z.shape[1] - int(self.fit_intercept)
        if G.ndim != 2 or G.shape[0] not in {d, Z.shape[1]}:
            raise ValueError(
                f"gates must have shape (n_features, p) = ({d}, p), got {tuple(G.shape)}"
            )
        if G.shape[0] == d and self.fit_intercept:
            G = torch.cat([G, torch.zeros(1, G.shape[1], dtype=G.dtype, device=G.device)])
        return G

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, *, progress: Progress | None = None) -> _ConvexMLP:
        """Fit the head. ``progress(fraction, info)`` is called as the solver goes."""
        self._check_params()
        Xt = _as_tensor(X)
        with _cpu_threads_for(Xt, int(self.gates) if isinstance(self.gates, int) else 0):
            return self._fit(Xt, y, progress)

    def _fit(self, Xt: torch.Tensor, y: Any, progress: Progress | None) -> _ConvexMLP:
        Y = self._targets(y, Xt)
        if Y.shape[0] != Xt.shape[0]:
            raise ValueError(f"X has {Xt.shape[0]} samples but y has {Y.shape[0]}")
        self.n_features_in_ = Xt.shape[1]
        Z = self._augment(Xt)
        G = self._gates_for(Z)
        masks = compute_patterns(Z, G)
        keep = unique_patterns(masks)
        G = self.gates_ = G[:, keep]
        masks = masks[:, keep]
        loss: SquaredLoss | CrossEntropyLoss = LOSSES[self._loss_name()]()
        pen: GroupFrobenius | GroupNuclear = PENALTIES[self.penalty]()
        self.lam_max_ = lam_max(Z, masks, Y, loss, pen, self.fit_intercept)
        reduced = self._row_space(Z)
        Zs = Z if reduced is None else reduced[0]
        if self.lam == "auto":
            self.lam_, self.path_, W0 = self._choose_lam(Zs, masks, Y, loss, pen, progress)
        else:
            self.lam_, W0 = float(self.lam), None
        if self.activation == "relu":
            return self._fit_relu(Z, masks, Y, loss, progress)
        problem = Problem(GatedOperator(Zs, masks), Y, loss, pen, self.lam_, self.fit_intercept)
        W = W0 if W0 is not None else Z.new_zeros(masks.shape[1], Zs.shape[1], Y.shape[1])
        res = self._solve(problem, W, problem.zero_bias(), progress)
        n_iter, self.pricing_added_ = res.n_iter, []
        for r in range(self.pricing_rounds):
            seed = 20_011 + 7_919 * r + (self.random_state or 0)
            fresh, fresh_masks, ratio = self._fresh_gate_ratios(Z, problem, res.W, res.b, seed)
            grown = self._add_violating(G, masks, fresh, fresh_masks, ratio)
            if grown is None:
                break
            self.pricing_added_.append(grown[0].shape[1] - G.shape[1])
            G, masks = grown
            W = torch.cat(
                [res.W, res.W.new_zeros(masks.shape[1] - res.W.shape[0], *res.W.shape[1:])]
            )
            problem = Problem(GatedOperator(Zs, masks), Y, loss, pen, self.lam_, self.fit_intercept)
            res = self._solve(problem, W, res.b.to(Zs.dtype), progress)
            n_iter += res.n_iter
        if self.pricing_added_:
            self.gates_ = G
            self.lam_max_ = lam_max(Z, masks, Y, loss, pen, self.fit_intercept)
        W, cert, converged = res.W, res.cert, res.converged
        if reduced is not None:
            # Back to the features, and the certificate of the program as stated, in the
            # precision the solve ended in.
            problem = Problem(GatedOperator(Z, masks), Y, loss, pen, self.lam_, self.fit_intercept)
            W = torch.einsum("dr,prc->pdc", reduced[1].to(W.dtype), W)
            final = problem if W.dtype == Z.dtype else problem.to(W.dtype)
            cert = certificate(final, W, res.b, final.forward(W))
            converged = cert.gap <= self.tol
        self._store(W, res.b, cert, n_iter, converged, 0.0)
        self.pricing_violation_ = self._pricing(Z, problem, W, res.b)
        return self._finish(progress)

    def _solve(self, problem: Problem, W: torch.Tensor, b: torch.Tensor, progress):
        return solve(
            problem,
            W,
            b,
            tol=self.tol,
            max_iter=self.max_iter,
            working_set=self.working_set,
            callback=_progress_adapter(progress, self.tol),
        )

    def _row_space(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Z V, V) for an orthonormal basis V (d, r) of Z's row space, when Z has at most 3/4
        as many rows as columns (the gated program only); else None.

        The loss sees a block W_i only through D_i Z W_i, and projecting W_i onto the row
        space never raises its Frobenius or nuclear norm, so every optimum has W_i = V C_i and
        the program in C_i with data Z V (r <= n columns instead of d) is the same program:
        the same objective, dual constraint and iterates, at a fraction of the cost per
        product (45 images of 1280 features: 28x fewer columns). Measured with d = 1280, 64
        gates, 3 classes, 300 iterations: n = 800 4.70 -> 3.34 s; n = 1100 5.78 -> 5.61 s (the
        SVD then eats most of the gain), hence the 3/4.
        """
        n, d = Z.shape
        if self.activation != "gated_relu" or 4 * n > 3 * d:
            return None
        U, s, Vh = torch.linalg.svd(Z.to(torch.float64), full_matrices=False)
        r = int((s > s[0] * d * torch.finfo(torch.float64).eps).sum())
        if r == 0:
            return None
        return (U[:, :r] * s[:r]).to(Z.dtype), Vh[:r].T

    def _fit_relu(self, Z, masks, Y, loss, progress) -> _ConvexMLP:
        res = solve_relu(
            Z,
            masks,
            Y,
            loss,
            self.lam_,
            self.fit_intercept,
            tol=self.tol,
            max_iter=self.max_iter,
            callback=_progress_adapter(progress, self.tol),
        )
        self._store(res.U, res.b, res.cert, res.n_iter, res.converged, res.violation)
        self.pricing_violation_, self.pricing_added_ = float("nan"), []
        return self._finish(progress)

    def _choose_lam(self, Z, masks, Y, loss, pen, progress):
        """Geometric path from lam_max down on a training split, warm-started; the lam of least
        validation loss wins (``_lam_path``)."""
        seed = 0 if self.random_state is None else self.random_state
        val, tr = self._validation_split(Z.shape[0], self.validation_fraction, seed, Z.device)
        lam_hi = self.lam_max_ if self.lam_max_ > 0 else 1.0
        lams = lam_hi * np.geomspace(1.0, self.lam_min_ratio, self.n_lams)
        op = GatedOperator(Z[tr], masks[tr])
        W = Z.new_zeros(masks.shape[1], Z.shape[1], Y.shape[1])
        b = torch.zeros(Y.shape[1], dtype=Z.dtype, device=Z.device)

        def solve_at(lam: float):
            nonlocal W, b
            prob = Problem(op, Y[tr], loss, pen, lam, self.fit_intercept)
            res = solve(
                prob,
                W,
                b,
                working_set=self.working_set,
                **self._path_limits(),
            )
            W, b = res.W.to(Z.dtype), res.b.to(Z.dtype)
            return GatedOperator(Z[val], masks[val]).matvec(W) + b, res.cert, W

        return self._lam_path(lams, solve_at, Y[val], loss, (lam_hi, W), progress)

    def _pricing(self, Z, problem, W, b) -> float:
        """Largest dual-constraint ratio ||A_g^T theta|| / lam over fresh random gates.

        A value above 1 means the sampled program misses patterns that would lower the
        objective of the full (all-patterns) program; at or below 1 none of the fresh gates does.
        The draw is never one that ``pricing_rounds`` added gates from.
        """
        if self.pricing_gates <= 0 or problem.lam <= 0:
            return float("nan")
        seed = 10_007 + (self.random_state or 0)
        return float(self._fresh_gate_ratios(Z, problem, W, b, seed)[2].max())

    def _fresh_gate_ratios(self, Z, problem, W, b, seed: int):
        """(G, masks, ratio): ``pricing_gates`` fresh gates, their patterns on Z and, per
        gate, ||A_g^T theta|| / lam with theta = -grad of the loss at the current outputs. A
        ratio above 1 means adding that gate's block (at zero) lets the objective fall.
        ``problem`` may act on Z's row-space coordinates (see ``_row_space``): the norms are the
        same there."""
        gen = torch.Generator().manual_seed(seed)
        G = sample_gates(Z, self.pricing_gates, gen, anchored=self.fit_intercept)
        masks = compute_patterns(Z, G)
        op = GatedOperator(problem.op.X, masks)
        dtype = problem.Y.dtype
        F = problem.op.matvec(W.to(dtype)) + b.to(dtype)
        theta = -problem.loss.grad(F, problem.Y)
        return G, masks, problem.penalty.dual_norms(op.rmatvec(theta)) / problem.lam

    @staticmethod
    def _add_violating(G, masks, fresh, fresh_masks, ratio):
        """(gates, patterns) with the fresh gates whose ratio exceeds 1 appended, the most
        violating first and at most as many as there are gates (so a round at most doubles the
        program), their patterns deduplicated against the current ones; None when none is new."""
        order = torch.argsort(ratio, descending=True)
        order = order[ratio[order] > 1.0][: G.shape[1]]
        if order.numel() == 0:
            return None
        G2 = torch.cat([G, fresh[:, order]], dim=1)
        masks2 = torch.cat([masks, fresh_masks[:, order]], dim=1)
        keep = unique_patterns(masks2)
        if keep.numel() <= G.shape[1]:
            return None
        return G2[:, keep], masks2[:, keep]

    # -- prediction ---------------------------------------------------------------------------
    def decision_function(self, X: Any) -> torch.Tensor:
        """Model outputs sum_i D_i Z W_i + b, shape (n, n_outputs), as a tensor."""
        self._check_fitted()
        Xt = _as_tensor(X).to(device=self.weights_.device, dtype=self.weights_.dtype)
        if Xt.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Xt.shape[1]} features, the head was fitted on {self.n_features_in_}"
            )
        Z = self._augment(Xt)
        owner, U, V = self._neurons
        if self.activation == "relu":
            return torch.relu(Z @ U) @ V + self.intercept_
        masks = compute_patterns(Z.to(self.gates_.dtype), self.gates_)
        if len(Z) <= NEURON_ROWS:
            # Few rows (online predictions): through the neurons, the blocks' factors with zero
            # gates pruned; the operator would copy every W_i into its product's layout first.
            return ((Z @ U) * masks[:, owner].to(Z.dtype)) @ V + self.intercept_
        return GatedOperator(Z, masks).matvec(self.weights_) + self.intercept_

    def predict(self, X: Any) -> np.ndarray:
        F = self.decision_function(X).cpu().numpy()
        return F[:, 0] if F.shape[1] == 1 else F

    def score(self, X: Any, y: Any) -> float:
        F = self.decision_function(X)
        return self._validation_score(F, self._targets(y, F))

    # -- export -------------------------------------------------------------------------------
    def to_torch(self) -> torch.nn.Module:
        """The recovered network (zero neurons pruned); its outputs equal decision_function."""
        self._check_fitted()
        owner, U, V = self._neurons
        if self.activation == "relu":
            return relu_network(U, V, self.intercept_, self.fit_intercept)
        return gated_network(self.gates_[:, owner], U, V, self.intercept_, self.fit_intercept)

    def save(self, path: str | Path) -> None:
        """Write the fitted head to directory ``path``: tensors.safetensors + head.json."""
        from .io import save_head

        self._check_fitted()
        save_head(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> _ConvexMLP:
        from .io import load_head

        return load_head(Path(path), cls)


class ConvexMLPRegressor(_ConvexMLP):
    __doc__ = "Convex two-layer (gated) ReLU regressor.\n" + (__doc__ or "")


class ConvexMLPClassifier(ClassifierMixin, _ConvexMLP):
    __doc__ = "Convex two-layer (gated) ReLU classifier.\n" + (__doc__ or "")

    def _allowed_losses(self) -> tuple[str, ...]:
        return ("squared", "cross_entropy")

    def fit(self, X: Any, y: Any, *, progress: Progress | None = None) -> ConvexMLPClassifier:
        self.classes_ = self._classes_of(y)
        super().fit(X, y, progress=progress)
        return self


def lam_max(Z, masks, Y, loss, pen, fit_bias: bool) -> float:
    """Smallest lam whose solution is W = 0: max_i ||(D_i Z)^T theta_0||_dual, theta_0 = -grad f
    at W = 0 (with the optimal bias when one is fitted)."""
    return zero_threshold(GatedOperator(Z, masks), Y, loss, pen, fit_bias)


SMALL_PROBLEM = 1 << 24  # elements of X times gates: below this, one thread is fastest


@contextmanager
def _cpu_threads_for(X: torch.Tensor, gates: int) -> Iterator[None]:
    """Run small CPU problems on one thread, then restore torch's setting.

    Each iteration of a small program is many tiny operations; splitting them over threads
    costs more than it saves, and when the cores are busy (an API and a worker on the same
    machine) it costs 10 to 50 times more (measured: 8.5 ms against 75-420 ms per iteration
    for a 120 x 1280, 16-gate fit on 2 busy cores).
    """
    if X.device.type != "cpu" or X.numel() * max(gates, 1) >= SMALL_PROBLEM:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress_adapter(progress: Progress | None, tol: float):
    if progress is None:
        return None

    def cb(it: int, cert) -> None:
        # Progress in log-gap space: 0 at a gap of 1, 1 at the target tol.
        frac = math.log(max(cert.gap, tol)) / math.log(tol) if cert.gap < 1 else 0.0
        progress(
            min(0.99, max(0.0, frac)), {"iteration": it, "gap": cert.gap, "objective": cert.primal}
        )

    return cb


__all__ = ["ConvergenceWarning", "ConvexMLPClassifier", "ConvexMLPRegressor", "lam_max"]
