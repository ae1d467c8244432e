"""The training job queue on the real PostgreSQL: FOR UPDATE SKIP LOCKED claims, reclaim."""

from __future__ import annotations

import threading
import time

import pytest

from carrara.errors import FailedPreconditionError
from carrara.training import upgrade
from carrara.training.queue import JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec

pytestmark = pytest.mark.integration


def make_spec(name: str) -> JobSpec:
    return JobSpec(
        model_name=name,
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(estimator="logistic_regression"),
    )


def test_concurrent_claims_each_job_once(postgres_url: str) -> None:
    assert upgrade(postgres_url) == ["0001_training_jobs"]
    assert upgrade(postgres_url) == []
    with JobQueue.open(postgres_url) as q:
        ids = {q.submit(make_spec(f"m{i}")).job_id for i in range(40)}
        claimed: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(8)

        def worker(n: int) -> None:
            start.wait()
            while (job := q.claim(f"w{n}")) is not None:
                with lock:
                    claimed.append(job.job_id)
                q.complete(job)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(claimed) == len(ids) and set(claimed) == ids
        assert {j.state for j in q.list(limit=100)} == {"SUCCEEDED"}


def test_states_cancel_and_reclaim(postgres_url: str) -> None:
    with JobQueue.open(postgres_url, lease_timeout_s=0.05) as q:
        queued = q.submit(make_spec("a"))
        assert q.cancel(queued.job_id).state == "CANCELLED"
        q.submit(make_spec("b"))
        first = q.claim("w1")
        assert first is not None and first.state == "RUNNING"
        time.sleep(0.1)
        second = q.claim("w2")
        assert second is not None and second.job_id == first.job_id and second.attempts == 2
        with pytest.raises(FailedPreconditionError):
            q.complete(first)
        assert q.fail(second, "boom").state == "FAILED"
        assert [j.state for j in q.list()] == ["FAILED", "CANCELLED"]
