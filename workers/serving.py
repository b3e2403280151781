"""Online prediction: backbones and heads kept loaded, requests batched dynamically.

Heads are small (kilobytes to megabytes) and load in milliseconds, so many share one loaded
backbone. Image requests for the same backbone queue while a batch runs, then go through as one
batch (optionally waiting up to `max_wait_ms` for more)
and run through the backbone as one batch: on a GPU a batch costs little more than one image.
The API process owns one `Server`; nothing here knows about HTTP or the database.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from cvxtune.contracts import HEAD_INPUT, HEAD_OUTPUT, head_kind_of_solver
from cvxtune.errors import InvalidInput
from workers.extract import usable_cpus

log = logging.getLogger("cvxtune.serving")


K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded, thread-safe cache; `get_or_load` loads outside the lock, once per key."""

    def __init__(self, capacity: int, on_evict: Callable[[V], None] | None = None):
        self.capacity = max(1, capacity)
        self.on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[K, threading.Lock] = {}

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                self._loading.pop(key, None)
                while len(self._items) > self.capacity:
                    old, evicted = self._items.popitem(last=False)
                    log.info("evicted %s from the serving cache", old)
                    if self.on_evict is not None:
                        self.on_evict(evicted)
            return value

    def discard(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def decode_image(data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidInput("a file is not a readable image (JPEG, PNG, ...)") from e
    return img.convert("RGB")


@dataclass
class _Request:
    images: list[Any]
    future: Future[np.ndarray]
    output: str = "pooled"


class Batcher:
    """Threads per loaded backbone that drain one queue into batches of at most `max_batch`.

    Requests name the backbone output they need (pooled vectors for mlp heads, feature maps
    or tokens for the others); a batch runs one forward per output it holds. With `runners`
    threads, that many batches run at once: on a CPU, two single-threaded forwards on two
    cores beat one forward on two threads (Lite0, batch 4: 110.6 against 71.5 images/s,
    bench/README.md "Serving"), and they keep their pace while the HTTP threads take CPU time,
    where a two-thread forward waits at every barrier for the thread that was preempted.
    """

    def __init__(
        self,
        backbone: Any,
        embed: Callable[[Any, list[Any], str], np.ndarray],
        max_batch: int,
        max_wait_s: float,
        runners: int = 1,
    ):
        self.backbone, self.embed = backbone, embed
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        self.batches = 0
        self._count = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, daemon=True, name=f"cvxtune-batcher-{k}")
            for k in range(max(1, runners))
        ]
        for t in self.threads:
            t.start()

    def submit(self, images: list[Any], output: str = "pooled") -> Future[np.ndarray]:
        fut: Future[np.ndarray] = Future()
        self.queue.put(_Request(images, fut, output))
        return fut

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)

    def _collect(self, first: _Request) -> list[_Request]:
        import time

        batch, n = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)
                break
            batch.append(item)
            n += len(item.images)
        return batch

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = self._collect(first)
            for output in dict.fromkeys(r.output for r in batch):
                self._forward([r for r in batch if r.output == output], output)

    def _forward(self, batch: list[_Request], output: str) -> None:
        images = [im for r in batch for im in r.images]
        try:
            Z = self.embed(self.backbone, images, output)
            with self._count:
                self.batches += 1
        except BaseException as e:  # every waiting request learns why
            for r in batch:
                r.future.set_exception(e)
            return
        start = 0
        for r in batch:
            r.future.set_result(Z[start : start + len(r.images)])
            start += len(r.images)


@dataclass
class LoadedHead:
    model: Any
    classes: list[str]  # names, in the order of the model's label indices
    n_features: int  # d of pooled vectors and tokens, C of feature maps; 0 when unknown
    kind: str = "mlp"

    @property
    def output(self) -> str:
        """The backbone output the head takes."""
        return HEAD_OUTPUT[self.kind]


# Per kind: the dimensions of a batch of inputs and the axis that must match n_features.
_BATCH_NDIM = {"mlp": 2, "cnn": 4, "attention": 3}
_FEATURE_AXIS = {"mlp": 1, "cnn": 1, "attention": 2}
_FEATURES = {"mlp": "features", "cnn": "channels", "attention": "features per token"}
# Rows per predict_proba call: about 32 MB of input, so a batch of feature maps stays small.
_BLOCK_BYTES = 32 << 20


