"""The Celery application the workers run: `celery -A workers.celery_app worker`.

Configuration comes from cvxtune.contracts.celery_config, the same function the API's client
uses, so producer and consumer cannot disagree on queues, serialisation or acknowledgement.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_process_init

from cvxtune import contracts
from cvxtune.settings import get_settings

app = Celery("cvxtune", include=["workers.tasks"])
app.conf.update(contracts.celery_config(get_settings()))


@worker_process_init.connect
def _child_init(**_: object) -> None:
    # Each pool child opens its own database connections; never reuse the parent's after fork.
    from cvxtune.db import engine_for

    for url in {get_settings().resolved_database_url}:
        engine_for(url).dispose(close=False)
    logging.getLogger("cvxtune").setLevel(logging.INFO)
