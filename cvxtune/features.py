"""Datasets of features (embeddings) with labels: NPZ or Parquet in, one canonical NPZ out.

The API validates an upload with `read_features` and stores `write_canonical`'s output; the
workers read it back with `load_canonical`. numpy and pyarrow only: no torch on the API side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvxtune.errors import DatasetError

X_KEYS = ("X", "x", "features", "embeddings", "embedding", "feature")
Y_KEYS = ("y", "Y", "labels", "label")


@dataclass
class Features:
    X: np.ndarray  # (n_samples, n_features) float32
    y: np.ndarray  # (n_samples,) int64 indices into classes
    classes: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts, strict=True)}


def _encode_labels(raw: np.ndarray, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    if raw.ndim != 1:
        raise DatasetError(f"labels must be one-dimensional, got shape {list(raw.shape)}")
    if classes is not None and np.issubdtype(raw.dtype, np.integer):
        if raw.size and (raw.min() < 0 or raw.max() >= len(classes)):
            raise DatasetError("integer labels must index the given class names")
        return raw.astype(np.int64), classes
    names = [str(v) for v in raw.tolist()]
    uniq = sorted(set(names), key=lambda s: (len(s), s) if s.isdigit() else (1 << 30, s))
    index = {c: i for i, c in enumerate(uniq)}
    return np.array([index[s] for s in names], dtype=np.int64), uniq


def _check(X: np.ndarray, y: np.ndarray, classes: list[str], min_per_class: int) -> Features:
    if X.ndim != 2:
        raise DatasetError(f"features must be a 2-D array (n_samples, n_features), got {X.ndim}-D")
    if X.shape[0] != y.shape[0]:
        raise DatasetError(f"{X.shape[0]} feature rows but {y.shape[0]} labels")
    if not np.issubdtype(X.dtype, np.number):
        raise DatasetError(f"features must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        raise DatasetError("features contain NaN or infinite values")
    feats = Features(X=X, y=y, classes=classes)
    counts = feats.class_counts
    present = [c for c, k in counts.items() if k > 0]
    if len(present) < 2:
        raise DatasetError(f"a dataset needs at least 2 classes, found {len(present)}")
    small = {c: k for c, k in counts.items() if 0 < k < min_per_class}
    if small:
        raise DatasetError(
            f"classes with fewer than {min_per_class} samples: "
            + ", ".join(f"{c} ({k})" for c, k in sorted(small.items()))
        )
    if any(k == 0 for k in counts.values()):
        feats.warnings.append("some declared classes have no samples")
    return feats


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            xk = next((k for k in X_KEYS if k in z.files), None)
            yk = next((k for k in Y_KEYS if k in z.files), None)
            if xk is None or yk is None:
                raise DatasetError(
                    f"an NPZ dataset needs a features array ({'/'.join(X_KEYS)}) and a labels "
                    f"array ({'/'.join(Y_KEYS)}); found {sorted(z.files)}"
                )
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in z.files else None
            return np.asarray(z[xk]), np.asarray(z[yk]), classes
    except DatasetError:
        raise
    except ValueError as e:  # object arrays need pickle, which we never allow
        raise DatasetError(f"unreadable NPZ: {e}") from e
    except Exception as e:
        raise DatasetError("unreadable NPZ file") from e


def _read_parquet(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DatasetError("unreadable Parquet file") from e
    names = table.column_names
    yk = next((k for k in Y_KEYS if k in names), None)
    if yk is None:
        raise DatasetError(f"a Parquet dataset needs a label column ({'/'.join(Y_KEYS)})")
    y = table.column(yk).to_numpy(zero_copy_only=False)
    list_col = next((k for k in X_KEYS if k in names), None)
    list_type = table.schema.field(list_col).type if list_col is not None else None
    if list_type is not None and (
        pa.types.is_list(list_type)
        or pa.types.is_large_list(list_type)
        or pa.types.is_fixed_size_list(list_type)
    ):
        assert list_col is not None
        rows = table.column(list_col).to_pylist()
        if len({len(r) for r in rows}) > 1:
            raise DatasetError(f"rows of column {list_col!r} have different lengths")
        X = np.asarray(rows, dtype=np.float32)
    else:
        cols = [c for c in names if c != yk]
        if not cols:
            raise DatasetError("a Parquet dataset needs feature columns beside the label")
        X = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in cols])
    return X, np.asarray(y), None


def read_features(path: Path, fmt: str, min_per_class: int = 2) -> Features:
    """Read and check an uploaded NPZ or Parquet features file; raises DatasetError."""
    X, raw_y, classes = _read_npz(path) if fmt == "npz" else _read_parquet(path)
    y, classes = _encode_labels(raw_y, classes)
    return _check(X, y, classes, min_per_class)


def write_canonical(feats: Features, path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, X=feats.X, y=feats.y, classes=np.array(feats.classes, dtype=str))


def load_canonical(path: Path) -> Features:
    with np.load(path, allow_pickle=False) as z:
        return Features(X=z["X"], y=z["y"], classes=[str(c) for c in z["classes"].tolist()])


def summary(feats: Features) -> dict[str, Any]:
    return {
        "n_samples": int(feats.X.shape[0]),
        "n_features": int(feats.X.shape[1]),
        "warnings": list(feats.warnings),
    }
