"""The stage functions on a real database, without a broker: failure policy and bookkeeping."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from seed_rows import add_finetune

from app.migrate import upgrade
from app.recovery import requeue_stale
from cvxtune import contracts
from cvxtune.db import Finetune, Prediction, session_scope, sessionmaker_for, utcnow
from cvxtune.errors import DatasetError
from cvxtune.settings import Settings
from workers import jobs


@pytest.fixture
def env(tmp_path):
    settings = Settings(data_dir=tmp_path, max_deliveries=3)
    upgrade(settings.resolved_database_url)
    return jobs.Env(settings)


def _job(env) -> str:
    return add_finetune(env.db)


def _get(env, job_id):
    with session_scope(env.db) as s:
        return s.get(Finetune, job_id)


def test_redelivery_is_bounded(env):
    job_id = _job(env)
    for _ in range(3):
        jobs.begin_stage(env, job_id, jobs.Stage.fit)
    with pytest.raises(jobs.NothingToDo, match="delivered too often"):
        jobs.begin_stage(env, job_id, jobs.Stage.fit)
    job = _get(env, job_id)
    assert job.state == "failed" and job.error_code == "too_many_attempts"
    assert job.outputs["deliveries"] == {"fit": 3}


def test_missing_dataset_files_fail_validation(env):
    job_id = _job(env)
    with pytest.raises(DatasetError, match="missing"):
        jobs.validate(job_id, env)


def test_reporter_stops_a_cancelled_job(env):
    job_id = _job(env)
    jobs.begin_stage(env, job_id, jobs.Stage.fit)
    report = jobs.Reporter(env, job_id, jobs.Stage.fit, "features", started=0.0)
    report(0.5, force=True)
    assert _get(env, job_id).progress == pytest.approx(0.05 + 0.9 * 0.5)
    with session_scope(env.db) as s:
        s.get(Finetune, job_id).cancel_requested = True
    with pytest.raises(jobs.JobCancelled):
        report(0.6, force=True)
    # A cancelled job's later stages do nothing.
    with pytest.raises(jobs.NothingToDo):
        jobs.begin_stage(env, job_id, jobs.Stage.evaluate)


def test_failure_keeps_the_first_terminal_state(env):
    job_id = _job(env)
    jobs.fail_job(env, job_id, "invalid_dataset", "bad")
    jobs.fail_job(env, job_id, "internal_error", "later")
    job = _get(env, job_id)
    assert (job.state, job.error_code, job.error_message) == ("failed", "invalid_dataset", "bad")


def test_split_is_stratified_and_reproducible():
    import numpy as np

    y = np.repeat([0, 1, 2], [10, 5, 2])
    tr, va = jobs.split(y, 0.2, seed=4)
    tr2, va2 = jobs.split(y, 0.2, seed=4)
    assert (tr == tr2).all() and (va == va2).all()
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(17))
    assert all((y[tr] == c).any() for c in range(3))
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 0]


def test_metrics_match_a_hand_count():
    import numpy as np

    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 0])
    m = jobs.classification_metrics(y, pred, ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5)


# ---------------------------------------------------------------- a worker that died whole


class _Sent:
    """Where recovery's sends land: the broker is not what these tests are about."""

    def __init__(self) -> None:
        self.finetunes: list[tuple[str, str]] = []
        self.predictions: list[str] = []

    def send_finetune(self, job_id: str, start: str) -> None:
        self.finetunes.append((job_id, start))

    def send_batch_prediction(self, prediction_id: str) -> None:
        self.predictions.append(prediction_id)


def _silence(env, job_id, seconds):
    """Backdate the job's heartbeat, as if its worker had died `seconds` ago."""
    with session_scope(env.db) as s:
        job = s.get(Finetune, job_id)
        job.heartbeat_at = job.heartbeat_at - timedelta(seconds=seconds)


def test_a_stale_delivery_of_an_earlier_stage_does_nothing(env):
    job_id = _job(env)
    jobs.begin_stage(env, job_id, jobs.Stage.fit)
    jobs.finish_stage(env, job_id, jobs.Stage.fit, "features")
    jobs.begin_stage(env, job_id, jobs.Stage.evaluate)
    with pytest.raises(jobs.NothingToDo, match="already in stage evaluate"):
        jobs.begin_stage(env, job_id, jobs.Stage.fit)
    job = _get(env, job_id)
    assert job.stage == "evaluate" and job.outputs["deliveries"] == {"fit": 1, "evaluate": 1}


def test_the_heartbeat_is_refreshed_only_while_the_stage_holds_it(env):
    env.settings.job_heartbeat_s = 0.05
    job_id = _job(env)
    with jobs.heartbeat(env, Finetune, job_id):
        time.sleep(0.2)
        assert _get(env, job_id).heartbeat_at is None  # queued: no stage holds it yet
        jobs.begin_stage(env, job_id, jobs.Stage.fit)
        first = _get(env, job_id).heartbeat_at
        time.sleep(0.3)
        assert _get(env, job_id).heartbeat_at > first
        jobs.finish_stage(env, job_id, jobs.Stage.fit, "features")
        time.sleep(0.3)  # beats after the stage finished must not revive it
        assert _get(env, job_id).heartbeat_at is None


def test_recovery_queues_again_a_stage_whose_heartbeat_stopped(env):
    env.settings.job_stale_s = 60
    sent = _Sent()
    job_id = _job(env)
    sessions = sessionmaker_for(env.db)
    jobs.begin_stage(env, job_id, jobs.Stage.fit)
    _silence(env, job_id, 30)
    assert requeue_stale(env.settings, sessions, sent) == []  # silent, but not for long enough
    _silence(env, job_id, 60)
    assert requeue_stale(env.settings, sessions, sent) == [job_id]
    assert sent.finetunes == [(job_id, contracts.TASK_FIT)]
    assert _get(env, job_id).heartbeat_at is None
    assert requeue_stale(env.settings, sessions, sent) == []  # claimed once, sent once
    # The new delivery runs the stage again and counts it.
    job, _ = jobs.begin_stage(env, job_id, jobs.Stage.fit)
    assert job.outputs["deliveries"] == {"fit": 2} and job.heartbeat_at is not None


def test_recovery_leaves_alone_a_job_waiting_between_stages(env):
    env.settings.job_stale_s = 0
    sent = _Sent()
    job_id = _job(env)
    jobs.begin_stage(env, job_id, jobs.Stage.fit)
    jobs.finish_stage(env, job_id, jobs.Stage.fit, "features")  # evaluate waits in the queue
    assert requeue_stale(env.settings, sessionmaker_for(env.db), sent) == []
    assert sent.finetunes == []


def test_recovery_queues_again_a_batch_prediction(env):
    env.settings.job_stale_s = 60
    sent = _Sent()
    _job(env)
    with session_scope(env.db) as s:
        s.add(
            Prediction(
                id="pr_1",
                project_id="prj_1",
                head_id="hd_1",
                dataset_id="ds_1",
                state="running",
                heartbeat_at=utcnow() - timedelta(seconds=61),
            )
        )
    assert requeue_stale(env.settings, sessionmaker_for(env.db), sent) == ["pr_1"]
    assert sent.predictions == ["pr_1"]
