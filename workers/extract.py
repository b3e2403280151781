"""Frozen-backbone embeddings for a whole dataset, fast, and cached by content.

The pipeline: the loader reads members and decodes them (in DataLoader workers when there are
cores to spare), keeping small sources as they are and resizing large ones with PIL
(workers.preprocessing.prepare); the main process resizes, crops and normalises each batch of
small sources with two matrix products that write the float batch in channels_last layout (on
the forward's threads, or on the GPU), runs the backbone under torch.inference_mode (autocast on
CUDA) and writes the rows straight into a memory-mapped .npy in the cache. A result is keyed by
a hash of the dataset's bytes, the backbone, its weights, the preprocessing and the output kind,
so a second job on the same data reads the cache instead of extracting again.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvxtune.errors import DatasetError, InvalidInput
from workers.backbones import (
    Backbone,
    Preprocessing,
    check_output,
    get_spec,
    load_backbone,
    weights_id,
    weights_source,
)
from workers.cache import EmbeddingCache, combine, write_json
from workers.datasets import ImageDataset, ImageError, decode_image, open_dataset, to_model_mode
from workers.preprocessing import BatchPreprocessor, Prepared, prepare

# Bump when the pipeline's numbers change for the same inputs, so old cache entries are ignored.
# (Folding BatchNorm into the convolutions moved embeddings by ~1e-6 relative: not bumped. v2:
# workers.preprocessing's batched path, PIL's pixels but at rounding ties, ~3e-4 relative.)
PIPELINE_VERSION = "extract-v2"
Progress = Callable[[float, float, float], None]

# Defaults measured with bench/extract.py (see bench/README.md).
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 128}


# ---------------------------------------------------------------- forward


def network(bb: Backbone) -> Any:
    """What `forward` runs, x -> (features, pooled): on the CPU the backbone's frozen
    TorchScript graph (`workers.graphs`, built on the first call) unless it was loaded with
    `graphs=False`; otherwise the eager module (on CUDA under `forward`'s autocast)."""
    from workers import graphs

    if bb.graphs and bb.device.type == "cpu":
        return graphs.graph(bb.model, bb.spec.input_size)
    return graphs.Forward(bb.model)


def forward(bb: Backbone, x: Any, output: str) -> Any:
    """One batch through the frozen backbone (`network`); returns the requested output in
    float32."""
    import torch

    net = network(bb)
    autocast = bb.device.type == "cuda"
    dtype = torch.bfloat16 if autocast and torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(bb.device.type, dtype=dtype, enabled=autocast):
        # CNN features (B, C, H, W); ViT features (B, T, d); pooled (B, d)
        out, pooled = net(x)
        if output == "pooled":
            out = pooled
        elif output == "tokens" and bb.spec.family == "cnn":
            # The map's positions, row-major: (B, H*W, C).
            out = out.flatten(2).transpose(1, 2)
        elif output == "feature_map" and bb.spec.family == "vit":
            # The class token comes first; the map is the patch grid: (B, d, h, w).
            patches = out[:, getattr(bb.model, "num_prefix_tokens", 1) :]
            c, h, w = bb.spec.feature_map_shape
            out = patches.transpose(1, 2).reshape(len(x), c, h, w)
    return out.float()


# ---------------------------------------------------------------- the batched loader


class _Batches:
    """Map-style dataset whose item k is batch k, decoded and prepared (runs in workers).

    By default a batch leaves the workers as uint8 pixels (small sources as they are: a 28 x 28
    grey image is 0.4 % of its float input) and becomes a float batch where the model runs;
    with `preprocessor` (CPU only) the worker also produces the float batch.
    """

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        pre: Preprocessing,
        preprocessor: BatchPreprocessor | None = None,
    ):
        self.ds, self.pre, self.preprocessor = ds, pre, preprocessor
        n = len(ds)
        self.bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        self.max_pixels = ds.store.limits.max_image_pixels

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, k: int) -> tuple[Any, list[int], dict[int, str]]:
        start, stop = self.bounds[k]
        items: list[Prepared] = []
        rows: list[int] = []
        bad: dict[int, str] = {}
        for i in range(start, stop):
            name = self.ds.paths[i]
            try:
                img = decode_image(self.ds.read_bytes(i), name=name, max_pixels=self.max_pixels)
                items.append(prepare(img, self.pre))
                rows.append(i)
            except ImageError as exc:
                bad[i] = str(exc)
            except DatasetError as exc:
                bad[i] = f"!{exc.message}"  # a bomb: refused whatever the policy
        if self.preprocessor is not None and items:
            return self.preprocessor(items), rows, bad
        return items, rows, bad


