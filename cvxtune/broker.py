"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, tuned for two processes.

`cvxtune serve` needs a broker without Redis. kombu's SQL transport works, but hands every
transport option to create_engine and polls once a second; this subclass polls every 0.1 s and
opens SQLite in WAL mode with a busy timeout, so the API enqueuing and the worker consuming do
not trip over each other's locks. Registered as the `cvxsqla` transport (cvxsqla+sqlite:///...).

kombu guards its first use of a database (creating the tables, then a queue's row) with a
thread lock only, so two processes opening a fresh file at once fail with "table kombu_queue
already exists", "UNIQUE constraint failed: kombu_queue.name" or "database is locked" (the
API's first publish racing the worker's first poll; every trial of four processes failed so).
Here that first use holds an exclusive lock on a file beside the database, and a queue row
created meanwhile by another process is read back instead of inserted twice.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqla
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

SCHEME = "cvxsqla"


@contextmanager
def setup_lock(url: str) -> Iterator[None]:
    """Serialise schema and queue creation across processes sharing one SQLite file.

    Other databases (and in-memory SQLite) have no file to lock; there the IntegrityError
    fallback in `_get_or_create` covers the queue row.
    """
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        yield
        return
    with open(Path(path).with_name(Path(path).name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Channel(sqla.Channel):
    def _engine_from_config(self) -> Any:
        from cvxtune.db import make_engine

        return make_engine(self.connection.client.hostname)

    def _open(self) -> Any:
        url = self.connection.client.hostname
        if url not in self._engines:
            with sqla._MUTEX:
                if url not in self._engines:
                    engine = self._engine_from_config()
                    with setup_lock(url):
                        sqla.metadata.create_all(engine)
                    self._engines[url] = engine, sessionmaker(bind=engine)
        return self._engines[url]

    def _get_or_create(self, queue: str) -> Any:
        obj = self._queue_row(queue)
        if obj is not None:
            return obj
        with sqla._MUTEX, setup_lock(self.connection.client.hostname):
            obj = self._queue_row(queue)
            if obj is None:
                obj = self.queue_cls(queue)
                self.session.add(obj)
                try:
                    self.session.commit()
                except IntegrityError:  # another process made it between our read and write
                    self.session.rollback()
                    obj = self._queue_row(queue)
        return obj

    def _queue_row(self, queue: str) -> Any:
        return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).first()


class Transport(sqla.Transport):
    Channel = Channel
    polling_interval = 0.1


def register() -> None:
    TRANSPORT_ALIASES.setdefault(SCHEME, "cvxtune.broker:Transport")
