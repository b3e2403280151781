"""Content hashes and the on-disk embedding cache.

An entry is a directory named by its key holding X.npy, y.npy and meta.json. It is written in a
temporary sibling directory and renamed into place, so readers see a whole entry or none, and
two workers racing on the same key both end with the same valid entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

_DIGESTS: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so repeats are free."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def tree_digest(root: str | os.PathLike) -> str:
    """sha256 over a directory's files: sorted relative paths and their bytes' digests."""
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(file_digest(p).encode())
    return h.hexdigest()


def combine(*parts: Any) -> str:
    """One key from several parts, unambiguous about where each part ends."""
    h = hashlib.sha256()
    for part in parts:
        data = str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings on disk under `root/embeddings/<key[:2]>/<key>/`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "embeddings"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """(X memory-mapped read-only, y, meta) or None when the key is not cached."""
        entry = self.path(key)
        try:
            meta = json.loads((entry / "meta.json").read_text())
            X = np.load(entry / "X.npy", mmap_mode="r")
            y = np.load(entry / "y.npy")
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            return None
        if meta.get("key") != key or len(X) != len(y):
            return None
        return X, y, meta

    @contextmanager
    def writer(self, key: str) -> Iterator[Path]:
        """A temporary directory to fill; renamed to the entry when the block ends cleanly."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            yield tmp
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").exists():
                    raise
                # Another worker finished the same key first; its entry is as good as ours.
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def delete(self, key: str) -> bool:
        entry = self.path(key)
        if not entry.exists():
            return False
        shutil.rmtree(entry)
        return True


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))
