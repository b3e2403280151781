"""Saving and loading fitted heads: tensors in safetensors, everything else in JSON.

No pickle: a head directory holds ``tensors.safetensors`` (the fitted tensors: for the MLP
gates_, weights_, intercept_) and ``head.json`` (class, hyperparameters, fitted scalars, classes,
format version). ``write_head`` and ``read_head`` do this for every head class; ``save_head`` and
``load_head`` are the MLP's.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
TENSORS = ("gates_", "weights_", "intercept_")
# The fitted scalars of every head (ConvexHead._store_solution and lam_, lam_max_).
COMMON_SCALARS = (
    "lam_",
    "lam_max_",
    "objective_",
    "duality_gap_",
    "n_iter_",
    "converged_",
)
SCALARS = (
    *COMMON_SCALARS,
    "pricing_violation_",
    "pricing_added_",
    "n_features_in_",
)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def head_meta(est: Any, params: dict[str, Any], scalars: Iterable[str]) -> dict[str, Any]:
    """head.json's content: format version, class, hyperparameters, the fitted scalars that
    ``est`` has and, for a classifier, its classes."""
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "class": type(est).__name__,
        "params": {k: _jsonable(v) for k, v in params.items()},
        "fitted": {k: _jsonable(getattr(est, k)) for k in scalars if hasattr(est, k)},
    }
    if hasattr(est, "classes_"):
        meta["classes"] = est.classes_.tolist()
    return meta


def write_head(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors.safetensors`` and ``head.json`` into directory ``path``.

    Both files go under temporary names first, then are renamed: a reader never sees half a head.
    """
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    fd, tmp_t = tempfile.mkstemp(dir=path, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_t)
    fd, tmp_j = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_t, path / "tensors.safetensors")
    os.replace(tmp_j, path / "head.json")


def read_head(path: Path, cls: type, *, check_class: bool = True) -> tuple[Any, dict[str, Any]]:
    """An unfitted ``cls(**params)`` given the saved fitted scalars, classes and tensors, with
    head.json's content; raises ValueError for another format version or (with
    ``check_class``) another class."""
    meta = json.loads((path / "head.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported head format {meta.get('format_version')!r} in {path}")
    if check_class and meta.get("class") != cls.__name__:
        raise ValueError(f"{path} holds a {meta.get('class')}, not a {cls.__name__}")
    est = cls(**meta["params"])
    for k, v in meta["fitted"].items():
        setattr(est, k, v)
    if "classes" in meta:
        est.classes_ = np.asarray(meta["classes"])
    for k, v in load_file(str(path / "tensors.safetensors")).items():
        setattr(est, k, v)
    return est, meta


def save_head(est: Any, path: Path) -> None:
    """Write a fitted MLP head (gates given as an array are stored in gates_ only)."""
    params = est.get_params()
    if not isinstance(params["gates"], (int, np.integer)):
        del params["gates"]
    write_head(path, {k: getattr(est, k) for k in TENSORS}, head_meta(est, params, SCALARS))


def load_head(path: Path, cls: type) -> Any:
    """Load an MLP head saved by ``save_head``; ``cls`` the generic _ConvexMLP takes either
    class."""
    est, _ = read_head(path, cls, check_class=cls.__name__ != "_ConvexMLP")
    est._set_neurons()
    return est


def load(path: str | Path) -> Any:
    """Load any saved head, whatever its class (MLP, CNN or attention)."""
    from . import attention, cnn, estimators

    meta = json.loads((Path(path) / "head.json").read_text())
    name = meta.get("class")
    if name in ("ConvexMLPClassifier", "ConvexMLPRegressor"):
        return load_head(Path(path), getattr(estimators, name))
    for module in (cnn, attention):
        cls = getattr(module, str(name), None)
        if cls is not None:
            return cls.load(path)
    raise ValueError(f"{path} holds an unknown head class {name!r}")


__all__ = ["load", "load_head", "save_head"]
