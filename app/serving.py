"""The API's handle on online serving, which lives in workers.serving.

Prediction needs a backbone and a head in memory, in the process that answers the request:
another hop (a queue or a second server) would add more latency than the batching saves. So the
API imports workers.serving, the one worker module built for this (see pyproject's contract);
it is imported lazily so that the API starts, and serves everything else, without torch loaded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from cvxtune.settings import Settings

# Images per forward when the settings leave it open (bench/README.md, "Serving").
DEFAULT_MAX_BATCH = {"cpu": 4, "cuda": 64}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_runners(device: str) -> int:
    """One single-threaded forward per core on a CPU; one forward on a GPU."""
    from workers.serving import usable_cpus

    return usable_cpus() if device.startswith("cpu") else 1


class Serving:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._server: Any = None

    @property
    def server(self) -> Any:
        if self._server is None:
            from workers.serving import Server

            s = self.settings
            device = s.serving_device or default_device()
            self._server = Server(
                weights_dir=s.weights_dir,
                allow_random=s.allow_random_weights,
                max_heads=s.serving_max_heads,
                max_backbones=s.serving_max_backbones,
                max_batch=s.serving_max_batch or DEFAULT_MAX_BATCH.get(device.split(":")[0], 32),
                max_wait_ms=s.serving_max_wait_ms,
                device=device,
                runners=s.serving_runners or default_runners(device),
            )
        return self._server

    async def predict_embeddings(
        self, head_id: str, head_dir: Path, classes: list[str], X: np.ndarray
    ) -> list[dict[str, Any]]:
        head = await run_in_threadpool(self.server.head, head_id, head_dir, classes)
        return await run_in_threadpool(self.server.predict_embeddings, head, X)

    async def predict_images(
        self, head_id: str, head_dir: Path, classes: list[str], backbone: str, images: list[bytes]
    ) -> list[dict[str, Any]]:
        """The backbone's batcher runs the output the head takes (pooled, feature map or
        tokens); an MLP head then runs inline (0.16 ms for one image of a 32-gate, 10-class head,
        through its neurons), a CNN or attention head off the event loop."""

        def start() -> tuple[Any, Any]:  # one hop: the (cached) head, decoding, the queue
            head = self.server.head(head_id, head_dir, classes)
            return head, self.server.embed_images(backbone, images, head.output)

        head, future = await run_in_threadpool(start)
        Z = await asyncio.wrap_future(future)
        if head.output == "pooled":
            return self.server.predict_embeddings(head, Z)
        return await run_in_threadpool(self.server.predict_embeddings, head, Z)

    def preload(self) -> None:
        """Load the configured backbones in the background; requests do not wait for it."""
        import threading

        names = [n.strip() for n in self.settings.serving_preload.split(",") if n.strip()]
        for name in names:
            threading.Thread(target=self.server.warm, args=(name,), daemon=True).start()

    def forget_head(self, head_id: str) -> None:
        if self._server is not None:
            self._server.forget_head(head_id)
