"""Online predict: cvxtune's API against a bare FastAPI endpoint and the backbone's own limit.

    python bench/serve.py [--seconds 8] [--concurrency 1 8 32] [--out bench/results/serve.json]

Measures, in one run on one machine, with tf_efficientnet_lite0 and a Fashion-MNIST PNG:
1. limit: the backbone's best bare batched forward (batch size x memory format x one forward
   on all threads or one single-threaded forward per core x frozen graph or eager module),
   sustained images/s;
2. bare: a FastAPI endpoint that decodes, embeds (one forward per request) and applies the head;
3. cvxtune: POST /v1/heads/{id}/predict through auth, the database, the LRU caches and the
   dynamic batcher, served by `cvxtune serve --no-worker`.
For each server: single-image latency p50/p99 and throughput at each concurrency. The load
generator runs on the same CPUs as the servers, so absolute numbers on a 2-core machine are low
for every row alike; compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # module level: the endpoint's annotation is resolved here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BACKBONE = "tf_efficientnet_lite0"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


# ---------------------------------------------------------------- the backbone's limit


def forward_limit(
    batch_sizes: tuple[int, ...] = (1, 4, 8, 32), seconds: float = 2.0, device: str = "cpu"
) -> dict:
    """Sustained images/s of the bare forward on random 224 px inputs, for every batch size x
    memory format x layout x way of running: one forward on all cores' intra-op threads, or one
    single-threaded forward per core side by side (what the server's runners do); the frozen
    TorchScript graph the service runs (`workers.graphs`) or the eager module. The best is the
    limit. On a GPU: one forward under the extractor's autocast, inputs already on the device."""
    import copy
    import dataclasses
    import threading

    import torch

    from workers.backbones import load_backbone
    from workers.extract import forward, usable_cpus

    bb = load_backbone(BACKBONE, device=device)
    if device.startswith("cuda"):
        return _gpu_limit(bb, (1, 8, 32, 64, 128, 256), seconds)
    cpus, threads0 = usable_cpus(), torch.get_num_threads()
    rows = []

    def sustained(b: Any, x: Any) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        with torch.inference_mode():
            while time.perf_counter() - t0 < seconds:
                forward(b, x, "pooled")
                n += len(x)
        return n, time.perf_counter() - t0

    for fmt_name, fmt in (
        ("channels_last", torch.channels_last),
        ("contiguous", torch.contiguous_format),
    ):
        model = copy.deepcopy(bb.model).to(memory_format=fmt)
        for graph in (True, False):
            b = dataclasses.replace(bb, model=model, graphs=graph)
            for layout, forwards in (("1 forward", 1), (f"{cpus} forwards x 1 thread", cpus)):
                if forwards > 1 and cpus == 1:
                    continue
                torch.set_num_threads(threads0 if forwards == 1 else 1)
                for bs in batch_sizes:
                    x = torch.randn(bs, 3, 224, 224).contiguous(memory_format=fmt)
                    with torch.inference_mode():
                        forward(b, x, "pooled")  # warm-up (and the graph's profiling run)
                        forward(b, x, "pooled")
                    out: list[tuple[int, float]] = []
                    workers = [
                        threading.Thread(target=lambda x=x, o=out, b=b: o.append(sustained(b, x)))
                        for _ in range(forwards)
                    ]
                    for w in workers:
                        w.start()
                    for w in workers:
                        w.join()
                    rows.append(
                        {
                            "memory_format": fmt_name,
                            "graph": graph,
                            "layout": layout,
                            "batch": bs,
                            "images_per_s": sum(n for n, _ in out) / max(t for _, t in out),
                        }
                    )
    torch.set_num_threads(threads0)
    top = max(rows, key=lambda r: r["images_per_s"])
    return {"rows": rows, "best": top}


def _gpu_limit(bb: Any, batch_sizes: tuple[int, ...], seconds: float) -> dict:
    import torch

    from workers.extract import forward

    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, 3, 224, 224, device=bb.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                forward(bb, x, "pooled")  # warm-up (cuDNN's algorithm choice)
            torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                forward(bb, x, "pooled")
                n += bs
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
        rows.append(
            {
                "memory_format": "channels_last",
                "layout": "1 forward",
                "batch": bs,
                "images_per_s": rate,
            }
        )
    return {"rows": rows, "best": max(rows, key=lambda r: r["images_per_s"])}


# ---------------------------------------------------------------- the bare endpoint


def bare_server(port: int, head_dir: str, device: str) -> None:
    import uvicorn
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    from solver import ConvexMLPClassifier
    from workers.backbones import load_backbone
    from workers.extract import embed_images

    bb = load_backbone(BACKBONE, device=device)
    head = ConvexMLPClassifier.load(head_dir)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def predict(request: Request) -> dict[str, Any]:
        form = await request.form()
        images = [await f.read() for f in form.getlist("files")]  # type: ignore[union-attr]
        p = head.predict_proba(await run_in_threadpool(embed_images, bb, images))
        return {"predictions": [{"label": int(r.argmax()), "p": r.tolist()} for r in p]}

    app.add_api_route("/predict", predict, methods=["POST"])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------- load


def _request_bytes(url: str, headers: dict[str, str], image: bytes) -> tuple[str, int, bytes]:
    """One multipart POST with one image, encoded once: (host, port, bytes on the wire)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    boundary = "cvxtunebench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = [
        f"POST {u.path} HTTP/1.1",
        f"Host: {u.hostname}:{u.port}",
        f"Content-Type: multipart/form-data; boundary={boundary}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return str(u.hostname), int(u.port or 80), ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    """Send the request on a keep-alive connection; read the whole response; its status."""
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length"))
    await reader.readexactly(length)
    return status


async def _load(
    url: str, headers: dict[str, str], image: bytes, concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` clients, each on its own keep-alive connection, posting the same
    pre-encoded request back to back. Raw asyncio streams rather than an HTTP client library:
    on 2 cores the load generator shares the CPUs with the server, so it should cost as little
    as possible (measured: 0.1 CPU ms per request, against 24-28 ms in the server)."""
    host, port, req = _request_bytes(url, headers, image)
    latencies: list[float] = []
    errors = 0
    conns = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    for reader, writer in conns[:1] * 2:  # warm-up: loads the backbone and the head
        if await _post(reader, writer, req) != 200:
            raise RuntimeError(f"{url} did not answer 200")
    stop = time.perf_counter() + seconds

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            if await _post(reader, writer, req) == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r, w) for r, w in conns))
    wall = time.perf_counter() - t0
    for _, writer in conns:
        writer.close()
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "images_per_s": len(latencies) / wall,
    }


