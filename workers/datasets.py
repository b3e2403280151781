"""Labelled image datasets: ImageFolder in a zip, tar(.gz) or directory, or a CSV manifest.

Layouts accepted:
- ImageFolder: `class/xxx.png`, optionally wrapped in one top-level folder;
- CSV manifest: rows `path,label` (a header row is optional), paths relative to the CSV, with the
  images in the same archive or directory, or in a separate one passed as `images=`.

Archives are read member by member and never unpacked into memory. A compressed tar cannot be
read at random, so it is streamed once into an uncompressed temporary tar beside the cache.
Unsafe archives (members escaping the root, links, devices, a decompressed size over the limit,
an image over the pixel limit) are refused with DatasetError; unreadable images are reported by
name and either skipped or refused, as the caller chooses.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import weakref
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cvxtune.errors import DatasetError, InvalidInput
from workers.cache import combine, file_digest, tree_digest

BadImagePolicy = Literal["skip", "fail"]
IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm .pbm".split())
MAX_IMAGE_PIXELS = 64_000_000  # an 8000x8000 photo; larger headers are treated as bombs
MAX_TOTAL_BYTES = 32 << 30  # decompressed archive size
MAX_MEMBER_BYTES = 256 << 20
MAX_RATIO = 200  # compressed -> decompressed, for members over 1 MiB
MAX_MEMBERS = 2_000_000


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_ratio: float = MAX_RATIO
    max_members: int = MAX_MEMBERS

    def check_count(self, n: int, label: str) -> None:
        if n > self.max_members:
            raise DatasetError(f"{label}: more than {self.max_members} files; refused")


def safe_member_name(name: str, *, where: str) -> str:
    """Normalise an archive member or manifest path; refuse anything that escapes the root."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise DatasetError(f"{where}: absolute path {name!r} refused (path traversal)")
    norm = posixpath.normpath(raw)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        raise DatasetError(f"{where}: path {name!r} escapes the archive root (path traversal)")
    return norm


