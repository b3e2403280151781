"""Celery tasks: thin wrappers that call workers.jobs with a job id.

Failure policy, in one place: bad input (InvalidInput, DatasetError, WeightsUnavailable) fails
the job once with its code and message; transient faults (database or store unreachable) retry
with exponential backoff up to MAX_RETRIES; anything unexpected fails the job with a generic
message (the traceback goes to the log). A worker killed mid-task (OOM, SIGKILL) leaves the
message unacknowledged, so it is delivered again; jobs.begin_stage bounds how often. A task
refreshes its job's heartbeat while it runs: when the whole worker dies, nothing acknowledges or
rejects the message, and the API's recovery loop (app/recovery.py) queues the stage again once
the heartbeat is stale. A delivery with nothing to do (job finished, cancelled or already
further on) drops the rest of its chain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Task
from sqlalchemy.exc import OperationalError

from cvxtune import contracts
from cvxtune.db import Finetune, Prediction
from cvxtune.errors import CvxtuneError, TransientError
from workers import jobs
from workers.celery_app import app

log = logging.getLogger("cvxtune.tasks")

MAX_RETRIES = 5
TRANSIENT = (TransientError, OperationalError, ConnectionError, TimeoutError)


def _run(
    task: Task,
    fn: Callable[..., None],
    job_id: str,
    fail: Callable[..., None],
    table: type[Finetune] | type[Prediction],
) -> None:
    env = jobs.default_env()
    try:
        with jobs.heartbeat(env, table, job_id):
            fn(job_id, env)
    except jobs.NothingToDo as e:
        log.info("job %s: nothing to do in %s: %s", job_id, task.name, e)
        task.request.chain = None
    except jobs.JobCancelled:
        log.info("job %s: cancelled during %s", job_id, task.name)
        task.request.chain = None
    except TRANSIENT as e:
        if task.request.retries >= MAX_RETRIES:
            fail(
                env, job_id, "transient_error", "a dependency stayed unavailable; retries exhausted"
            )
            task.request.chain = None
            return
        countdown = min(2**task.request.retries, 60)
        jobs.drop_heartbeat(env, table, job_id)
        log.warning(
            "job %s: transient fault in %s (%s); retry in %ss", job_id, task.name, e, countdown
        )
        raise task.retry(exc=e, countdown=countdown, max_retries=MAX_RETRIES) from e
    except CvxtuneError as e:
        log.info("job %s: failed in %s: %s %s", job_id, task.name, e.code, e.message)
        fail(env, job_id, e.code, e.message)
        task.request.chain = None
    except SoftTimeLimitExceeded:
        fail(env, job_id, "time_limit", "the job ran past its time limit")
        task.request.chain = None
    except Exception:
        log.exception("job %s: unexpected error in %s", job_id, task.name)
        fail(
            env, job_id, "internal_error", f"unexpected error in stage {task.name.rsplit('.')[-1]}"
        )
        task.request.chain = None


def _stage(name: str, fn: Callable[..., None]) -> Task:
    def run(self: Task, job_id: str) -> None:
        _run(self, fn, job_id, jobs.fail_job, Finetune)

    run.__name__ = run.__qualname__ = name.rsplit(".", 1)[-1]
    return app.task(name=name, bind=True, acks_late=True)(run)  # type: ignore[no-any-return]


validate = _stage(contracts.TASK_VALIDATE, jobs.validate)
extract = _stage(contracts.TASK_EXTRACT, jobs.extract)
fit = _stage(contracts.TASK_FIT, jobs.fit)
evaluate = _stage(contracts.TASK_EVALUATE, jobs.evaluate)
register = _stage(contracts.TASK_REGISTER, jobs.register)


@app.task(name=contracts.TASK_PREDICT_BATCH, bind=True, acks_late=True)
def predict_batch(self: Task, prediction_id: str) -> None:
    _run(self, jobs.predict_batch, prediction_id, jobs.fail_prediction, Prediction)
