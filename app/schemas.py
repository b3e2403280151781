"""Request and response bodies, in families (XCreate, XPublic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field

from cvxtune.contracts import HeadSpec

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = Field(None, description="pass as ?cursor= to get the next page")


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    kind: str
    format: str
    n_samples: int
    n_features: int | None
    classes: list[str]
    class_counts: dict[str, int]
    report: dict[str, Any]
    size_bytes: int
    content_hash: str
    created_at: datetime


class BackbonePublic(BaseModel):
    name: str
    family: str | None = None
    embed_dim: int
    input_size: list[int]
    feature_map_shape: list[int] | None = None
    token_shape: list[int] | None = None
    head_kinds: list[str] = Field(
        default_factory=list, description="head kinds its outputs can feed (mlp, cnn, attention)"
    )
    description: str = ""
    license: str | None = None
    weights_available: bool
    weights: dict[str, Any] | None = None


class FinetuneCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": "ds_0123456789abcdef",
                    "backbone": "tf_efficientnet_lite0",
                    "head": {"kind": "mlp", "gates": 64},
                    "lam": "auto",
                    "validation_fraction": 0.2,
                    "seed": 0,
                },
                {
                    "dataset_id": "ds_0123456789abcdef",
                    "backbone": "tf_efficientnet_lite0",
                    "head": {"kind": "cnn", "gates": 128, "kernel_size": 1, "n_components": 64},
                },
                {
                    "dataset_id": "ds_0123456789abcdef",
                    "backbone": "vit_small_patch16_224",
                    "head": {"kind": "attention", "attention": "gated_relu", "gates": 8},
                },
            ]
        },
    )
    dataset_id: str
    backbone: str | None = Field(
        None,
        description="required for image datasets; for feature datasets, the backbone that "
        "produced them (enables image predict)",
    )
    head: HeadSpec = Field(
        default_factory=HeadSpec,
        description='kind "mlp" (default; pooled embeddings), "cnn" (feature maps) or '
        '"attention" (tokens), and that kind\'s solver options; unknown options are refused',
    )
    lam: float | Literal["auto"] = "auto"
    validation_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class ErrorPublic(BaseModel):
    code: str
    message: str


class FinetunePublic(BaseModel):
    id: str
    state: str
    stage: str
    progress: float
    eta_seconds: float | None
    error: ErrorPublic | None
    head_id: str | None
    dataset_id: str
    backbone: str | None
    head: dict[str, Any]
    lam: float | str
    validation_fraction: float
    seed: int
    attempts: int = Field(description="deliveries of the current stage")
    deliveries: dict[str, int] = Field(
        default_factory=dict, description="how often each stage was started (re-deliveries > 1)"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class HeadPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    finetune_id: str
    dataset_id: str
    backbone: str | None
    classes: list[str]
    metrics: dict[str, Any]
    certificate: dict[str, Any]
    lineage: dict[str, Any]
    created_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kind(self) -> str:
        """The head kind (heads registered before there were kinds are MLPs)."""
        return str((self.lineage.get("head") or {}).get("kind", "mlp"))


class PredictEmbeddings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embeddings: list[Any] = Field(
        ...,
        min_length=1,
        max_length=10_000,
        description="one entry per sample, shaped as the head's input: a vector (d,) for an mlp "
        "head, a feature map (channels, height, width) for a cnn head, tokens (T, d) for an "
        "attention head",
    )


class PredictionItem(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    head_id: str
    predictions: list[PredictionItem]


class BatchPredictionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset_id: str


class BatchPredictionPublic(BaseModel):
    id: str
    head_id: str
    dataset_id: str
    state: str
    progress: float
    error: ErrorPublic | None
    summary: dict[str, Any]
    predictions: list[dict[str, Any]] | None = None
    created_at: datetime
    finished_at: datetime | None
