"""The embedded SQLite broker under the race `cvxtune serve` starts with: several processes
opening a fresh broker file at once (the API's first publish, the worker's first poll)."""

from __future__ import annotations

import multiprocessing as mp
import time

from kombu import Connection

from cvxtune.broker import register

PROCESSES = 4


def _publish(url: str, start: float, i: int) -> str | None:
    register()
    while time.time() < start:  # line the processes up on the fresh file
        time.sleep(0.001)
    try:
        with Connection(url) as conn:
            q = conn.SimpleQueue("celery")
            q.put({"i": i})
            q.close()
    except Exception as e:  # reported to the parent, which asserts there are none
        return repr(e)
    return None


def test_processes_opening_a_fresh_broker_at_once_all_publish(tmp_path):
    url = f"cvxsqla+sqlite:///{tmp_path / 'broker.sqlite3'}"
    start = time.time() + 2.0  # after the spawned interpreters have imported kombu
    with mp.get_context("spawn").Pool(PROCESSES) as pool:
        errors = [
            e for e in pool.starmap(_publish, [(url, start, i) for i in range(PROCESSES)]) if e
        ]
    assert errors == []
    register()
    with Connection(url) as conn:
        q = conn.SimpleQueue("celery")
        got = sorted(q.get(timeout=5).payload["i"] for _ in range(PROCESSES))
        q.close()
    assert got == list(range(PROCESSES))
