"""Triggers on the real PostgreSQL: two runners racing never start a second run."""

from __future__ import annotations

import threading

import pytest

from carrara.training.queue import JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec
from carrara.training.triggers import TriggerRunner, TriggerStore

pytestmark = pytest.mark.integration


def make_spec() -> JobSpec:
    return JobSpec(
        model_name="churn",
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(estimator="ridge", task="regression"),
    )


def test_two_concurrent_runners_never_double_run(postgres_url: str) -> None:
    with JobQueue.open(postgres_url) as q1, JobQueue.open(postgres_url) as q2:
        store = TriggerStore(q1)
        store.add("m", "manual", make_spec())
        runners = [TriggerRunner(q1, consumer="r1"), TriggerRunner(q2, consumer="r2")]
        stores = [TriggerStore(q1), TriggerStore(q2)]
        lock = threading.Lock()

        for _round in range(3):
            start = threading.Barrier(8)
            submitted: list[str] = []

            def race(n: int, start: threading.Barrier, submitted: list[str]) -> None:
                start.wait()
                for _ in range(5):
                    fires = [stores[n % 2].fire("m"), *runners[n % 2].poll_once()]
                    with lock:
                        submitted += [f.job_id or "" for f in fires if f.outcome == "submitted"]

            threads = [threading.Thread(target=race, args=(n, start, submitted)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # 40 fires and 40 polls raced: exactly one run started this round (the first
            # round's, or the follow-up owed by the round before) and nothing else.
            assert len(submitted) == 1
            active = [j for j in q1.list(trigger="m") if j.state in ("QUEUED", "RUNNING")]
            assert [j.job_id for j in active] == submitted
            job = q1.claim("w")
            assert job is not None and job.job_id == submitted[0]
            q1.complete(job)
        assert len(q1.list(trigger="m")) == 3
        assert store.get("m").pending  # round 3's later fires owe one follow-up
        (follow,) = runners[1].poll_once()
        assert follow.outcome == "submitted"
        assert runners[0].poll_once() == []
        assert len(q1.list(trigger="m")) == 4
