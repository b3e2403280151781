"""A real service for the integration tests: the API (`cvxtune serve --no-worker`) and a Celery
worker (`cvxtune worker`, prefork pool) as separate processes, talking through the real Redis
on 127.0.0.1:6379 and a real PostgreSQL database when one answers on 127.0.0.1:5432 (SQLite
otherwise). Each test session has its own queue, database and data directory."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REDIS_URL = os.environ.get("CVXTUNE_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_ADMIN = os.environ.get("CVXTUNE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


def _pg_admin() -> Any:
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=2)
    except Exception:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class Service:
    def __init__(self, data_dir: Path, env: dict[str, str]):
        self.data_dir, self.env = data_dir, env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.data_dir / log, "ab")
        return subprocess.Popen(
            [sys.executable, "-m", "cvxtune.cli", *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_api(self) -> None:
        self.api = self._spawn(["serve", "--no-worker", "--port", str(self.port)], "api.log")

        def up() -> bool:
            assert self.api is not None and self.api.poll() is None, self.log("api.log")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the API to answer")

    def stop_api(self) -> None:
        _stop(self.api)
        self.api = None

    def start_worker(self) -> None:
        log = self.data_dir / "worker.log"
        start = log.stat().st_size if log.exists() else 0
        self.worker = self._spawn(
            ["worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "info"],
            "worker.log",
        )

        def ready() -> bool:
            assert self.worker is not None and self.worker.poll() is None, self.log("worker.log")
            return log.exists() and b" ready." in log.read_bytes()[start:]

        wait_for(ready, 90, "the Celery worker to be ready")

    def worker_children(self) -> list[int]:
        import psutil

        assert self.worker is not None
        return [p.pid for p in psutil.Process(self.worker.pid).children()]

    def log(self, name: str, tail: int = 4000) -> str:
        p = self.data_dir / name
        return p.read_text(errors="replace")[-tail:] if p.exists() else ""

    def key(self, project: str) -> dict[str, str]:
        out = subprocess.run(
            [sys.executable, "-m", "cvxtune.cli", "keys", "create", "--project", project],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return {"Authorization": f"Bearer {out.stdout.strip()}"}

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=120)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not _redis_up():
        pytest.skip(f"no Redis at {REDIS_URL} (.ci/run starts one)")
    data_dir = tmp_path_factory.mktemp("service")
    tag = secrets.token_hex(4)
    env = {
        **os.environ,
        "CVXTUNE_DATA_DIR": str(data_dir),
        "CVXTUNE_BROKER_URL": REDIS_URL,
        "CVXTUNE_QUEUE": f"cvxtune-it-{tag}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        # Job recovery on a test's time scale: a stage silent for 5 s lost its worker.
        "CVXTUNE_JOB_HEARTBEAT_S": "0.5",
        "CVXTUNE_JOB_STALE_S": "5",
        "CVXTUNE_REAP_INTERVAL_S": "1",
    }
    admin = _pg_admin()
    dbname = f"cvxtune_it_{tag}"
    if admin is not None:
        admin.execute(f'CREATE DATABASE "{dbname}"')
        base = PG_ADMIN.rsplit("/", 1)[0]
        env["CVXTUNE_DATABASE_URL"] = f"{base}/{dbname}"
    svc = Service(data_dir, env)
    try:
        svc.start_api()  # migrates the database first
        svc.start_worker()
        yield svc
    finally:
        svc.stop_api()
        _stop(svc.worker)
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            admin.close()


@pytest.fixture(scope="session")
def alpha(service: Service) -> dict[str, str]:
    return service.key("alpha")


@pytest.fixture(scope="session")
def beta(service: Service) -> dict[str, str]:
    return service.key("beta")


def _wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float = 240,
    states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/finetunes/{job_id}").json()
        return job if job["state"] in states else None

    return wait_for(done, timeout, f"finetune {job_id} to reach {states}", every=0.3)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def wait_job() -> Callable[..., dict[str, Any]]:
    return _wait_job


@pytest.fixture(scope="session")
def poll() -> Callable[..., Any]:
    return wait_for
