"""The training job queue on SQLite: states, fencing, reclaim, events, concurrent claims."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import pytest

from carrara.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from carrara.eventlog import open_event_log
from carrara.training import upgrade
from carrara.training.queue import JobEvent, JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec
from carrara.types import Topic


def make_spec(name: str = "churn") -> JobSpec:
    return JobSpec(
        model_name=name,
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(estimator="logistic_regression"),
    )


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert upgrade(url) == [
        "0001_training_jobs",
        "0002_training_job_logs",
        "0003_gpu_leases_and_triggers",
        "0004_shared_gpus_and_multi_node",
    ]
    assert upgrade(url) == []


def test_state_machine_and_events(tmp_path: Path) -> None:
    events = open_event_log("local://")
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", events=events) as q:
        job = q.submit(make_spec(), submitted_by="ana")
        assert job.state == "QUEUED" and job.submitted_by == "ana" and job.attempts == 0
        assert job.spec() == make_spec()
        claimed = q.claim("w1")
        assert claimed is not None and claimed.job_id == job.job_id
        assert claimed.state == "RUNNING" and claimed.worker == "w1" and claimed.attempts == 1
        assert q.claim("w2") is None  # nothing else queued, lease fresh
        assert q.heartbeat(claimed) is False
        done = q.complete(claimed, {"version": 3})
        assert done.state == "SUCCEEDED" and done.result == {"version": 3}
        assert done.finished_at_us is not None
        with pytest.raises(FailedPreconditionError):
            q.fail(claimed, "late")  # terminal
        with pytest.raises(FailedPreconditionError, match="already SUCCEEDED"):
            q.cancel(job.job_id)

        failing = q.submit(make_spec("other"))
        c2 = q.claim("w1")
        assert c2 is not None and c2.job_id == failing.job_id
        assert q.fail(c2, "ValueError: boom").error == "ValueError: boom"
        assert [j.state for j in q.list()] == ["FAILED", "SUCCEEDED"]
        assert [j.job_id for j in q.list(state="FAILED")] == [failing.job_id]
        with pytest.raises(InvalidArgumentError):
            q.list(state="DONE")
        with pytest.raises(NotFoundError):
            q.get("nope")

    got = events.read(Topic.TRAINING_EVENTS, "t", "c", count=100, block_ms=0)
    states = [msgspec.json.decode(e.payload, type=JobEvent).state for e in got]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED", "QUEUED", "RUNNING", "FAILED"]


def test_submit_validates_and_queues_nothing_when_invalid(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        bad = msgspec.structs.replace(make_spec(), model_name="9 bad")
        with pytest.raises(InvalidArgumentError, match="model_name"):
            q.submit(bad)
        assert q.list() == []


def test_cancel_queued_and_running(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        queued = q.submit(make_spec())
        assert q.cancel(queued.job_id).state == "CANCELLED"
        assert q.claim("w") is None  # a cancelled job is never claimed
        running = q.submit(make_spec())
        claimed = q.claim("w")
        assert claimed is not None
        assert q.cancel(running.job_id).state == "RUNNING"  # a request, seen on heartbeat
        assert q.heartbeat(claimed) is True
        assert q.cancelled(claimed).state == "CANCELLED"


def test_stale_job_is_reclaimed_and_old_worker_is_fenced(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", lease_timeout_s=0.05) as q:
        q.submit(make_spec())
        first = q.claim("w1")
        assert first is not None
        time.sleep(0.1)  # w1 stops heartbeating
        second = q.claim("w2")
        assert second is not None and second.job_id == first.job_id
        assert second.worker == "w2" and second.attempts == 2
        with pytest.raises(FailedPreconditionError, match="no longer held"):
            q.heartbeat(first)
        with pytest.raises(FailedPreconditionError):
            q.complete(first)
        assert q.complete(second).state == "SUCCEEDED"

        doomed = q.submit(make_spec())
        held = q.claim("w3")
        assert held is not None and held.job_id == doomed.job_id
        assert q.cancel(doomed.job_id).cancel_requested
        time.sleep(0.1)  # w3 dies before it sees the cancel request
        assert q.claim("w4") is None
        assert q.get(doomed.job_id).state == "CANCELLED"


def test_concurrent_claims_each_job_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with JobQueue.open(url) as q:
        ids = {q.submit(make_spec(f"m{i}")).job_id for i in range(40)}
        claimed: list[str] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            while (job := q.claim(f"w{n}")) is not None:
                with lock:
                    claimed.append(job.job_id)
                q.complete(job)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(claimed) == sorted(ids)  # each exactly once
        assert {j.state for j in q.list(limit=100)} == {"SUCCEEDED"}


def test_job_logs_are_sequenced_per_job_and_followable(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        a = q.submit(make_spec("a"))
        b = q.submit(make_spec("b"))
        first = q.log(a.job_id, "loading data")
        assert first.seq == 1 and first.level == "INFO"
        q.log(b.job_id, "other job")
        q.log(a.job_id, "epoch 1 loss=0.5", level="debug")
        q.log(a.job_id, "boom", "ERROR")
        lines = q.logs(a.job_id)
        assert [(ln.seq, ln.level, ln.message) for ln in lines] == [
            (1, "INFO", "loading data"),
            (2, "DEBUG", "epoch 1 loss=0.5"),
            (3, "ERROR", "boom"),
        ]
        assert lines[0].ts_us <= lines[1].ts_us <= lines[2].ts_us
        assert [ln.seq for ln in q.logs(a.job_id, after=2)] == [3]
        assert q.logs(a.job_id, after=3) == []
        assert [ln.message for ln in q.logs(b.job_id)] == ["other job"]
        long = q.log(a.job_id, "x" * 20_000)
        assert len(long.message) < 17_000 and long.message.endswith("chars cut]")
        with pytest.raises(InvalidArgumentError, match="unknown log level"):
            q.log(a.job_id, "m", level="LOUD")
        with pytest.raises(NotFoundError):
            q.log("nope", "m")
        with pytest.raises(NotFoundError):
            q.logs("nope")


def test_concurrent_log_writers_get_gapless_sequence(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        job = q.submit(make_spec())

        def write(n: int) -> None:
            for i in range(10):
                q.log(job.job_id, f"t{n} line {i}")

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = q.logs(job.job_id)
        assert [ln.seq for ln in lines] == list(range(1, 41))
        for n in range(4):  # each writer's lines stay in its own order
            mine = [ln.message for ln in lines if ln.message.startswith(f"t{n} ")]
            assert mine == [f"t{n} line {i}" for i in range(10)]
