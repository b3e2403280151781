"""What every convex head shares: hyperparameters, fitted state, the finish, classifier outputs.

``ConvexHead`` holds the scikit-learn parameter protocol, the checks common to all heads, the
fitted scalars of a solve and the ConvergenceWarning at its end. ``NeuronHead`` adds the
(gated) ReLU neurons of the MLP and CNN heads. ``ClassifierMixin`` turns labels into one-hot
targets and logits into labels, probabilities and accuracy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import torch

from .network import factor_blocks, relu_neurons
from .penalties import PENALTIES

Progress = Callable[[float, dict[str, Any]], None]


class ConvergenceWarning(UserWarning):
    """The solver stopped at max_iter before the duality gap reached tol."""


def all_finite(T: torch.Tensor) -> bool:
    """Whether every entry of T is finite. A sum is finite when every entry is (unless it
    overflows): one cheap pass (0.1 s against 2.4 s entry by entry for 10000 Lite0 maps of
    1280 x 7 x 7); the entries are read only when it is not, a few samples at a time so no
    boolean temporary of T's size is made."""
    if bool(torch.isfinite(T.sum())):
        return True
    step = max(1, (1 << 24) // max(1, T[0].numel()))
    return all(bool(torch.isfinite(T[s : s + step]).all()) for s in range(0, len(T), step))


class ConvexHead:
    """Parameters, checks, fitted state and the finish shared by the heads."""

    _default_loss = "squared"
    lam: float | str
    loss: str | None
    fit_intercept: bool
    tol: float
    max_iter: int

    def _path_limits(self) -> dict[str, Any]:
        """tol and max_iter of one point of the lam path. A point only has to rank lam by its
        validation score: a gap of 1e-3 is plenty, and a point that stalls above it stops at a
        fifth of max_iter (45 Lite0 embeddings, nuclear: one such point took all 5000
        iterations, over half of the whole fit). 1e-3 rather than 1e-4 chose the same lam with
        64 gates on sklearn digits (51.6 -> 24.3 s for the whole fit, 2 threads) and on 1000
        Lite0 Fashion embeddings (the path 174.5 -> 108.9 s, the fit 294 -> 239 s;
        bench/README.md "The service's default head")."""
        return {
            "tol": max(self.tol, 1e-3),
            "max_iter": min(self.max_iter, max(100, self.max_iter // 5)),
        }

    # -- parameters ---------------------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyperparameters: every argument of ``__init__``, by name."""
        code = type(self).__init__.__code__
        return {k: getattr(self, k) for k in code.co_varnames[1 : code.co_argcount]}

    def set_params(self, **params: Any) -> Self:
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def _check_lam_and_tol(self) -> None:
        if not (isinstance(self.lam, str) and self.lam == "auto"):
            if not isinstance(self.lam, (int, float)) or not self.lam >= 0:
                raise ValueError(f"lam must be a non-negative number or 'auto', got {self.lam!r}")
        if not self.tol > 0:
            raise ValueError("tol must be positive")

    def _loss_name(self) -> str:
        return self.loss or self._default_loss

    # -- fitted state -------------------------------------------------------------------------
    def _store_solution(self, W, b, cert, n_iter: int, converged: bool) -> None:
        """Weights, output bias (zero without an intercept) and the certificate of a solve."""
        self.weights_ = W
        self.intercept_ = b if self.fit_intercept else torch.zeros_like(b)
        self.objective_ = cert.primal
        self.duality_gap_ = cert.gap
        self.n_iter_ = n_iter
        self.converged_ = converged

    def _finish(self, progress: Progress | None, stacklevel: int = 3) -> Self:
        """Warn if the gap did not reach tol (``stacklevel`` as for ``warnings.warn`` called
        here), then report completion to ``progress``."""
        if not self.converged_:
            violation = getattr(self, "constraint_violation_", None)
            detail = "" if violation is None else f" (constraint violation {violation:.1e})"
            warnings.warn(
                f"stopped after {self.n_iter_} iterations with relative duality gap "
                f"{self.duality_gap_:.2e}{detail}; tol={self.tol:.0e}: raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        if progress is not None:
            progress(1.0, {"gap": self.duality_gap_, "objective": self.objective_})
        return self

    def _lam_path(
        self,
        lams: Any,
        solve_at: Callable[[float], tuple[torch.Tensor, Any, torch.Tensor]],
        Y_val: torch.Tensor,
        loss: Any,
        fallback: tuple[Any, Any],
        progress: Progress | None,
    ) -> tuple[Any, list[dict[str, float]], Any]:
        """Walk ``lams`` (largest first); ``solve_at(lam)`` fits on the training split at lam,
        warm-started from the previous fit, and returns (outputs on the validation split,
        certificate, W). Returns the chosen lam, the path (one record per lam: the validation
        loss and score, objective and gap) and the chosen W; ``fallback`` (lam, W) is kept when
        no loss is finite.

        The lam of least validation loss wins (the program's own loss, cross-entropy or
        squared, on the held-out rows; a tie keeps the larger lam), not the best accuracy:
        accuracy is a count of held-out labels that goes flat where lam stops mattering, so
        its maximum falls on noise. The MLP head on 10000 Lite0 Fashion-MNIST embeddings (64
        gates, 100-iteration path points): validation accuracy 0.8695 / 0.876 / 0.877 /
        0.8785 at 0.01 / 0.0046 / 0.0022 / 0.001 lam_max, within one standard error (0.007)
        of each other, picked the last; the validation cross-entropy 0.355 / 0.346 / 0.360 /
        0.386 has its minimum at 0.0046 lam_max. Test accuracy of full fits (500 iterations):
        0.887 at 0.005 against 0.8815 at 0.001 lam_max on 2000 test images, 0.8814 against
        0.8792 on 10000 (bench/README.md "lam by validation loss")."""
        path: list[dict[str, float]] = []
        best = (math.inf, *fallback)
        Y64 = Y_val.to(torch.float64)
        for k, lam in enumerate(lams):
            F, cert, W = solve_at(float(lam))
            F64 = F.to(torch.float64)
            value = float(loss.value(F64, Y64))
            path.append(
                {
                    "lam": float(lam),
                    "validation_loss": value,
                    "validation_score": self._validation_score(F64, Y64),
                    "objective": cert.primal,
                    "duality_gap": cert.gap,
                }
            )
            if value < best[0] - 1e-12:
                best = (value, float(lam), W)
            if progress is not None:
                progress(0.8 * (k + 1) / len(lams), {"stage": "lam_path", "lam": float(lam)})
        return best[1], path, best[2]

    @staticmethod
    def _validation_split(
        n: int, fraction: float, seed: int, device: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(validation rows, training rows) of lam="auto"'s path: a seeded permutation of n
        rows, about ``fraction`` of them held out, at least one row on each side."""
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=gen).to(device)
        n_val = min(n - 1, max(1, round(fraction * n)))
        return perm[:n_val], perm[n_val:]

    def _validation_score(self, F: torch.Tensor, Y: torch.Tensor) -> float:
        """What ``score`` reports, from outputs F and targets Y: R^2 (classifiers: accuracy)."""
        ss_res = float((F - Y).square().sum())
        ss_tot = float((Y - Y.mean(dim=0)).square().sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else -ss_res

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit first")


class NeuronHead(ConvexHead):
    """A head whose weights factor into (gated) ReLU neurons: the MLP and CNN heads."""

    activation: str
    penalty: str

    def _check_activation_and_penalty(self) -> None:
        if self.activation not in {"gated_relu", "relu"}:
            raise ValueError(f"activation must be 'gated_relu' or 'relu', got {self.activation!r}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {sorted(PENALTIES)}, got {self.penalty!r}")

    def _store(self, W, b, cert, n_iter: int, converged: bool, violation: float) -> None:
        """Fitted state shared by both activations (violation: 0 for the gated program)."""
        self._store_solution(W, b, cert, n_iter, converged)
        self.constraint_violation_ = violation
        self._set_neurons()

    def _set_neurons(self) -> None:
        if self.activation == "relu":
            owner, U, V = relu_neurons(self.weights_)
        else:
            owner, U, V = factor_blocks(self.weights_)
        self._neurons = (owner, U, V)
        self.n_neurons_ = int(owner.numel())


class ClassifierMixin:
    """Labels <-> one-hot targets, and the outputs of a classifier's logits.

    Put it before the head class, so that its target encoding and predictions win.
    """

    _estimator_type = "classifier"
    _default_loss = "cross_entropy"
    classes_: np.ndarray

    if TYPE_CHECKING:  # provided by the head class

        def decision_function(self, X: Any) -> torch.Tensor: ...

        def _loss_name(self) -> str: ...

    @staticmethod
    def _classes_of(y: Any) -> np.ndarray:
        """The sorted distinct labels of y, at least two of them."""
        classes = np.unique(np.asarray(y))
        if classes.size < 2:
            raise ValueError(f"a classifier needs at least 2 classes in y, got {classes.size}")
        return classes

    def _targets(self, y: Any, X: torch.Tensor) -> torch.Tensor:
        """One-hot Y (n, n_classes) in X's dtype and device, for labels among ``classes_``."""
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError("y must be a 1-d array of class labels")
        classes = self.classes_
        idx = np.minimum(np.searchsorted(classes, y), len(classes) - 1)
        if np.any(classes[idx] != y):
            raise ValueError("y has labels the classifier was not fitted on")
        Y = torch.zeros(len(y), len(classes), dtype=X.dtype, device=X.device)
        Y[torch.arange(len(y), device=X.device), torch.as_tensor(idx, device=X.device)] = 1.0
        return Y

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the logits (cross-entropy); for the squared loss, the outputs clipped to
        [0, 1] and renormalised, which is only a score."""
        F = self.decision_function(X)
        if self._loss_name() == "cross_entropy":
            P = torch.softmax(F, dim=1)
        else:
            P = F.clamp(0, 1) + 1e-12
            P = P / P.sum(dim=1, keepdim=True)
        return P.cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The label of the largest logit."""
        best = self.decision_function(X).argmax(dim=1).cpu().numpy()
        return self.classes_[best]

    def _validation_score(self, F: torch.Tensor, Y: torch.Tensor) -> float:
        """Accuracy of outputs F against one-hot targets Y."""
        return float((F.argmax(dim=1) == Y.argmax(dim=1)).to(torch.float64).mean())

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of ``predict(X)`` against y."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


__all__ = ["ClassifierMixin", "ConvergenceWarning", "ConvexHead", "NeuronHead", "Progress"]
