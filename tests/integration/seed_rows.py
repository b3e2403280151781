"""Database rows the stage-function tests start from: a project, a features dataset, a finetune."""

from __future__ import annotations

from cvxtune.db import Dataset, Finetune, Project, session_scope


def add_finetune(database_url: str) -> str:
    """Insert project prj_1, dataset ds_1 and finetune ft_1; return the job id."""
    with session_scope(database_url) as s:
        s.add(Project(id="prj_1", name="p"))
        s.flush()
        s.add(
            Dataset(
                id="ds_1",
                project_id="prj_1",
                name="d",
                kind="features",
                format="npz",
                artifact_key="datasets/ds_1/features.npz",
                content_hash="0" * 64,
                size_bytes=1,
                n_samples=4,
                n_features=2,
                classes=["a", "b"],
                class_counts={"a": 2, "b": 2},
                report={},
            )
        )
        s.add(
            Finetune(
                id="ft_1",
                project_id="prj_1",
                dataset_id="ds_1",
                backbone=None,
                head={"kind": "mlp"},
                lam="auto",
                validation_fraction=0.2,
                seed=0,
                request_hash="x",
                outputs={},
            )
        )
    return "ft_1"
