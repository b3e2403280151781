"""What the API and the workers agree on: task names, job states and stages, the head spec and
the Celery configuration. The API sends tasks by these names and never imports task code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    RootModel,
    model_validator,
)

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


# The task that runs each stage: where a job queued again mid-chain resumes.
STAGE_TASK: dict[Stage, str] = {
    Stage.validate: TASK_VALIDATE,
    Stage.extract: TASK_EXTRACT,
    Stage.fit: TASK_FIT,
    Stage.evaluate: TASK_EVALUATE,
    Stage.register: TASK_REGISTER,
}

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


# What each head kind is fitted on: the backbone output it needs, and the solver class that
# fits it (by name: the API never imports the solver).
HEAD_KINDS = ("mlp", "cnn", "attention")
HEAD_OUTPUT = {"mlp": "pooled", "cnn": "feature_map", "attention": "tokens"}
HEAD_SOLVER = {
    "mlp": "ConvexMLPClassifier",
    "cnn": "ConvexCNNClassifier",
    "attention": "ConvexAttentionClassifier",
}
# Per-sample input of each kind, for messages: pooled (d,), feature map (C, H, W), tokens (T, d).
HEAD_INPUT = {"mlp": "(d,)", "cnn": "(channels, height, width)", "attention": "(tokens, d)"}
# Where a backbone catalogue entry gives the shape of each output.
OUTPUT_FIELD = {"pooled": "embed_dim", "feature_map": "feature_map_shape", "tokens": "token_shape"}


def head_kind_of_solver(class_name: str) -> str:
    """The head kind a saved solver class fits (heads saved as MLP regressors count as mlp)."""
    for kind, name in HEAD_SOLVER.items():
        if name == class_name:
            return kind
    if class_name == "ConvexMLPRegressor":
        return "mlp"
    raise ValueError(f"no head kind fits solver class {class_name!r}")


def head_kinds_for(backbone: dict[str, Any]) -> list[str]:
    """The head kinds a backbone catalogue entry can feed: those whose output it describes."""
    return [k for k in HEAD_KINDS if backbone.get(OUTPUT_FIELD[HEAD_OUTPUT[k]])]


Loss = Literal["squared", "cross_entropy"]
Penalty = Literal["nuclear", "frobenius"]
Activation = Literal["gated_relu", "relu"]
Tol = Annotated[float, Field(gt=0, le=1.0)]
MaxIter = Annotated[int | None, Field(ge=1, le=1_000_000)]


class _Head(BaseModel):
    """What every head kind shares; each kind lists its options and forbids all others."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_options(cls, data: Any) -> Any:
        # pydantic would say "extra inputs are not permitted"; say which options exist instead.
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                kind = cls.model_fields["kind"].default or data.get("kind")
                elsewhere = [k for k in HEAD_KINDS if k != kind and _has_options(k, unknown)]
                hint = f" (an option of head kind {elsewhere[0]!r})" if elsewhere else ""
                raise ValueError(
                    f"unknown option{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))} for head kind {kind!r}{hint}; "
                    f"its options are {', '.join(k for k in cls.model_fields if k != 'kind')}"
                )
        return data

    @property
    def output(self) -> str:
        """The backbone output this head is fitted on."""
        return HEAD_OUTPUT[self.kind]  # type: ignore[attr-defined]

    @property
    def solver_class(self) -> str:
        return HEAD_SOLVER[self.kind]  # type: ignore[attr-defined]

    def solver_kwargs(self) -> dict[str, Any]:
        """The solver's keyword arguments (max_iter only when set: each solver has its own)."""
        kw = self.model_dump(exclude={"kind", "max_iter"})
        max_iter = getattr(self, "max_iter", None)
        if max_iter is not None:
            kw["max_iter"] = max_iter
        return kw

    def check_input(self, shape: tuple[int, ...] | list[int]) -> None:
        """Raise ValueError when a backbone output of this per-sample shape cannot feed the
        head. Pooled vectors and tokens (T, d) of any size do (attention projects on
        min(n_components, d) directions)."""