def _is_junk(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


# ---------------------------------------------------------------- member stores


class _Store:
    """Random access to the files of an archive or directory, safe to use after fork."""

    label: str
    limits: Limits

    def members(self) -> dict[str, int]:
        """name -> size in bytes, for every regular file."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def digest(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DirStore(_Store):
    def __init__(self, root: Path, limits: Limits):
        self.root = root.resolve()
        self.label = str(root)
        self.limits = limits

    def members(self) -> dict[str, int]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                rel = p.relative_to(self.root).as_posix()
                if p.is_symlink() and not p.resolve().is_relative_to(self.root):
                    raise DatasetError(f"{self.label}: {rel} links outside the dataset")
                out[rel] = p.stat().st_size
                self.limits.check_count(len(out), self.label)
        return out

    def read(self, name: str) -> bytes:
        with open(self.root / name, "rb") as f:
            data = f.read(self.limits.max_member_bytes + 1)
        if len(data) > self.limits.max_member_bytes:
            raise DatasetError(f"{name}: larger than {self.limits.max_member_bytes} bytes")
        return data

    def digest(self) -> str:
        return tree_digest(self.root)


class ZipStore(_Store):
    def __init__(self, path: Path, limits: Limits):
        self.path = path
        self.label = path.name
        self.limits = limits
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def _zip(self) -> zipfile.ZipFile:
        # A ZipFile shares its file offset with forked copies; each process opens its own.
        if self._zf is None or self._pid != os.getpid():
            self._zf = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zf

    def members(self) -> dict[str, int]:
        out: dict[str, int] = {}
        self._names: dict[str, str] = {}
        total = 0
        for info in self._zip().infolist():
            name = safe_member_name(info.filename, where=self.label)
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{self.label}: member {info.filename!r} is a link; refused")
            total += info.file_size
            self._check_sizes(info, total)
            self.limits.check_count(len(out) + 1, self.label)
            out[name] = info.file_size
            self._names[name] = info.filename
        return out

    def _check_sizes(self, info: zipfile.ZipInfo, total: int) -> None:
        lim = self.limits
        if total > lim.max_total_bytes:
            raise DatasetError(
                f"{self.label}: decompresses to more than {lim.max_total_bytes} bytes "
                "(decompression bomb?); refused"
            )
        if info.file_size > lim.max_member_bytes:
            raise DatasetError(
                f"{self.label}: member {info.filename!r} decompresses to {info.file_size} bytes, "
                f"over the {lim.max_member_bytes}-byte limit (decompression bomb?); refused"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > (1 << 20) and ratio > lim.max_ratio:
            raise DatasetError(
                f"{self.label}: member {info.filename!r} has a compression ratio of "
                f"{ratio:.0f}:1 (decompression bomb?); refused"
            )

    def read(self, name: str) -> bytes:
        if not hasattr(self, "_names"):
            self.members()
        with self._zip().open(self._names[name]) as f:
            # The header's size can lie; never read past the limit.
            data = f.read(self.limits.max_member_bytes + 1)
        if len(data) > self.limits.max_member_bytes:
            raise DatasetError(f"{self.label}: member {name!r} is larger than its header says")
        return data

    def digest(self) -> str:
        return file_digest(self.path)

    def close(self) -> None:
        if self._zf is not None and self._pid == os.getpid():
            self._zf.close()
        self._zf = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zf": None, "_pid": -1}


class TarStore(_Store):
    """A tar read at random through member offsets; a compressed one is spooled first."""

    def __init__(self, path: Path, limits: Limits, spool_dir: str | os.PathLike | None = None):
        self.path = path
        self.label = path.name
        self.limits = limits
        self._index: dict[str, tuple[int, int]] | None = None
        self._fd = -1
        self._pid = -1
        self._spooled: Path | None = None
        if _tar_compression(path) is not None:
            self._spooled = self._spool(spool_dir)
            weakref.finalize(self, _remove_dir, self._spooled.parent)
        self.plain = self._spooled or path

    def _spool(self, spool_dir: str | os.PathLike | None) -> Path:
        if spool_dir is not None:
            Path(spool_dir).mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix="cvxtune-tar-", dir=spool_dir))
        out = tmpdir / "data.tar"
        limit = self.limits.max_total_bytes
        try:
            opener = _DECOMPRESSORS[_tar_compression(self.path) or "gz"]
            with opener(self.path, "rb") as src, open(out, "wb") as dst:
                copied = 0
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > limit:
                        raise DatasetError(
                            f"{self.label}: decompresses to more than {limit} bytes "
                            "(decompression bomb?); refused"
                        )
                    dst.write(chunk)
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as exc:
            _remove_dir(tmpdir)
            raise DatasetError(f"{self.label}: not a readable tar archive ({exc})") from exc
        except BaseException:
            _remove_dir(tmpdir)
            raise
        return out

    def members(self) -> dict[str, int]:
        index: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.plain, "r:") as tf:
                for m in tf:
                    name = safe_member_name(m.name, where=self.label)
                    if m.isdir():
                        continue
                    if m.issym() or m.islnk():
                        raise DatasetError(f"{self.label}: member {m.name!r} is a link; refused")
                    if not m.isfile():
                        raise DatasetError(
                            f"{self.label}: member {m.name!r} is not a regular file; refused"
                        )
                    if m.size > self.limits.max_member_bytes:
                        raise DatasetError(
                            f"{self.label}: member {m.name!r} is {m.size} bytes, over the "
                            f"{self.limits.max_member_bytes}-byte limit; refused"
                        )
                    index[name] = (m.offset_data, m.size)
                    self.limits.check_count(len(index), self.label)
        except tarfile.TarError as exc:
            raise DatasetError(f"{self.label}: not a readable tar archive ({exc})") from exc
        self._index = index
        return {k: v[1] for k, v in index.items()}

    def read(self, name: str) -> bytes:
        if self._index is None:
            self.members()
        assert self._index is not None
        offset, size = self._index[name]
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.plain, os.O_RDONLY)
            self._pid = os.getpid()
        return os.pread(self._fd, size, offset)

    def digest(self) -> str:
        return file_digest(self.path)

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1
        if self._spooled is not None:
            _remove_dir(self._spooled.parent)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": -1, "_pid": -1}


def _remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_DECOMPRESSORS = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def _tar_compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ"):
        return "xz"
    return None


def open_store(
    path: str | os.PathLike, limits: Limits, spool_dir: str | os.PathLike | None = None
) -> _Store:
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {p} not found")
    if p.is_dir():
        return DirStore(p, limits)
    if zipfile.is_zipfile(p):
        return ZipStore(p, limits)
    try:
        if tarfile.is_tarfile(p):
            return TarStore(p, limits, spool_dir)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{p.name}: unreadable archive ({exc})") from exc
    raise DatasetError(
        f"{p.name}: not a zip or tar archive or a directory (ImageFolder or CSV manifest expected)"
    )


# ---------------------------------------------------------------- layouts


def _strip_wrapper(names: list[str]) -> str:
    """The single top-level folder every member sits in, or ''."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return tops.pop() + "/"
    return ""


def _imagefolder_entries(
    members: dict[str, int], label: str
) -> tuple[list[tuple[str, str]], list[str]]:
    names = [n for n in members if not _is_junk(n)]
    prefix = _strip_wrapper(names)
    # A wrapper that is itself a class folder (one class, no wrapper) leaves depth-1 files.
    if prefix and all(n[len(prefix) :].count("/") == 0 for n in names):
        prefix = ""
    entries, ignored = [], []
    for n in names:
        rel = n[len(prefix) :]
        parts = rel.split("/")
        if len(parts) == 2 and Path(parts[1]).suffix.lower() in IMAGE_EXTENSIONS:
            entries.append((n, parts[0]))
        else:
            ignored.append(n)
    if not entries:
        raise DatasetError(
            f"{label}: no images in an ImageFolder layout (class/image.png) and no CSV manifest"
        )
    return entries, ignored


_PATH_COLS = ("path", "file", "filename", "image", "image_path")
_LABEL_COLS = ("label", "class", "category", "target")


def parse_manifest(text: str, *, where: str, base: str = "") -> list[tuple[str, str]]:
    """Rows (path, label) of a CSV manifest; paths made relative to the archive root."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"{where}: the manifest is empty")
    head = [c.strip().lower() for c in rows[0]]
    ip, il = 0, 1
    if any(h in _PATH_COLS for h in head) and any(h in _LABEL_COLS for h in head):
        ip = next(i for i, h in enumerate(head) if h in _PATH_COLS)
        il = next(i for i, h in enumerate(head) if h in _LABEL_COLS)
        rows = rows[1:]
    entries = []
    for lineno, row in enumerate(rows, start=2 if ip or il != 1 else 1):
        if len(row) <= max(ip, il):
            raise DatasetError(f"{where}: row {lineno} needs a path and a label: {row!r}")
        path, label = row[ip].strip(), row[il].strip()
        if not path or not label:
            raise DatasetError(f"{where}: row {lineno} has an empty path or label")
        name = safe_member_name(posixpath.join(base, path), where=where)
        entries.append((name, label))
    return entries


def _find_manifest(members: dict[str, int]) -> str | None:
    csvs = [n for n in members if n.lower().endswith(".csv") and not _is_junk(n)]
    shallow = [n for n in csvs if n.count("/") <= 1]
    if len(shallow) > 1:
        raise DatasetError(f"several CSV manifests found ({', '.join(sorted(shallow))}); keep one")
    return shallow[0] if shallow else None


# ---------------------------------------------------------------- the dataset


@dataclass
class ImageDataset:
    """A validated dataset: sample i is image `paths[i]` with label `classes[labels[i]]`."""

    source: str
    classes: list[str]
    labels: np.ndarray  # (n,) int64
    paths: list[str]
    report: dict[str, Any]
    store: _Store = field(repr=False)
    manifest_digest: str | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def y(self) -> np.ndarray:
        return self.labels

    def read_bytes(self, i: int) -> bytes:
        return self.store.read(self.paths[i])

    def load_image(self, i: int) -> Any:
        """Sample i decoded and converted to RGB or L (PIL.Image)."""
        max_pixels = self.store.limits.max_image_pixels
        return decode_image(self.read_bytes(i), name=self.paths[i], max_pixels=max_pixels)

    def iter_images(self) -> Iterator[tuple[str, int, Any]]:
        """Stream (path, label, PIL image) in order, one member read at a time."""
        for i, p in enumerate(self.paths):
            yield p, int(self.labels[i]), self.load_image(i)

    def content_hash(self) -> str:
        """sha256 of the dataset's bytes (archive, directory tree, manifest)."""
        if self._digest is None:
            self._digest = combine("dataset-v1", self.store.digest(), self.manifest_digest)
        return self._digest

    def drop(self, bad: dict[int, str]) -> None:
        """Remove samples found unreadable after validation, recording why."""
        if not bad:
            return
        keep = [i for i in range(len(self.paths)) if i not in bad]
        self.report["skipped"] += [{"path": self.paths[i], "reason": r} for i, r in bad.items()]
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]
        self.report["n_samples"] = len(self.paths)
        self.report["class_counts"] = _counts(self.classes, self.labels)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ImageDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageError(Exception):
    """An image that cannot be decoded; carries the reason shown in reports."""