def _identity(item: Any) -> Any:
    return item


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), which a container may limit."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # not on Linux


def default_num_workers(device_kind: str) -> int:
    """Decoding processes: one per two cores, so decoding overlaps the forward, except for a
    CPU forward on two cores or fewer, which decodes in this process.

    There the forward's two OpenMP threads want both cores, and a decoding process that takes
    one of them stalls every parallel region: measured on a 2-core VM (bench/README.md), one
    worker reached 0.47-0.59 of the bare forward of mobilenetv3_small_100 and 0.74-0.85 of
    tf_efficientnet_lite0's, decoding in this process 0.75-0.80 and 0.91-0.98.
    """
    cpus = usable_cpus()
    if device_kind == "cpu" and cpus <= 2:
        return 0
    return max(1, min(8, cpus // 2))


def _loader(batches: _Batches, num_workers: int, pin: bool) -> Iterable[Any]:
    import multiprocessing

    import torch

    if num_workers > 0 and multiprocessing.current_process().daemon:
        num_workers = 0  # e.g. inside a daemonic pool process, which may not have children
    return torch.utils.data.DataLoader(
        batches,  # type: ignore[arg-type]
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# ---------------------------------------------------------------- extraction


@dataclass
class Extraction:
    """Embeddings of a dataset. X rows follow `paths`; y indexes `classes`."""

    X: np.ndarray  # (n, d) | (n, C, H, W) | (n, T, d), float32 (memory-mapped when cached)
    y: np.ndarray  # (n,) int64
    classes: list[str]
    paths: list[str]
    cache_hit: bool
    key: str
    backbone: str = ""
    output: str = "pooled"
    weights: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.y) / self.seconds if self.seconds > 0 else math.inf


def extraction_key(ds: ImageDataset, backbone: str, wid: str, output: str) -> str:
    spec = get_spec(backbone)
    return combine(
        PIPELINE_VERSION,
        ds.content_hash(),
        backbone,
        wid,
        spec.preprocessing.fingerprint(),
        output,
    )


def extract(
    data: str | os.PathLike | ImageDataset,
    backbone: str | Backbone,
    *,
    output: str = "pooled",
    cache_dir: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    allow_random: bool = False,
    allow_download: bool = False,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    num_threads: int | None = None,
    streams: int | None = None,
    normalize_in_workers: bool | None = None,
    on_bad_image: str = "skip",
    progress: Progress | None = None,
) -> Extraction:
    """Embed every image of a dataset with a frozen backbone.

    data: a dataset path (see workers.datasets.open_dataset) or an open ImageDataset.
    backbone: a catalogue name, or a Backbone already loaded (its weights decide the key, its
    `graphs` whether the forward is a frozen graph; one loaded here runs eagerly).
    output: "pooled" (n, d), "feature_map" (n, C, H, W) or "tokens" (n, T, d).
    cache_dir: where results are kept by content hash; None computes without caching.
    batch_size, num_workers (decoding processes), num_threads (torch's, in this process),
    streams (batches decoded and embedded side by side, each on its own thread, when there
    are no decoding processes; see default_streams):
    None picks the measured defaults; normalize_in_workers (CPU only, default false) moves
    the uint8 -> float pass into the decoding processes.
    progress(fraction, images_per_s, eta_s) is called after every batch.
    Raises WeightsUnavailable, DatasetError (unusable data; bad images under "fail").
    """
    check_output(output)
    name = backbone if isinstance(backbone, str) else backbone.name
    get_spec(name)
    ds = data if isinstance(data, ImageDataset) else open_dataset(data, on_bad_image=on_bad_image)
    try:
        if isinstance(backbone, Backbone):
            wid = backbone.weights_id
        else:
            src = weights_source(
                name,
                weights_dir=weights_dir,
                allow_random=allow_random,
                allow_download=allow_download,
            )
            wid = weights_id(src, name) if src.kind != "hub-download" else ""
        key = extraction_key(ds, name, wid, output) if wid else ""
        cache = EmbeddingCache(cache_dir) if cache_dir is not None and key else None
        if cache is not None and (hit := _from_cache(cache, key)) is not None:
            if progress is not None:
                progress(1.0, 0.0, 0.0)  # nothing was extracted: no rate to report
            return hit
        bb = backbone
        if not isinstance(bb, Backbone):
            dev = device or ("cuda" if _cuda() else "cpu")
            bb = load_backbone(
                name,
                weights_dir=weights_dir,
                allow_random=allow_random,
                allow_download=allow_download,
                device=dev,
                # Eager: a frozen graph (workers.graphs) did not repay its build here. Whole
                # jobs of 4100 Fashion PNGs in fresh processes on the project's 2-core CPU VM,
                # alternating: tf_efficientnet_lite0 31.3 / 31.7 s with the graph against
                # 31.2 / 30.7 s without; mobilenetv3_small_100 7.5-7.8 against 7.7-8.0 s.
                graphs=False,
            )
            if not key:  # weights fetched just now: only their digest names them
                key = extraction_key(ds, name, bb.weights_id, output)
                cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
                if cache is not None and (hit := _from_cache(cache, key)) is not None:
                    return hit
        opts = _RunOptions(
            output,
            batch_size,
            num_workers,
            num_threads,
            streams,
            normalize_in_workers,
            on_bad_image,
            progress,
        )
        return _run(ds, bb, key, cache, opts)
    finally:
        if ds is not data:
            ds.close()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class _RunOptions:
    output: str
    batch_size: int | None
    num_workers: int | None
    num_threads: int | None
    streams: int | None
    normalize_in_workers: bool | None
    on_bad_image: str
    progress: Progress | None


def _from_cache(cache: EmbeddingCache, key: str) -> Extraction | None:
    got = cache.get(key)
    if got is None:
        return None
    X, y, meta = got
    return Extraction(
        X=X,
        y=y,
        classes=meta["classes"],
        paths=meta["paths"],
        cache_hit=True,
        key=key,
        backbone=meta["backbone"],
        output=meta["output"],
        weights=meta["weights"],
        report=meta["report"],
        seconds=meta["seconds"],
    )


def _run(
    ds: ImageDataset, bb: Backbone, key: str, cache: EmbeddingCache | None, opts: _RunOptions
) -> Extraction:
    import torch

    if opts.num_threads:
        torch.set_num_threads(opts.num_threads)
    shape = bb.spec.output_shape(opts.output)
    n = len(ds)
    if n == 0:
        raise DatasetError("the dataset has no readable images")
    tmp = None if cache is not None else Path(tempfile.mkdtemp(prefix="cvxtune-x-"))
    ctx = cache.writer(key) if cache is not None else _plain_dir(tmp)  # type: ignore[arg-type]
    with ctx as out_dir:
        X = np.lib.format.open_memmap(out_dir / "X.npy", "w+", np.float32, (n, *shape))
        t0 = time.perf_counter()
        bad = _fill(X, ds, bb, opts)
        seconds = time.perf_counter() - t0
        if bad:
            X = _drop_rows(X, out_dir, sorted(bad))
            ds.drop(bad)
        X.flush()
        y = np.ascontiguousarray(ds.labels, dtype=np.int64)
        np.save(out_dir / "y.npy", y)
        meta = {
            "key": key,
            "backbone": bb.name,
            "output": opts.output,
            "weights": bb.weights_id,
            "classes": ds.classes,
            "paths": ds.paths,
            "report": ds.report,
            "seconds": seconds,
            "device": str(bb.device),
            "pipeline": PIPELINE_VERSION,
        }
        write_json(out_dir / "meta.json", meta)
    if cache is not None:
        X = np.load(cache.path(key) / "X.npy", mmap_mode="r")
    else:
        X = np.array(X)  # into memory; the temporary file goes
        shutil.rmtree(tmp, ignore_errors=True)  # type: ignore[arg-type]
    return Extraction(
        X=X,
        y=y,
        classes=list(ds.classes),
        paths=list(ds.paths),
        cache_hit=False,
        key=key,
        backbone=bb.name,
        output=opts.output,
        weights=bb.weights_id,
        report=ds.report,
        seconds=seconds,
    )


class _plain_dir:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        return None


def default_streams(device_kind: str, num_workers: int) -> int:
    """Forwards run side by side: on a CPU of two cores or fewer that decodes in this process,
    one stream per core, each decoding, preprocessing and running its batches on one thread
    (the forward's intra-op threads set to one), so one stream's decoding overlaps the other's
    forward; otherwise one stream. Serving runs one single-threaded forward per core too."""
    cpus = usable_cpus()
    if device_kind == "cpu" and num_workers == 0 and 1 < cpus <= 2:
        return cpus
    return 1


def _fill(X: np.ndarray, ds: ImageDataset, bb: Backbone, opts: _RunOptions) -> dict[int, str]:
    """Run the loader and the backbone, writing rows of X in place; returns the bad rows."""
    device_kind = bb.device.type
    batch_size = opts.batch_size or DEFAULT_BATCH_SIZE.get(device_kind, 32)
    workers = default_num_workers(device_kind) if opts.num_workers is None else opts.num_workers
    # Streams decode in their own threads: with decoding processes there is one stream.
    streams = 1 if workers > 0 else opts.streams or default_streams(device_kind, workers)
    pre = bb.spec.preprocessing
    # Measured (bench/README.md): shipping uint8 and making the float batch here, into a reused
    # buffer, costs less CPU per image than shipping float batches through shared memory.
    in_workers = device_kind == "cpu" and workers > 0 and bool(opts.normalize_in_workers)
    batches = _Batches(ds, batch_size, pre, BatchPreprocessor(pre) if in_workers else None)
    local = threading.local()

    def embed(batch: Any, rows: list[int]) -> None:
        import torch

        if not rows:
            return
        if not in_workers:
            if not hasattr(local, "preprocessor"):  # one per stream: each reuses its buffer
                local.preprocessor = BatchPreprocessor(pre, bb.device)
            batch = local.preprocessor(batch, reuse=device_kind == "cpu")
        with torch.inference_mode():
            out = forward(bb, batch, opts.output).cpu().numpy()
        if len(rows) == rows[-1] - rows[0] + 1:
            X[rows[0] : rows[-1] + 1] = out
        else:
            X[rows] = out

    n, done, bad = len(ds), 0, {}
    t0 = time.perf_counter()
    results = _run_batches(batches, embed, workers, streams, device_kind)
    with contextlib.closing(results):  # an error or a cancel below stops the streams at once
        for rows, bad_here in results:
            for i, reason in bad_here.items():
                if reason.startswith("!"):
                    raise DatasetError(reason[1:])
                if opts.on_bad_image == "fail":
                    raise DatasetError(f"{ds.paths[i]}: {reason}")
            bad.update(bad_here)
            done += len(rows) + len(bad_here)
            if opts.progress is not None:
                elapsed = time.perf_counter() - t0
                rate = done / elapsed if elapsed > 0 else 0.0
                eta = (n - done) / rate if rate > 0 else math.inf
                opts.progress(done / n, rate, eta)
    return bad


def _run_batches(
    batches: _Batches,
    embed: Callable[[Any, list[int]], None],
    workers: int,
    streams: int,
    device_kind: str,
) -> Iterator[tuple[list[int], dict[int, str]]]:
    """Embed every batch; yields (rows, bad rows) in batch order, in the calling thread.

    One stream: the DataLoader (its workers decode). Several: a pool of `streams` threads,
    each reading, decoding, preprocessing and embedding whole batches with torch's intra-op
    threads divided among them; leaving early (an exception, a cancel) cancels what has not
    started.
    """
    if streams <= 1:
        for batch, rows, bad in _loader(batches, workers, device_kind == "cuda"):
            embed(batch, rows)
            yield rows, bad
        return

    import torch

    def task(k: int) -> tuple[list[int], dict[int, str]]:
        batch, rows, bad = batches[k]
        embed(batch, rows)
        return rows, bad

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))
    batches.ds.read_bytes(0)  # opens the archive here, not in two threads at once
    pool = ThreadPoolExecutor(streams, thread_name_prefix="cvxtune-extract")
    try:
        futures = [pool.submit(task, k) for k in range(len(batches))]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _drop_rows(X: np.ndarray, out_dir: Path, bad_rows: list[int]) -> np.ndarray:
    keep = np.setdiff1d(np.arange(len(X)), bad_rows)
    if len(keep) == 0:
        raise DatasetError("no image in the dataset could be decoded")
    path = out_dir / "X.compact.npy"
    Y = np.lib.format.open_memmap(path, "w+", np.float32, (len(keep), *X.shape[1:]))
    for s in range(0, len(keep), 4096):
        Y[s : s + 4096] = X[keep[s : s + 4096]]
    Y.flush()
    del X
    os.replace(path, out_dir / "X.npy")
    return np.load(out_dir / "X.npy", mmap_mode="r+")