class MLPHead(_Head):
    """A two-layer ReLU MLP on pooled embeddings (n, d)."""

    kind: Literal["mlp"] = "mlp"
    activation: Activation = "gated_relu"
    gates: int = Field(default=64, ge=1, le=4096)
    penalty: Penalty = "nuclear"
    loss: Loss = "cross_entropy"
    fit_intercept: bool = True
    tol: Tol = 1e-6
    max_iter: MaxIter = None
    # Column generation: rounds that add fresh gates violating the dual constraint (gated only).
    pricing_rounds: int = Field(default=0, ge=0, le=8)

    @model_validator(mode="after")
    def _pricing_needs_gates(self) -> MLPHead:
        if self.pricing_rounds and self.activation != "gated_relu":
            raise ValueError("pricing_rounds needs activation 'gated_relu'")
        return self


class CNNHead(_Head):
    """Conv -> ReLU -> average pool -> linear on feature maps (n, C, H, W)."""

    kind: Literal["cnn"] = "cnn"
    activation: Activation = "gated_relu"
    gates: int = Field(default=128, ge=1, le=4096)
    kernel_size: int = Field(default=1, ge=1, le=7)
    stride: int = Field(default=1, ge=1, le=7)
    padding: int = Field(default=0, ge=0, le=3)
    # Channels are projected on this many principal components first (None: raw channels).
    n_components: int | None = Field(default=64, ge=1, le=4096)
    penalty: Penalty = "nuclear"
    loss: Loss = "cross_entropy"
    fit_intercept: bool = True
    tol: Tol = 1e-6
    max_iter: MaxIter = None

    def check_input(self, shape: tuple[int, ...] | list[int]) -> None:
        """Raise ValueError when a (C, H, W) feature map cannot feed this head."""
        c, h, w = (int(v) for v in shape)
        if min(h, w) + 2 * self.padding < self.kernel_size:
            raise ValueError(
                f"kernel_size {self.kernel_size} does not fit the {h} x {w} feature map "
                f"with padding {self.padding}"
            )
        if self.n_components is not None and self.n_components > c:
            raise ValueError(
                f"n_components {self.n_components} exceeds the feature map's {c} channels"
            )


class AttentionHead(_Head):
    """Convex self-attention (linear or gated ReLU) on tokens (n, T, d)."""

    kind: Literal["attention"] = "attention"
    attention: Literal["linear", "gated_relu"] = "linear"
    gates: int = Field(default=8, ge=1, le=64)
    # Tokens are projected on this many whitened principal directions; the lifted program grows
    # as its cube, hence the bound.
    n_components: int = Field(default=16, ge=1, le=64)
    loss: Loss = "cross_entropy"
    fit_intercept: bool = True
    tol: Tol = 1e-6
    max_iter: MaxIter = None


def _has_options(kind: str, names: list[str]) -> bool:
    fields = _HEADS[kind].model_fields
    return all(n in fields for n in names)


_HEADS: dict[str, type[MLPHead | CNNHead | AttentionHead]] = {
    "mlp": MLPHead,
    "cnn": CNNHead,
    "attention": AttentionHead,
}


HeadOptions = MLPHead | CNNHead | AttentionHead


class HeadSpec(RootModel[HeadOptions]):
    """The head to fit: its kind ("mlp" by default) and that kind's solver options.

    Each kind validates its own options and refuses the others'. `root` is the kind's model.
    """

    root: HeadOptions = Field(default_factory=MLPHead)

    @model_validator(mode="wrap")
    @classmethod
    def _by_kind(cls, data: Any, handler: ModelWrapValidatorHandler[HeadSpec]) -> HeadSpec:
        # Validate against the named kind only, so errors point at the option (head.gates),
        # not at a union member, and an unknown kind says which kinds exist.
        if not isinstance(data, dict):
            return handler(data)
        kind = data.get("kind", "mlp")  # a head without a kind is the MLP, as it always was
        if not isinstance(kind, str) or kind not in _HEADS:
            raise ValueError(
                f"unknown head kind {kind!r}; choose one of {', '.join(map(repr, HEAD_KINDS))}"
            )
        return cls.model_construct(_HEADS[kind].model_validate(data))

    @property
    def kind(self) -> str:
        return self.root.kind

    @property
    def output(self) -> str:
        return self.root.output

    @property
    def solver_class(self) -> str:
        return self.root.solver_class

    def solver_kwargs(self) -> dict[str, Any]:
        return self.root.solver_kwargs()

    def check_input(self, shape: tuple[int, ...] | list[int]) -> None:
        self.root.check_input(shape)


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