class Server:
    def __init__(
        self,
        *,
        weights_dir: Path | None = None,
        allow_random: bool = False,
        max_heads: int = 64,
        max_backbones: int = 2,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        device: str = "cpu",
        runners: int = 1,
        fixed_shapes: bool | None = None,
    ):
        """`runners` batches run at once per backbone. On a CPU with several runners, torch's
        intra-op threads (process-wide) are set to the cores divided among them, so the
        runners share the cores instead of oversubscribing them.

        With `fixed_shapes` (the default on a GPU), batches are padded to a few sizes
        (`workers.extract.bucket_sizes(max_batch)`) and a backbone runs each size once, in its
        runner threads, before it serves: a GPU's first forward at a new shape stops to choose
        convolution kernels, which would otherwise land on live requests."""
        self.weights_dir, self.allow_random, self.device = weights_dir, allow_random, device
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.runners = max(1, runners)
        self.fixed_shapes = (
            str(device).startswith("cuda") if fixed_shapes is None else bool(fixed_shapes)
        )
        self.heads: LRU[str, LoadedHead] = LRU(max_heads)
        self.backbones: LRU[str, Batcher] = LRU(max_backbones, on_evict=Batcher.close)

    # ---- heads
    def head(self, head_id: str, head_dir: Path, classes: list[str]) -> LoadedHead:
        def load() -> LoadedHead:
            import solver

            model = solver.load(head_dir)
            n_features = int(getattr(model, "n_features_in_", 0) or 0)
            return LoadedHead(model, classes, n_features, head_kind_of_solver(type(model).__name__))

        return self.heads.get_or_load(head_id, load)

    def forget_head(self, head_id: str) -> None:
        self.heads.discard(head_id)

    def check_input(self, head: LoadedHead, X: np.ndarray) -> np.ndarray:
        """X as float32 in the head's input layout; InvalidInput saying what was expected."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        ndim, axis = _BATCH_NDIM[head.kind], _FEATURE_AXIS[head.kind]
        if X.ndim != ndim or (head.n_features and X.shape[axis] != head.n_features):
            size = f", {head.n_features} {_FEATURES[head.kind]}" if head.n_features else ""
            raise InvalidInput(
                f"the {head.kind} head takes one {HEAD_INPUT[head.kind]} array per sample{size}; "
                f"got embeddings of shape {list(X.shape)}"
            )
        if not np.isfinite(X).all():
            raise InvalidInput("embeddings contain NaN or infinite values")
        return X

    def predict_embeddings(self, head: LoadedHead, X: np.ndarray) -> list[dict[str, Any]]:
        X = self.check_input(head, X)
        step = max(1, _BLOCK_BYTES // max(1, X[0].nbytes)) if len(X) else 1
        try:
            proba = np.concatenate(
                [
                    np.asarray(head.model.predict_proba(X[s : s + step]), dtype=np.float64)
                    for s in range(0, len(X), step)
                ]
            )
        except ValueError as e:  # e.g. a feature map smaller than the head's kernel
            raise InvalidInput(f"embeddings do not fit this {head.kind} head: {e}") from e
        label_idx = [int(c) for c in np.asarray(head.model.classes_).tolist()]
        names = [head.classes[i] for i in label_idx]
        out = []
        for row in proba:
            probs = {names[j]: round(float(p), 6) for j, p in enumerate(row)}
            out.append({"label": names[int(np.argmax(row))], "probabilities": probs})
        return out

    # ---- backbones
    def _batcher(self, backbone: str) -> Batcher:
        def load() -> Batcher:
            from workers.backbones import load_backbone
            from workers.extract import embed_images, network
            from workers.preprocessing import BatchPreprocessor

            bb = load_backbone(
                backbone,
                weights_dir=self.weights_dir,
                allow_random=self.allow_random,
                device=self.device,
            )
            network(bb)  # a CPU backbone's graph is built now, not in the first request

            pad, size = self.fixed_shapes, self.max_batch
            per_runner = threading.local()  # each runner thread keeps its own preprocessor

            def embed(b: Any, images: list[Any], output: str) -> np.ndarray:
                pre = getattr(per_runner, "preprocessor", None)
                if pre is None:
                    pre = per_runner.preprocessor = BatchPreprocessor(
                        b.spec.preprocessing, b.device
                    )
                Z = embed_images(
                    b, images, output=output, batch_size=size, pad_batches=pad, preprocessor=pre
                )
                return np.asarray(Z, dtype=np.float32)

            if self.runners > 1 and str(self.device).startswith("cpu"):
                import torch

                torch.set_num_threads(max(1, usable_cpus() // self.runners))
            batcher = Batcher(bb, embed, self.max_batch, self.max_wait_s, self.runners)
            if self.fixed_shapes:
                self._warm_shapes(backbone, batcher)
            return batcher

        return self.backbones.get_or_load(backbone, load)

    def _warm_shapes(self, backbone: str, batcher: Batcher) -> None:
        """One forward per padded batch size, through the batcher's own threads (in case
        PyTorch keeps some of cuDNN's choices per thread). Requests wait for the backbone
        meanwhile."""
        import time

        from PIL import Image

        from workers.extract import bucket_sizes

        t0 = time.perf_counter()
        blank = Image.new("RGB", batcher.backbone.spec.input_size[1:][::-1])
        sizes = bucket_sizes(self.max_batch)
        for size in sizes:
            for _ in range(self.runners):  # one after another, so no two sizes merge
                batcher.submit([blank] * size).result()
        log.info(
            "%s: %d batch shapes warmed in %.1f s", backbone, len(sizes), time.perf_counter() - t0
        )

    def embed_images(
        self, backbone: str, images: list[bytes], output: str = "pooled"
    ) -> Future[np.ndarray]:
        """Decode and queue images for the backbone's batcher; the future holds the `output`
        embeddings (pooled (n, d), feature_map (n, C, H, W) or tokens (n, T, d))."""
        decoded = [decode_image(b) for b in images]
        return self._batcher(backbone).submit(decoded, output)

    def warm(self, backbone: str) -> None:
        self._batcher(backbone)
