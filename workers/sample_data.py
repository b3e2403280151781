"""Real sample images for tests, benchmarks and demos: Fashion-MNIST from the Debian package.

dataset-fashion-mnist installs the original IDX files (gzip) under /usr/share/datasets; these
helpers read them and write ImageFolder archives of PNGs, as a user would upload.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(
    os.environ.get("CVXTUNE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
)
FASHION_CLASSES = (
    "tshirt_top trouser pullover dress coat sandal shirt sneaker bag ankle_boot".split()
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: Path | None = None, classes: Sequence[int] | None = None
):
    """(images (n, 28, 28) uint8, labels (n,) int64) of the 'train' or 'test' split, only the
    samples of `classes` when given."""
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if classes is not None:
        keep = np.isin(labels, classes)
        images, labels = images[keep], labels[keep]
    return images, labels


def fashion_mnist_available(root: Path | None = None) -> bool:
    return ((root or FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").exists()


def balanced_indices(labels: np.ndarray, per_class: int, *, offset: int = 0) -> np.ndarray:
    """The first `per_class` samples of each class after skipping `offset` of each; sorted."""
    picks = [np.flatnonzero(labels == c)[offset : offset + per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_imagefolder(
    dest: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...] | list[str] = FASHION_CLASSES,
    *,
    wrapper: str = "",
) -> Path:
    """Write `class/00042.png` members to a .zip, .tar, .tar.gz or a directory (by suffix)."""
    dest = Path(dest)
    members = [
        (f"{wrapper}{classes[int(lab)]}/{i:05d}.png", png_bytes(img))
        for i, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]
    write_members(dest, members)
    return dest


def write_members(dest: Path, members: list[tuple[str, bytes]]) -> None:
    """Write (name, bytes) members into an archive chosen by dest's suffix, or a directory."""
    name = dest.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
            for member, data in members:
                zf.writestr(member, data)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        mode = "w:gz" if name.endswith(("gz",)) else "w"
        with tarfile.open(dest, mode) as tf:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    else:
        for member, data in members:
            path = dest / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


@dataclass
class FashionSample:
    """A few Fashion-MNIST test images of some classes as an ImageFolder archive, and unseen
    probe images of the same classes (one per class)."""

    archive: Path
    images: np.ndarray  # the archive's images, in the order they were written
    labels: np.ndarray  # their Fashion-MNIST class indices
    probes: np.ndarray
    probe_names: list[str]  # the probes' class names


def fashion_sample(
    dest: str | os.PathLike, classes: Sequence[int], per_class: int, probe_offset: int
) -> FashionSample:
    """Write `per_class` images of each class to `dest` (.zip, .tar, ... or a directory) and
    pick probes `probe_offset` images further into each class."""
    images, labels = load_fashion_mnist("test", classes=classes)
    train = balanced_indices(labels, per_class)
    probe = balanced_indices(labels, 1, offset=probe_offset)
    archive = write_imagefolder(dest, images[train], labels[train])
    names = [FASHION_CLASSES[int(c)] for c in labels[probe]]
    return FashionSample(archive, images[train], labels[train], images[probe], names)
