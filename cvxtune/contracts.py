"""What the API and the workers agree on: task names, job states and stages, the head spec and
the Celery configuration. The API sends tasks by these names and never imports task code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cvxtune.settings import Settings

# The finetune chain, in order; each task takes the job id only.
TASK_VALIDATE = "cvxtune.finetune.validate"
TASK_EXTRACT = "cvxtune.finetune.extract"
TASK_FIT = "cvxtune.finetune.fit"
TASK_EVALUATE = "cvxtune.finetune.evaluate"
TASK_REGISTER = "cvxtune.finetune.register"
FINETUNE_CHAIN = (TASK_VALIDATE, TASK_EXTRACT, TASK_FIT, TASK_EVALUATE, TASK_REGISTER)
# Batch prediction over a stored dataset; takes the prediction job id.
TASK_PREDICT_BATCH = "cvxtune.predictions.run"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class Stage(StrEnum):
    queued = "queued"
    validate = "validate"
    extract = "extract"
    fit = "fit"
    evaluate = "evaluate"
    register = "register"
    done = "done"


# Share of the overall progress each stage covers (extraction dominates image datasets).
STAGE_SPAN: dict[Stage, tuple[float, float]] = {
    Stage.validate: (0.0, 0.02),
    Stage.extract: (0.02, 0.60),
    Stage.fit: (0.60, 0.95),
    Stage.evaluate: (0.95, 0.99),
    Stage.register: (0.99, 1.0),
}


def task_id(job_id: str, task_name: str) -> str:
    """A deterministic Celery task id per (job, stage): a job's tasks can be found, revoked."""
    return f"{job_id}.{task_name.rsplit('.', 1)[-1]}"


class DatasetKind(StrEnum):
    images = "images"
    features = "features"


class HeadSpec(BaseModel):
    """The head to fit: the solver's options. Only the MLP head is served today."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp"] = "mlp"
    activation: Literal["gated_relu", "relu"] = "gated_relu"
    gates: int = Field(default=64, ge=1, le=4096)
    penalty: Literal["nuclear", "frobenius"] = "nuclear"
    loss: Literal["squared", "cross_entropy"] = "cross_entropy"
    fit_intercept: bool = True
    tol: float = Field(default=1e-6, gt=0, le=1.0)
    max_iter: int | None = Field(default=None, ge=1, le=1_000_000)

    def solver_kwargs(self) -> dict[str, Any]:
        kw = self.model_dump(exclude={"kind", "max_iter"})
        if self.max_iter is not None:
            kw["max_iter"] = self.max_iter
        return kw


def celery_config(settings: Settings) -> dict[str, Any]:
    """One configuration for the producer (API) and the consumer (worker)."""
    from kombu import Queue

    from cvxtune.broker import register

    register()  # the embedded transport's URL scheme
    # The SQL transport passes its options to create_engine, so it gets none.
    transport_options: dict[str, Any] = (
        {} if settings.embedded_broker else {"visibility_timeout": settings.visibility_timeout_s}
    )
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": 3,
        "task_queues": [Queue(settings.queue)],
        "task_default_queue": settings.queue,
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        # The database holds each job's truth; no result backend is needed.
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": int(settings.task_time_limit_s * 0.95),
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": not settings.embedded_broker,
        "worker_send_task_events": False,
    }
