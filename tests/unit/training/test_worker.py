"""The worker loop: cancellation of a running job, failures, heartbeats, label loading."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from carrara.errors import InvalidArgumentError, PermissionDeniedError
from carrara.training import worker as worker_module
from carrara.training.queue import Job, JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec
from carrara.training.worker import JobCancelledError, Worker, load_labels


def make_spec(label_source: str = "l.parquet", **dataset: Any) -> JobSpec:
    return JobSpec(
        model_name="m",
        dataset=DatasetSpec(
            features=["g:a"],
            label_source=label_source,
            label_column="y",
            entity_column="id",
            **dataset,
        ),
        model=ModelSpec(estimator="logistic_regression"),
    )


def test_running_job_is_cancelled_at_the_next_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        job = q.submit(make_spec())

        def fake_run_job(j: Job, *, should_stop: Any, **_: Any) -> dict[str, Any]:
            assert not should_stop()
            q.cancel(j.job_id)  # someone runs `carrara train cancel` meanwhile
            if should_stop():
                raise JobCancelledError("stopped")
            return {}

        monkeypatch.setattr(worker_module, "run_job", fake_run_job)
        w = Worker(q, features=None, registry=None)  # type: ignore[arg-type]
        (done,) = w.run(until_idle=True)
        assert done.job_id == job.job_id and done.state == "CANCELLED"


def test_heartbeats_while_running_and_failure_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        job = q.submit(make_spec())
        beats: list[int | None] = []

        def slow_failing(j: Job, **_: Any) -> dict[str, Any]:
            for _beat in range(3):
                time.sleep(0.05)
                beats.append(q.get(j.job_id).heartbeat_at_us)
            raise ValueError("diverged")

        monkeypatch.setattr(worker_module, "run_job", slow_failing)
        w = Worker(q, features=None, registry=None, heartbeat_interval_s=0.02)  # type: ignore[arg-type]
        assert w.run_once() is not None
        assert len(set(beats)) > 1  # the side thread extended the lease
        done = q.get(job.job_id)
        assert done.state == "FAILED" and done.error == "ValueError: diverged"
        assert w.run_once() is None


def test_load_labels_filters_the_time_range(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "event_timestamp": pd.to_datetime(
                ["2026-01-01", "2026-01-15", "2026-02-01", "2026-01-20"], utc=True
            ),
            "y": [0, 1, 0, None],
            "extra": [1, 2, 3, 4],
        }
    )
    frame.to_parquet(tmp_path / "l.parquet")
    spec = make_spec(
        str(tmp_path / "l.parquet"),
        start=datetime(2026, 1, 10, tzinfo=UTC),
        end=datetime(2026, 2, 1, tzinfo=UTC),
    )
    got = load_labels(spec)
    assert list(got.columns) == ["id", "event_timestamp", "y"]
    assert got["id"].tolist() == ["b"]  # c is at the (exclusive) end, d has no label
    frame.drop(columns=["y"]).to_parquet(tmp_path / "nolabel.parquet")
    with pytest.raises(InvalidArgumentError, match=r"lacks column\(s\) \['y'\]"):
        load_labels(make_spec(str(tmp_path / "nolabel.parquet")))


def test_worker_that_lost_its_lease_stops_without_touching_the_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with JobQueue.open(url, lease_timeout_s=0.05) as q, JobQueue.open(url) as other:
        job = q.submit(make_spec())
        taken: list[Job] = []

        def stalled(j: Job, *, should_stop: Any, **_: Any) -> dict[str, Any]:
            time.sleep(0.1)  # no heartbeat gets through: the lease expires
            reclaimed = q.claim("w2")
            assert reclaimed is not None
            taken.append(reclaimed)
            deadline = time.monotonic() + 5
            while not should_stop():  # the next heartbeat finds the lease gone
                assert time.monotonic() < deadline
                time.sleep(0.01)
            raise JobCancelledError("lease lost")

        monkeypatch.setattr(worker_module, "run_job", stalled)
        w = Worker(q, features=None, registry=None, heartbeat_interval_s=0.5)  # type: ignore[arg-type]
        done = w.run_once()
        assert done is not None and done.state == "RUNNING" and done.worker == "w2"
        assert other.complete(taken[0]).state == "SUCCEEDED"
        assert job.job_id == taken[0].job_id


def test_the_worker_reads_labels_only_under_its_data_roots(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame(
        {"id": ["a"], "event_timestamp": pd.to_datetime(["2026-01-01"], utc=True), "y": [1]}
    ).to_parquet(data / "l.parquet")
    assert load_labels(make_spec(str(data / "l.parquet")), data_roots=[str(data)]).shape[0] == 1
    (data / "link.parquet").symlink_to(tmp_path / "outside.parquet")
    for source in ("/etc/passwd", str(data / "link.parquet"), f"{data}/../outside.parquet"):
        with pytest.raises(PermissionDeniedError, match="outside the folders"):
            load_labels(make_spec(source), data_roots=[str(data)])
    # A job queued without the check (an older server, a direct database write) still fails
    # in the worker, before anything is read.
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        job = q.submit(make_spec("/etc/passwd"))
        w = Worker(q, features=None, registry=None, data_roots=[str(data)])  # type: ignore[arg-type]
        done = w.run_once()
        assert done is not None and done.job_id == job.job_id and done.state == "FAILED"
        assert done.error.startswith("PermissionDeniedError: label_source '/etc/passwd'")


def test_a_serving_worker_survives_a_failing_claim_and_runs_the_job_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue's database refusing a claim (busy, restarting) must not end a long-running
    worker: it backs off, claims again and runs the job; `until_idle` still raises."""
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        job = q.submit(make_spec())
        real_claim = q.claim
        refusals = [RuntimeError("database is locked"), RuntimeError("database is locked")]

        def flaky_claim(*args: Any, **kwargs: Any) -> Job | None:
            if refusals:
                raise refusals.pop(0)
            return real_claim(*args, **kwargs)

        monkeypatch.setattr(q, "claim", flaky_claim)
        monkeypatch.setattr(worker_module, "run_job", lambda j, **_: {})
        stop = threading.Event()
        w = Worker(q, features=None, registry=None)  # type: ignore[arg-type]
        finished: list[Job] = []

        def serve() -> None:
            finished.extend(w.run(poll_interval_s=0.01, stop=stop))

        t = threading.Thread(target=serve)
        t.start()
        deadline = time.monotonic() + 10
        while q.get(job.job_id).state != "SUCCEEDED" and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        t.join(timeout=10)
        assert not t.is_alive()
        assert not refusals  # both refusals were met, and the worker went on
        assert [j.job_id for j in finished] == [job.job_id]
        assert q.get(job.job_id).state == "SUCCEEDED"

        refusals.append(RuntimeError("database is locked"))
        q.submit(make_spec())
        with pytest.raises(RuntimeError, match="locked"):
            w.run(until_idle=True)
