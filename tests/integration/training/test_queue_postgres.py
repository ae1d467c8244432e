"""The training job queue on the real PostgreSQL: FOR UPDATE SKIP LOCKED claims, reclaim."""

from __future__ import annotations

import random
import threading
import time

import msgspec
import pytest

from carrara.errors import FailedPreconditionError
from carrara.training import upgrade
from carrara.training.queue import JobQueue
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec, Resources

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
    assert upgrade(postgres_url) == [
        "0001_training_jobs",
        "0002_training_job_logs",
        "0003_gpu_leases_and_triggers",
        "0004_shared_gpus_and_multi_node",
    ]
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


def gpu_spec(name: str, gpus: int) -> JobSpec:
    return JobSpec(
        model_name=name,
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(framework="pytorch", estimator="mlp"),
        resources=Resources(gpus=gpus),
    )


def test_concurrent_gang_claims_never_over_allocate(postgres_url: str) -> None:
    """Many claimers on two nodes at once: per node the GPUs in use never exceed its
    inventory, no GPU is held by two jobs, and every job runs exactly once."""
    rng = random.Random(3)
    nodes = {"a": [0, 1, 2], "b": [0, 1, 2, 3]}
    with JobQueue.open(postgres_url, gpus_per_node=4, backfill_window_s=0.2) as q:
        ids = {q.submit(gpu_spec(f"m{i}", rng.choice([0, 1, 2, 3, 4]))).job_id for i in range(40)}
        in_use: dict[str, set[int]] = {n: set() for n in nodes}
        ran: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(8)

        def claimer(n: int) -> None:
            node = "a" if n % 2 else "b"
            start.wait()
            idle = 0
            while idle < 40:
                job = q.claim(f"w{n}", node=node, gpus=nodes[node])
                if job is None:
                    idle += 1
                    time.sleep(0.01)
                    continue
                idle = 0
                with lock:
                    if len(job.gpus) != job.gpus_requested or in_use[node] & set(job.gpus):
                        errors.append(f"{job.job_id} got {job.gpus}; in use {in_use[node]}")
                    in_use[node] |= set(job.gpus)
                    ran.append(job.job_id)
                time.sleep(0.003)
                with lock:
                    in_use[node] -= set(job.gpus)
                q.complete(job)

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(ran) == sorted(ids)
        assert q.leases() == {}


def test_logs_on_postgres_are_gapless_under_concurrent_writers(postgres_url: str) -> None:
    with JobQueue.open(postgres_url) as q:
        job = q.submit(make_spec("logs"))

        def write(n: int) -> None:
            for i in range(10):
                q.log(job.job_id, f"t{n} {i}")

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [ln.seq for ln in q.logs(job.job_id)] == list(range(1, 41))
        assert [ln.seq for ln in q.logs(job.job_id, after=38)] == [39, 40]


def test_concurrent_multi_node_and_shared_gpu_claims(postgres_url: str) -> None:
    """Workers on 3 nodes claim a mix of 2-node gangs, whole-GPU, fractional and CPU jobs at
    once: a gang's ranks are on distinct nodes and all run together, no device ever holds more
    than 1.0, a whole GPU is never shared, and every job runs exactly once."""
    rng = random.Random(5)
    nodes = {"a": [0, 1], "b": [0, 1], "c": [0, 1]}
    with JobQueue.open(
        postgres_url, gpus_per_node=2, backfill_window_s=0.3, worker_presence_s=5
    ) as q:
        kinds = [rng.choice(["gang", "whole", "share", "cpu"]) for _ in range(30)]
        res = {
            "gang": Resources(gpus=1, nodes=2),
            "whole": Resources(gpus=2),
            "share": Resources(gpus=0.4),
            "cpu": Resources(),
        }
        ids = {
            q.submit(msgspec.structs.replace(gpu_spec(f"m{i}", 0), resources=res[k])).job_id
            for i, k in enumerate(kinds)
        }
        ran: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(6)

        def check_devices() -> None:
            per: dict[tuple[str, str], list[int]] = {}
            for node, device, _, share in q.device_leases():
                per.setdefault((node, device), []).append(share)
            for key, shares in per.items():
                if sum(shares) > 1000 or (1000 in shares and len(shares) > 1):
                    errors.append(f"{key} holds {shares}")

        def worker(n: int) -> None:
            node = "abc"[n % 3]
            start.wait()
            idle = 0
            while idle < 60:
                job = q.claim(f"w{n}", node=node, gpus=nodes[node])
                if job is None:
                    idle += 1
                    time.sleep(0.01)
                    continue
                idle = 0
                check_devices()
                if job.node_rank > 0:
                    time.sleep(0.005)
                    q.rank_done(job)
                    continue
                if job.nodes > 1:
                    ranks = q.ranks(job.job_id)
                    if len({r.node for r in ranks}) != 2:
                        errors.append(f"gang {job.job_id} on {[r.node for r in ranks]}")
                    deadline = time.monotonic() + 5
                    while any(r.state == "ASSIGNED" for r in q.ranks(job.job_id)):
                        if time.monotonic() > deadline:
                            errors.append(f"gang {job.job_id}: a rank never joined")
                            break
                        time.sleep(0.005)
                with lock:
                    ran.append(job.job_id)
                time.sleep(0.003)
                q.complete(job)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(ran) == sorted(ids)
        assert q.device_leases() == []
