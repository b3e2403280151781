"""`cvxtune serve` on the embedded default: one process tree, no Redis, no Docker."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Serve:
    """`cvxtune serve` in a fresh data directory, with a key for one project."""

    def __init__(self, tmp_path: Path, poll: Any, **env: str):
        self.tmp_path, self.poll = tmp_path, poll
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CVXTUNE_")}
        self.env.update(CVXTUNE_DATA_DIR=str(tmp_path / "d"), **env)
        port = _port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cvxtune.cli", "serve", "--port", str(port)],
            env=self.env,
            stdout=open(tmp_path / "serve.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        ready = poll(lambda: _get(f"{self.url}/readyz"), 90, "cvxtune serve to be ready")
        assert ready["checks"] == {"database": "ok", "broker": "ok", "artifacts": "ok"}
        key = subprocess.run(
            [sys.executable, "-m", "cvxtune.cli", "keys", "create", "--project", "solo"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.headers = {"Authorization": f"Bearer {key}"}

    def log(self, tail: int = 3000) -> str:
        return (self.tmp_path / "serve.log").read_text(errors="replace")[-tail:]

    def start_job(self, head: dict[str, Any]) -> str:
        rng = np.random.default_rng(0)
        X = np.concatenate([rng.normal(0, 1, (25, 4)), rng.normal(5, 1, (25, 4))])
        buf = io.BytesIO()
        np.savez(buf, features=X.astype(np.float32), labels=np.repeat([0, 1], 25))
        upload = {"file": ("x.npz", buf.getvalue())}
        ds = httpx.post(f"{self.url}/v1/datasets", headers=self.headers, files=upload)
        assert ds.status_code == 201, ds.text
        body = {"dataset_id": ds.json()["id"], "lam": 0.01, "head": head}
        created = httpx.post(f"{self.url}/v1/finetunes", headers=self.headers, json=body)
        assert created.status_code == 202, (created.text, self.log())
        return str(created.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/finetunes/{job_id}", headers=self.headers).json()

    def wait_done(self, job_id: str) -> dict[str, Any]:
        return self.poll(
            lambda: (j := self.job(job_id))["state"] in ("succeeded", "failed") and j,
            180,
            "the embedded job",
        )

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def test_serve_runs_a_job_without_redis(tmp_path, poll):
    serve = Serve(tmp_path, poll)
    try:
        job_id = serve.start_job({"gates": 8, "tol": 1e-4, "max_iter": 200})
        done = serve.wait_done(job_id)
        assert done["state"] == "succeeded", (done, serve.log())
        assert (tmp_path / "d" / "broker.sqlite3").exists()
        workers = serve.workers()
        assert workers, "serve should supervise a worker process"
    finally:
        serve.stop()
    # The worker goes down with the API instead of lingering.
    poll(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers),
        60,
        "the worker to stop",
    )


def test_serve_finishes_a_job_whose_worker_was_killed_whole(tmp_path, poll):
    # The embedded broker never delivers an unacknowledged message again; the job comes back
    # through its heartbeat going stale (5 s here) and the supervisor restarting the worker.
    serve = Serve(
        tmp_path,
        poll,
        CVXTUNE_JOB_HEARTBEAT_S="0.5",
        CVXTUNE_JOB_STALE_S="5",
        CVXTUNE_REAP_INTERVAL_S="1",
    )
    try:
        job_id = serve.start_job({"gates": 64, "tol": 1e-15, "max_iter": 3000})  # a few seconds
        poll(lambda: serve.job(job_id)["stage"] == "fit", 120, "the job to start fitting")
        worker = next(p for p in serve.workers() if p.ppid() == serve.proc.pid)
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool, as a lost node would
        done = serve.wait_done(job_id)
        assert done["state"] == "succeeded", (done, serve.log())
        assert done["deliveries"]["fit"] >= 2
        assert "worker gone, queueing it again" in serve.log(tail=10**7)
    finally:
        serve.stop()


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
