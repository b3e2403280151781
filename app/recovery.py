"""Recovery of jobs whose worker died whole: re-queue a running stage whose heartbeat stopped.

A worker's pool process killed mid-task is handled by Celery (the message is rejected and
delivered again). A worker killed whole (OOM killer on the main process, a lost node, a
container stopped hard) acknowledges nothing and rejects nothing: Redis delivers the message
again only after the visibility timeout (hours, so long fits are not run twice), and the
embedded SQLite broker never does. Every task refreshes its job's heartbeat while it runs
(workers.jobs.heartbeat); this loop, in the API process, finds running jobs whose heartbeat is
older than `job_stale_s` and queues their current stage again, with the rest of the chain.

Claiming a job is one conditional UPDATE on the heartbeat it read, so when several API
processes run this loop, one of them re-queues the job. A late re-delivery of the original
message finds the job finished or further on and does nothing (workers.jobs.begin_stage); the
new delivery counts against `max_deliveries` like any other, so a job that kills every worker
it lands on still fails in the end.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from cvxtune.contracts import STAGE_TASK, JobState, Stage
from cvxtune.db import Finetune, Prediction, utcnow
from cvxtune.settings import Settings

log = logging.getLogger("cvxtune.recovery")


def requeue_stale(settings: Settings, sessions: sessionmaker[Session], queue: Any) -> list[str]:
    """Queue again every running job whose heartbeat is older than `job_stale_s`; their ids."""
    cutoff = utcnow() - timedelta(seconds=settings.job_stale_s)
    requeued = []
    with sessions() as s:
        finetunes = s.execute(
            select(Finetune.id, Finetune.heartbeat_at, Finetune.stage).where(
                Finetune.state == JobState.running, Finetune.heartbeat_at < cutoff
            )
        ).all()
        predictions = s.execute(
            select(Prediction.id, Prediction.heartbeat_at).where(
                Prediction.state == JobState.running, Prediction.heartbeat_at < cutoff
            )
        ).all()
    for job_id, beat, stage in finetunes:
        if beat is not None and _claim(sessions, Finetune, job_id, beat):
            log.warning(
                "job %s: no heartbeat for %.0fs in stage %s; worker gone, queueing it again",
                job_id,
                (utcnow() - beat).total_seconds(),
                stage,
            )
            queue.send_finetune(job_id, STAGE_TASK[Stage(stage)])
            requeued.append(job_id)
    for job_id, beat in predictions:
        if beat is not None and _claim(sessions, Prediction, job_id, beat):
            log.warning(
                "prediction %s: no heartbeat for %.0fs; worker gone, queueing it again",
                job_id,
                (utcnow() - beat).total_seconds(),
            )
            queue.send_batch_prediction(job_id)
            requeued.append(job_id)
    return requeued


def _claim(
    sessions: sessionmaker[Session],
    table: type[Finetune] | type[Prediction],
    job_id: str,
    beat: datetime,
) -> bool:
    """Clear the heartbeat we read, if it is still the one we read: False when the job beat
    meanwhile, finished, or another API process claimed it first. The new delivery takes a
    fresh heartbeat in begin_stage."""
    with sessions() as s:
        result = s.execute(
            update(table)
            .where(table.id == job_id, table.state == JobState.running, table.heartbeat_at == beat)
            .values(heartbeat_at=None)
        )
        s.commit()
    return bool(cast(CursorResult[Any], result).rowcount)


class Recovery:
    """Runs `requeue_stale` every `reap_interval_s` on a daemon thread until stopped."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], queue: Any):
        self.settings, self.sessions, self.queue = settings, sessions, queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.settings.reap_interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="cvxtune-recovery", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reap_interval_s):
            try:
                requeue_stale(self.settings, self.sessions, self.queue)
            except Exception:  # the database or broker blinked; the next round tries again
                log.exception("job recovery round failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
