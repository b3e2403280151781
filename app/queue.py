"""Sending tasks by name. The API holds a Celery *client* configured like the workers, and never
imports task code; the names live in cvxtune.contracts."""

from __future__ import annotations

from typing import Any

from celery import Celery, chain

from cvxtune import contracts
from cvxtune.errors import TransientError
from cvxtune.settings import Settings


class TaskQueue:
    def __init__(self, settings: Settings):
        self.app = Celery("cvxtune")
        self.app.conf.update(contracts.celery_config(settings))

    def _sig(self, name: str, job_id: str) -> Any:
        return self.app.signature(
            name, args=(job_id,), immutable=True, task_id=contracts.task_id(job_id, name)
        )

    def send_finetune(self, job_id: str, start: str = contracts.TASK_VALIDATE) -> None:
        """Queue the job's chain, from the task `start` on (recovery resumes mid-chain)."""
        names = contracts.FINETUNE_CHAIN[contracts.FINETUNE_CHAIN.index(start) :]
        try:
            chain(*(self._sig(n, job_id) for n in names)).apply_async(
                retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2}
            )
        except Exception as e:  # kombu raises a zoo of connection errors
            raise TransientError("the job broker is unreachable; try again shortly") from e

    def send_batch_prediction(self, prediction_id: str) -> None:
        try:
            self._sig(contracts.TASK_PREDICT_BATCH, prediction_id).apply_async(
                retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2}
            )
        except Exception as e:
            raise TransientError("the job broker is unreachable; try again shortly") from e

    def revoke(self, job_id: str) -> None:
        """Best effort: drop the job's queued tasks (the worker also checks the database)."""
        ids = [contracts.task_id(job_id, n) for n in contracts.FINETUNE_CHAIN]
        try:
            self.app.control.revoke(ids)
        except Exception:  # the embedded broker has no broadcast; the DB flag still stops it
            pass

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        self.app.close()
