"""Saving and loading fitted heads: tensors in safetensors, everything else in JSON.

No pickle: a head directory holds ``tensors.safetensors`` (gates_, weights_, intercept_) and
``head.json`` (class, hyperparameters, fitted scalars, classes, format version).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
TENSORS = ("gates_", "weights_", "intercept_")
SCALARS = (
    "lam_",
    "lam_max_",
    "objective_",
    "duality_gap_",
    "n_iter_",
    "converged_",
    "pricing_violation_",
    "n_features_in_",
)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def save_head(est: Any, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "class": type(est).__name__,
        "params": {
            k: _jsonable(v)
            for k, v in est.get_params().items()
            if k != "gates" or isinstance(v, (int, np.integer))
        },
        "fitted": {k: _jsonable(getattr(est, k)) for k in SCALARS if hasattr(est, k)},
    }
    if hasattr(est, "classes_"):
        meta["classes"] = est.classes_.tolist()
    tensors = {k: getattr(est, k).detach().cpu().contiguous() for k in TENSORS}
    # Write both files under temporary names, then rename: a reader never sees half a head.
    fd, tmp_t = tempfile.mkstemp(dir=path, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_t)
    fd, tmp_j = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_t, path / "tensors.safetensors")
    os.replace(tmp_j, path / "head.json")


def load_head(path: Path, cls: type) -> Any:
    meta = json.loads((path / "head.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported head format {meta.get('format_version')!r} in {path}")
    if meta["class"] != cls.__name__ and cls.__name__ != "_ConvexMLP":
        raise ValueError(f"{path} holds a {meta['class']}, not a {cls.__name__}")
    est = cls(**meta["params"])
    for k, v in meta["fitted"].items():
        setattr(est, k, v)
    if "classes" in meta:
        est.classes_ = np.asarray(meta["classes"])
    for k, v in load_file(str(path / "tensors.safetensors")).items():
        setattr(est, k, v)
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
