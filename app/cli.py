"""`cvxtune serve | worker | keys`: the service's command line (dispatched by cvxtune.cli).

`serve` runs the API in this process and a Celery worker as a supervised child process (restarted
if it dies). With no broker configured they talk through the embedded broker, a SQLite file in
the data directory, so one command runs the whole service with neither Redis nor Docker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from cvxtune.settings import Settings, get_settings

log = logging.getLogger("cvxtune.serve")


def _apply_data_dir(data_dir: str | None) -> Settings:
    if data_dir:
        os.environ["CVXTUNE_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def worker_command(
    settings: Settings,
    concurrency: int | None = None,
    pool: str = "prefork",
    loglevel: str = "info",
) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"]
    cmd += ["-Q", settings.queue, "-l", loglevel, "-P", pool]
    cmd += ["-c", str(concurrency or settings.worker_concurrency)]
    # A random suffix, not the PID: in containers every worker is PID 1, and replicas sharing
    # a host (host networking) would otherwise share a node name.
    cmd += ["-n", f"cvxtune-{uuid.uuid4().hex[:8]}@%h"]
    if settings.embedded_broker:
        # The SQLite transport has no broadcast: no gossip, mingle or remote control.
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return cmd


class Supervisor:
    """Keeps one worker process alive beside the API; restarts it if it exits."""

    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="worker-supervisor")

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, start_new_session=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.wait(2.0):
            with self.lock:
                if self.stopping.is_set() or self.proc is None or self.proc.poll() is None:
                    continue
                log.warning("worker exited with %s; restarting it", self.proc.returncode)
                self.proc = subprocess.Popen(self.cmd, start_new_session=True)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # warm shutdown: unacknowledged tasks go back
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvxtune serve", description="run the API and a worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="where the embedded database, broker and artifacts live")
    p.add_argument("--no-worker", action="store_true", help="run the API only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = _apply_data_dir(args.data_dir)

    import uvicorn

    from app.main import create_app

    app = create_app(settings)  # migrates the database before the worker starts
    supervisor = None
    if not args.no_worker:
        supervisor = Supervisor(worker_command(settings))
        supervisor.start()
    print(
        f"cvxtune: data in {settings.data_dir}; broker "
        f"{'embedded (SQLite)' if settings.embedded_broker else 'configured'}; "
        f"API on http://{args.host}:{args.port}",
        flush=True,
    )

    def on_term(signum: int, frame: object) -> None:
        # uvicorn re-raises SIGTERM after its graceful shutdown; exit through `finally`.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="cvxtune worker", description="run a Celery worker (broker from CVXTUNE_BROKER_URL)"
    )
    p.add_argument("--data-dir")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    p.add_argument("--loglevel", default="info")
    args = p.parse_args(argv)
    settings = _apply_data_dir(args.data_dir)
    cmd = worker_command(settings, args.concurrency, args.pool, args.loglevel)
    os.execv(cmd[0], cmd)  # the worker replaces this process; signals reach it directly
    return 0  # not reached


def keys_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvxtune keys", description="manage API keys")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="print a new key for a project (created if needed)")
    c.add_argument("--project", required=True)
    c.add_argument("--data-dir")
    args = p.parse_args(argv)
    settings = _apply_data_dir(args.data_dir)

    from app.auth import create_key
    from app.migrate import upgrade
    from cvxtune.db import session_scope

    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        key = create_key(session, args.project)
    print(key)
    return 0