# ---------------------------------------------------------------- set-up


def _make_head(data_dir: Path) -> tuple[str, str, dict[str, str]]:
    """A real head fitted on Fashion-MNIST embeddings, registered in a fresh data dir."""
    os.environ["CVXTUNE_DATA_DIR"] = str(data_dir)
    from fastapi.testclient import TestClient

    from app.auth import create_key
    from app.main import create_app
    from cvxtune.db import session_scope
    from cvxtune.settings import get_settings
    from workers import jobs
    from workers.sample_data import balanced_indices, load_fashion_mnist, write_imagefolder

    get_settings.cache_clear()
    settings = get_settings()

    class Recorder:
        def send_finetune(self, job_id: str) -> None: ...
        def ping(self) -> None: ...

    client = TestClient(create_app(settings, queue=Recorder()))
    with session_scope(settings.resolved_database_url) as s:
        key = create_key(s, "bench")
    auth = {"Authorization": f"Bearer {key}"}
    images, labels = load_fashion_mnist("test")
    pick = balanced_indices(labels, 10)
    archive = data_dir / "fm.zip"
    write_imagefolder(archive, images[pick], labels[pick])
    ds = client.post("/v1/datasets", headers=auth, files={"file": ("fm.zip", archive.read_bytes())})
    ds.raise_for_status()
    job = client.post(
        "/v1/finetunes",
        headers=auth,
        json={
            "dataset_id": ds.json()["id"],
            "backbone": BACKBONE,
            "lam": 1e-2,
            "head": {"gates": 32, "tol": 1e-4, "max_iter": 300},
        },
    ).json()
    env = jobs.Env(settings)
    for stage in (jobs.validate, jobs.extract, jobs.fit, jobs.evaluate, jobs.register):
        stage(job["id"], env)
    head_id = jobs.head_id_for(job["id"])
    return head_id, str(settings.data_dir / "artifacts" / "heads" / head_id), auth


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    p.add_argument("--servers", default="bare,cvxtune", help="which servers, in this order")
    p.add_argument("--bare-server", nargs=2, metavar=("PORT", "HEAD_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.bare_server:
        bare_server(int(args.bare_server[0]), args.bare_server[1], args.device)
        return 0

    from workers.sample_data import load_fashion_mnist, png_bytes

    image = png_bytes(load_fashion_mnist("test")[0][0])
    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "device": args.device,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        head_id, head_dir, auth = _make_head(data_dir)
        print("limit: best bare batched forward ...", flush=True)
        results["limit"] = forward_limit(device=args.device)
        print(json.dumps(results["limit"]["best"]), flush=True)

        env = {
            **os.environ,
            "CVXTUNE_DATA_DIR": str(data_dir),
            "CVXTUNE_SERVING_DEVICE": args.device,
        }
        servers = {}
        bare_port, api_port = _port(), _port()
        servers["bare"] = subprocess.Popen(
            [
                *(sys.executable, __file__, "--device", args.device),
                *("--bare-server", str(bare_port), head_dir),
            ],
            env=env,
        )
        servers["cvxtune"] = subprocess.Popen(
            [sys.executable, "-m", "cvxtune.cli", "serve", "--no-worker", "--port", str(api_port)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            targets = {
                "bare": (f"http://127.0.0.1:{bare_port}", "/predict", {}),
                "cvxtune": (f"http://127.0.0.1:{api_port}", f"/v1/heads/{head_id}/predict", auth),
            }
            for name in args.servers.split(","):
                base, path, headers = targets[name]
                _wait(f"{base}/healthz")
                results[name] = []
                for c in args.concurrency:
                    row = asyncio.run(_load(base + path, headers, image, c, args.seconds))
                    results[name].append(row)
                    print(name, json.dumps(row), flush=True)
        finally:
            for proc in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    limit = results["limit"]["best"]["images_per_s"]
    lines = [
        "| server | clients | p50 ms | p99 ms | images/s | vs limit |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("bare", "cvxtune"):
        for r in results.get(name, []):
            lines.append(
                f"| {name} | {r['concurrency']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                f"| {r['images_per_s']:.1f} | {r['images_per_s'] / limit:.2f} |"
            )
    best = results["limit"]["best"]
    lines.append(
        f"\nlimit: {limit:.1f} images/s (batch {best['batch']}, {best['memory_format']}, "
        f"{best.get('layout', '1 forward')})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    from cvxtune.memory import reexec_tuned

    reexec_tuned()  # the settings the service runs with, for every row alike
    raise SystemExit(main())
