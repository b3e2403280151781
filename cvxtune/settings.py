"""Service settings, read from the environment (prefix CVXTUNE_) through one cached getter.

Everything the API and the workers need to find each other lives here: the metadata database,
the broker, the artifact store and the data directory that holds the embedded defaults. With no
variables set, everything lives under `data_dir` and needs neither Redis nor Docker.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CVXTUNE_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".cvxtune")
    # Empty means "the embedded default under data_dir" (see the properties below).
    database_url: str = ""
    broker_url: str = ""
    artifacts_url: str = ""
    # One queue per deployment; tests use their own so they never meet another run's tasks.
    queue: str = "cvxtune"
    weights_dir: Path | None = None
    # MobileNetV3 and ViT have no offline weights here; random weights are for development only.
    allow_random_weights: bool = False

    max_upload_bytes: int = 2 * 1024**3
    # What an uploaded archive may expand to, and the smallest class allowed.
    max_archive_bytes: int = 8 * 1024**3
    min_samples_per_class: int = 2

    # Celery: a task must finish well before the broker re-delivers it (visibility timeout).
    task_time_limit_s: int = 3 * 3600
    visibility_timeout_s: int = 4 * 3600
    max_deliveries: int = 8
    # A worker running a job refreshes its heartbeat every job_heartbeat_s. A running job whose
    # heartbeat is older than job_stale_s lost its worker (killed whole: OOM, node lost), and
    # the API queues its stage again, every reap_interval_s (0: never) - instead of waiting for
    # the visibility timeout (Redis) or forever (the embedded broker never redelivers).
    job_heartbeat_s: float = 10.0
    job_stale_s: float = 120.0
    reap_interval_s: float = 30.0
    worker_concurrency: int = 1

    # Online serving: how many heads and backbones stay loaded, and the micro-batching window.
    serving_max_heads: int = 64
    serving_max_backbones: int = 2
    # Images per backbone forward; 0 picks per device: on a CPU, batching does not raise a
    # forward's throughput (measured with Lite0 on 2 cores: 46.8 images/s at batch 1, 39.0 at
    # 32), so batches stay small there; on a GPU it multiplies it.
    serving_max_batch: int = 0
    # "cpu", "cuda", "cuda:1", ...; empty: the GPU when there is one.
    serving_device: str = ""
    # Batches run at once per backbone; 0 picks per device: one per core on a CPU (each
    # forward single-threaded), one on a GPU.
    serving_runners: int = 0
    # 0: no added wait; a batch is whatever queued while the previous one ran (continuous
    # batching), so one client pays nothing and many clients share forwards.
    serving_max_wait_ms: float = 0.0
    # Backbones to load when the API starts (comma-separated), so no request pays for it.
    serving_preload: str = ""

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cvxtune.sqlite3'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"cvxsqla+sqlite:///{self.data_dir / 'broker.sqlite3'}"

    @property
    def resolved_artifacts_url(self) -> str:
        return self.artifacts_url or f"file://{self.data_dir / 'artifacts'}"

    @property
    def cache_dir(self) -> Path:
        """The embedding cache, by content hash; `cvxtune embed` uses the same one by default."""
        return self.data_dir / "cache"

    @property
    def store_cache_dir(self) -> Path:
        """Local copies of objects from a remote (S3) artifact store."""
        return self.data_dir / "store-cache"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith(("cvxsqla+", "sqla+"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; tests call `get_settings.cache_clear()` after changing the env."""
    s = Settings()
    s.data_dir = s.data_dir.expanduser().resolve()
    return s