def decode_image(data: bytes, *, name: str = "", max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Decode image bytes to a PIL image in mode RGB or L (grayscale stays one channel).

    Palette, RGBA/LA (composited on white), CMYK and 16-bit images are converted.
    Raises DatasetError for a decompression bomb and ImageError when unreadable.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _bomb(name, exc) from exc
    except Exception as exc:
        raise ImageError(f"not an image ({type(exc).__name__})") from exc
    _check_pixels(img.size, name, max_pixels)
    try:
        img.load()
    except Exception as exc:
        raise ImageError(f"unreadable image data ({type(exc).__name__}: {exc})") from exc
    return to_model_mode(img)


def to_model_mode(img: Any) -> Any:
    from PIL import Image

    if img.mode in ("RGB", "L"):
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "F" and arr.max(initial=0) > 255 else max(arr.max(), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
        return img
    elif img.mode == "1":
        return img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _bomb(name: str, exc: Exception) -> DatasetError:
    return DatasetError(f"{name}: {exc} (decompression bomb?); refused")


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise DatasetError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            "(decompression bomb?); refused"
        )


def _check_image(data: bytes, name: str, max_pixels: int) -> str | None:
    """Cheap header check at validation: None when fine, else the reason it is unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.size, name, max_pixels)
            img.verify()
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb(name, exc) from exc
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"[:300]
    return None


def _counts(classes: list[str], labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {c: int(k) for c, k in zip(classes, counts, strict=True)}


def open_dataset(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    on_bad_image: BadImagePolicy = "skip",
    min_classes: int = 2,
    min_per_class: int = 1,
    check_images: bool = True,
    limits: Limits | None = None,
    max_members: int | None = None,
    max_total_bytes: int | None = None,
    max_image_pixels: int | None = None,
    spool_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Open and validate a dataset; raise DatasetError with a clear message when unusable.

    path: a zip/tar(.gz)/directory holding an ImageFolder or a CSV manifest, or a CSV file
    whose image paths are relative to `images` (an archive or directory) or to its own folder.
    on_bad_image: "skip" drops unreadable images (listed in report["skipped"] with reasons),
    "fail" refuses the dataset naming the first one.
    min_classes, min_per_class: the smallest usable dataset (counted after skipping).
    max_members, max_total_bytes, max_image_pixels: override the defaults in `Limits`.
    """
    if on_bad_image not in ("skip", "fail"):
        raise InvalidInput(f"on_bad_image must be 'skip' or 'fail', not {on_bad_image!r}")
    overrides = {
        "max_members": max_members,
        "max_total_bytes": max_total_bytes,
        "max_image_pixels": max_image_pixels,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    limits = dataclasses.replace(limits or Limits(), **given)
    p = Path(path)
    manifest_digest = None
    if p.is_file() and p.suffix.lower() == ".csv":
        store = open_store(images if images is not None else p.parent, limits, spool_dir)
        text = _read_text(p.read_bytes(), p.name)
        entries = parse_manifest(text, where=p.name)
        manifest_digest = file_digest(p)
        members = store.members()
        ignored: list[str] = []
    else:
        store = open_store(p, limits, spool_dir)
        members = store.members()
        manifest = _find_manifest(members)
        if manifest is not None:
            text = _read_text(store.read(manifest), manifest)
            entries = parse_manifest(text, where=manifest, base=posixpath.dirname(manifest))
            ignored = []
        else:
            entries, ignored = _imagefolder_entries(members, store.label)
    opts = _Options(on_bad_image, min_classes, min_per_class, check_images, limits)
    try:
        return _validate(p, store, members, entries, ignored, manifest_digest, opts)
    except BaseException:
        store.close()
        raise


def _read_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name}: the manifest is not UTF-8 text") from exc


@dataclass(frozen=True)
class _Options:
    on_bad_image: BadImagePolicy
    min_classes: int
    min_per_class: int
    check_images: bool
    limits: Limits


def _validate(
    p: Path,
    store: _Store,
    members: dict[str, int],
    entries: list[tuple[str, str]],
    ignored: list[str],
    manifest_digest: str | None,
    opts: _Options,
) -> ImageDataset:
    on_bad, limits = opts.on_bad_image, opts.limits
    skipped: list[dict[str, str]] = []
    good: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, label in sorted(entries):
        if name in seen:
            continue
        seen.add(name)
        if name not in members:
            reason = "listed in the manifest but not found"
        elif opts.check_images:
            reason = _check_image(store.read(name), name, limits.max_image_pixels)
        else:
            reason = None
        if reason is None:
            good.append((name, label))
            continue
        if on_bad == "fail":
            raise DatasetError(f"{store.label}: {name}: {reason}")
        skipped.append({"path": name, "reason": reason})
    classes = sorted({label for _, label in good})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[label] for _, label in good], dtype=np.int64)
    report = {
        "source": p.name,
        "n_samples": len(good),
        "n_classes": len(classes),
        "class_counts": _counts(classes, labels),
        "skipped": skipped,
        "ignored": sorted(ignored)[:100],
        "n_ignored": len(ignored),
    }
    _check_sizes(store.label, classes, report["class_counts"], opts)
    return ImageDataset(
        source=str(p),
        classes=classes,
        labels=labels,
        paths=[n for n, _ in good],
        report=report,
        store=store,
        manifest_digest=manifest_digest,
    )


def _check_sizes(label: str, classes: list[str], counts: dict[str, int], opts: _Options) -> None:
    if len(classes) < opts.min_classes:
        found = ", ".join(classes) or "none"
        raise DatasetError(
            f"{label}: {len(classes)} class(es) with readable images ({found}); "
            f"at least {opts.min_classes} are needed"
        )
    small = {c: k for c, k in counts.items() if k < opts.min_per_class}
    if small:
        listed = ", ".join(f"{c} ({k})" for c, k in sorted(small.items()))
        raise DatasetError(
            f"{label}: too few samples in class(es) {listed}; "
            f"each class needs at least {opts.min_per_class}"
        )


def validate_dataset(path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Check a dataset and return its report (n_samples, class_counts, skipped files...).

    Takes open_dataset's keyword arguments; raises DatasetError when the dataset is unusable.
    """
    with open_dataset(path, **kwargs) as ds:
        return ds.report
