"""`cvxtune serve` on the embedded default: one process tree, no Redis, no Docker."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_serve_runs_a_job_without_redis(tmp_path, poll):
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVXTUNE_")}
    env["CVXTUNE_DATA_DIR"] = str(tmp_path / "d")
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "cvxtune.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = poll(lambda: _get(f"{url}/readyz"), 90, "cvxtune serve to be ready")
        assert ready["checks"] == {"database": "ok", "broker": "ok", "artifacts": "ok"}
        key = subprocess.run(
            [sys.executable, "-m", "cvxtune.cli", "keys", "create", "--project", "solo"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        h = {"Authorization": f"Bearer {key}"}
        rng = np.random.default_rng(0)
        X = np.concatenate([rng.normal(0, 1, (25, 4)), rng.normal(5, 1, (25, 4))])
        buf = io.BytesIO()
        np.savez(buf, features=X.astype(np.float32), labels=np.repeat([0, 1], 25))
        ds = httpx.post(f"{url}/v1/datasets", headers=h, files={"file": ("x.npz", buf.getvalue())})
        assert ds.status_code == 201, ds.text
        body = {
            "dataset_id": ds.json()["id"],
            "lam": 0.01,
            "head": {"gates": 8, "tol": 1e-4, "max_iter": 200},
        }
        created = httpx.post(f"{url}/v1/finetunes", headers=h, json=body)
        assert created.status_code == 202, (
            created.text,
            (tmp_path / "serve.log").read_text()[-3000:],
        )
        job = created.json()
        done = poll(
            lambda: (
                (j := httpx.get(f"{url}/v1/finetunes/{job['id']}", headers=h).json())["state"]
                in ("succeeded", "failed")
                and j
            ),
            180,
            "the embedded job",
        )
        assert done["state"] == "succeeded", (done, (tmp_path / "serve.log").read_text()[-3000:])
        assert (tmp_path / "d" / "broker.sqlite3").exists()
        workers = psutil.Process(serve.pid).children(recursive=True)
        assert workers, "serve should supervise a worker process"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    # The worker goes down with the API instead of lingering.
    poll(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers),
        60,
        "the worker to stop",
    )


def _get(url: str):  # type: ignore[no-untyped-def]
    try:
        r = httpx.get(url, timeout=2)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