# ---------------------------------------------------------------- in-memory images


def bucket_sizes(limit: int) -> list[int]:
    """The batch shapes padded batches take: powers of two below `limit`, then `limit`."""
    sizes, k = [], 1
    while k < limit:
        sizes.append(k)
        k *= 2
    return [*sizes, max(1, limit)]


def bucket_size(n: int, limit: int) -> int:
    """The smallest of `bucket_sizes(limit)` that holds n images (n <= limit)."""
    return next(b for b in bucket_sizes(limit) if b >= n)


def embed_images(
    bb: Backbone,
    images: Sequence[Any],
    *,
    output: str = "pooled",
    batch_size: int = 32,
    pad_batches: bool = False,
    preprocessor: BatchPreprocessor | None = None,
) -> np.ndarray:
    """Embed in-memory images (PIL images, encoded bytes or uint8 HxW[x3] arrays).

    For online prediction: decoding happens here, in the caller's thread. Raises InvalidInput
    naming the index of an image that cannot be decoded. With `pad_batches`, each forward's
    batch is padded with zero inputs to one of `bucket_sizes(batch_size)`, so a GPU meets a
    handful of shapes (each new shape costs it a search for convolution kernels) instead of
    every size up to `batch_size`; the padding rows are dropped (eval-mode rows are
    independent). A caller that embeds again and again from one thread (a serving runner)
    passes its own `preprocessor`, whose resampling matrices and batch buffer are then kept
    from call to call instead of being rebuilt and page-faulted in for every batch.
    """
    import torch
    from PIL import Image

    check_output(output)
    pre = bb.spec.preprocessing
    reuse = preprocessor is not None
    if preprocessor is None:
        preprocessor = BatchPreprocessor(pre, bb.device)
    items = []
    for k, item in enumerate(images):
        try:
            if isinstance(item, (bytes, bytearray, memoryview)):
                img = decode_image(bytes(item), name=f"image {k}")
            elif isinstance(item, np.ndarray):
                img = Image.fromarray(item)
            else:
                img = item
            items.append(prepare(to_model_mode(img), pre))
        except ImageError as exc:
            raise InvalidInput(f"image {k}: {exc}") from exc
    out = np.empty((len(items), *bb.spec.output_shape(output)), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            n = len(chunk)
            size = bucket_size(n, batch_size) if pad_batches else n
            x = preprocessor(chunk, pad_to=size, reuse=reuse)
            out[s : s + n] = forward(bb, x, output)[:n].cpu().numpy()
    return out


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an embeddings file written by `save_npz` (no pickle)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def save_npz(path: str | os.PathLike, result: Extraction) -> Path:
    """Write X, y, classes, paths to an .npz atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                X=np.asarray(result.X, dtype=np.float32),
                y=np.asarray(result.y, dtype=np.int64),
                classes=np.array(result.classes, dtype=str),
                paths=np.array(result.paths, dtype=str),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "Extraction",
    "embed_images",
    "extract",
    "extraction_key",
    "forward",
    "load_npz",
    "save_npz",
]
