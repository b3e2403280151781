"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, tuned for two processes.

`cvxtune serve` needs a broker without Redis. kombu's SQL transport works, but hands every
transport option to create_engine and polls once a second; this subclass polls every 0.1 s and
opens SQLite in WAL mode with a busy timeout, so the API enqueuing and the worker consuming do
not trip over each other's locks. Registered as the `cvxsqla` transport (cvxsqla+sqlite:///...).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqla

SCHEME = "cvxsqla"


class Channel(sqla.Channel):
    def _engine_from_config(self) -> Any:
        from cvxtune.db import make_engine

        return make_engine(self.connection.client.hostname)


class Transport(sqla.Transport):
    Channel = Channel
    polling_interval = 0.1


def register() -> None:
    TRANSPORT_ALIASES.setdefault(SCHEME, "cvxtune.broker:Transport")
