"""Gang GPU admission with fake inventories (no GPU needed): all-or-nothing leases, FIFO with
bounded backfill, release on every way out, submit-time rejection, concurrent claimers."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import msgspec
import pytest

from carrara.errors import InvalidArgumentError
from carrara.training.queue import JobQueue
from carrara.training.scheduler import Candidate, choose, inventory_problem, parse_gpus
from carrara.training.spec import (
    DatasetSpec,
    JobSpec,
    ModelSpec,
    Resources,
    resource_problems,
)


def gpu_spec(gpus: int, name: str = "m", framework: str = "pytorch", **res: int) -> JobSpec:
    return JobSpec(
        model_name=name,
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(framework=framework, estimator="mlp"),
        resources=Resources(gpus=gpus, **res),
    )


def test_choose_fifo_backfill_and_reservation() -> None:
    big = Candidate("big", 3, 0)
    small = Candidate("small", 1, 10)
    cpu = Candidate("cpu", 0, 20)
    # 2 of 3 GPUs leased: the 3-GPU job is blocked; within the window the 1-GPU job backfills.
    got = choose([big, small], inventory=[0, 1, 2], leased=[0, 2], now_us=1, backfill_window_s=60)
    assert got is not None and got.job_id == "small" and got.gpus == (1,)
    # Past the window the big job reserves the node: no later GPU job starts...
    late = 61_000_000
    assert (
        choose([big, small], inventory=[0, 1, 2], leased=[0, 2], now_us=late, backfill_window_s=60)
        is None
    )
    # ...but a CPU job still does (it takes no GPU the big job waits for).
    got = choose(
        [big, small, cpu], inventory=[0, 1, 2], leased=[0, 2], now_us=late, backfill_window_s=60
    )
    assert got is not None and got.job_id == "cpu" and got.gpus == ()
    # Once the GPUs drain, the big one gets all three at once.
    got = choose([big, small], inventory=[0, 1, 2], leased=[], now_us=late, backfill_window_s=60)
    assert got is not None and got.job_id == "big" and got.gpus == (0, 1, 2)
    # A job bigger than this node is skipped (another node may fit it), never reserving.
    huge = Candidate("huge", 8, 0)
    got = choose([huge, small], inventory=[0, 1], leased=[], now_us=late, backfill_window_s=0)
    assert got is not None and got.job_id == "small" and got.gpus == (0,)
    # A worker without GPUs only takes CPU jobs.
    assert choose([small], inventory=[], leased=[], now_us=0, backfill_window_s=60) is None


def test_inventory_and_resource_rules() -> None:
    assert inventory_problem(3, 3) is None
    assert "largest node has 3" in (inventory_problem(4, 3) or "")
    assert "training_gpus_per_node" in (inventory_problem(1, 0) or "")
    assert parse_gpus("0, 2,3") == (0, 2, 3) and parse_gpus("") == ()
    with pytest.raises(ValueError):
        parse_gpus("1,1")
    assert resource_problems(Resources(gpus=2, nodes=2, processes_per_node=2), "pytorch") == []
    problems = resource_problems(Resources(nodes=2, processes_per_node=2), "sklearn")
    assert len(problems) == 2 and "nodes=2" in problems[0] and "processes_per_node=2" in problems[1]
    assert "at most 1024" in resource_problems(Resources(cpus=5000), "sklearn")[0]
    assert (
        "exceeds gpus=1" in resource_problems(Resources(gpus=1, processes_per_node=2), "pytorch")[0]
    )
    assert (
        "largest node has 3"
        in resource_problems(Resources(gpus=4), "pytorch", max_gpus_per_node=3)[0]
    )


def test_two_2gpu_jobs_on_3gpu_node_one_waits_until_release(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", gpus_per_node=3) as q:
        a = q.submit(gpu_spec(2, "a"))
        b = q.submit(gpu_spec(2, "b"))
        first = q.claim("w1", node="n1", gpus=[0, 1, 2])
        assert first is not None and first.job_id == a.job_id
        assert first.gpus == [0, 1] and first.node == "n1" and first.gpus_requested == 2
        assert q.claim("w2", node="n1", gpus=[0, 1, 2]) is None  # 1 free < 2: never partial
        assert q.get(b.job_id).state == "QUEUED"
        assert q.leases("n1") == {("n1", 0): a.job_id, ("n1", 1): a.job_id}
        q.complete(first)
        assert q.leases() == {}
        second = q.claim("w2", node="n1", gpus=[0, 1, 2])
        assert second is not None and second.job_id == b.job_id and second.gpus == [0, 1]
        # Another node's GPUs are its own: same ids, no conflict.
        c = q.submit(gpu_spec(2, "c"))
        other = q.claim("w3", node="n2", gpus=[0, 1])
        assert other is not None and other.job_id == c.job_id and other.gpus == [0, 1]
        assert len(q.leases()) == 4


def test_gpu_request_beyond_every_node_is_rejected_at_submit(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", gpus_per_node=3) as q:
        with pytest.raises(
            InvalidArgumentError, match="4 GPU\\(s\\) requested but the largest node has 3"
        ):
            q.submit(gpu_spec(4))
        assert q.list() == []
        # A worker declaring a bigger node raises what is known to be possible.
        assert q.claim("w", node="big", gpus=range(8)) is None
        assert q.known_gpus_per_node() == 8
        assert q.submit(gpu_spec(4)).gpus_requested == 4
    with JobQueue.open(f"sqlite:///{tmp_path / 'fresh.db'}") as q:
        with pytest.raises(InvalidArgumentError, match="no node with GPUs is known"):
            q.submit(gpu_spec(1))
        with pytest.raises(InvalidArgumentError, match="only framework 'pytorch'"):
            q.submit(
                msgspec.structs.replace(
                    gpu_spec(0, framework="sklearn"),
                    model=ModelSpec(estimator="ridge", task="regression"),
                    resources=Resources(nodes=2),
                )
            )


def test_backfill_then_reservation_through_the_queue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with JobQueue.open(url, gpus_per_node=3, backfill_window_s=3600) as q:
        q.submit(gpu_spec(2, "r"))
        held = q.claim("w", node="n", gpus=[0, 1, 2])
        assert held is not None and held.gpus == [0, 1]
        big = q.submit(gpu_spec(3, "big"))
        small = q.submit(gpu_spec(1, "small"))
        backfilled = q.claim("w", node="n", gpus=[0, 1, 2])
        assert backfilled is not None and backfilled.job_id == small.job_id  # backfill
        assert backfilled.gpus == [2]
        q.complete(backfilled)
    # The same queue with no backfill window: the big job reserves the node.
    with JobQueue.open(url, gpus_per_node=3, backfill_window_s=0) as q:
        small2 = q.submit(gpu_spec(1, "small2"))
        cpu = q.submit(gpu_spec(0, "cpu"))
        got = q.claim("w", node="n", gpus=[0, 1, 2])
        assert got is not None and got.job_id == cpu.job_id  # CPU jobs still pass
        q.complete(got)
        assert q.claim("w", node="n", gpus=[0, 1, 2]) is None  # small2 waits behind big
        q.complete(held)
        first = q.claim("w", node="n", gpus=[0, 1, 2])
        assert first is not None and first.job_id == big.job_id and first.gpus == [0, 1, 2]
        q.fail(first, "oom")
        nxt = q.claim("w", node="n", gpus=[0, 1, 2])
        assert nxt is not None and nxt.job_id == small2.job_id


def test_leases_released_on_cancel_and_stale_requeue(tmp_path: Path) -> None:
    with JobQueue.open(
        f"sqlite:///{tmp_path / 'q.db'}", gpus_per_node=2, lease_timeout_s=0.05
    ) as q:
        job = q.submit(gpu_spec(2))
        held = q.claim("w1", node="n", gpus=[0, 1])
        assert held is not None and len(q.leases()) == 2
        q.cancel(job.job_id)
        q.cancelled(held)
        assert q.leases() == {}
        q.submit(gpu_spec(2, "again"))
        lost = q.claim("w1", node="n", gpus=[0, 1])
        assert lost is not None and len(q.leases()) == 2
        time.sleep(0.1)  # w1 dies holding both GPUs
        back = q.claim("w2", node="n", gpus=[0, 1])
        assert back is not None and back.job_id == lost.job_id and back.attempts == 2
        assert back.worker == "w2" and back.gpus == [0, 1]
        assert set(q.leases().values()) == {back.job_id}


def test_concurrent_claimers_never_over_allocate(tmp_path: Path) -> None:
    """Property: many jobs of random sizes, 6 claimer threads over 2 nodes; at every moment
    the leases held per node never exceed its inventory, and every job runs exactly once."""
    rng = random.Random(7)
    nodes = {"n1": [0, 1, 2], "n2": [0, 1, 2, 3]}
    with JobQueue.open(
        f"sqlite:///{tmp_path / 'q.db'}", gpus_per_node=4, backfill_window_s=0.2
    ) as q:
        sizes = [rng.choice([0, 1, 2, 3, 4]) for _ in range(40)]
        ids = {q.submit(gpu_spec(g, f"m{i}")).job_id for i, g in enumerate(sizes)}
        in_use: dict[str, set[int]] = {n: set() for n in nodes}
        ran: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def claimer(n: int) -> None:
            node = "n1" if n % 2 else "n2"
            idle = 0
            while idle < 30:
                job = q.claim(f"w{n}", node=node, gpus=nodes[node])
                if job is None:
                    idle += 1
                    time.sleep(0.01)
                    continue
                idle = 0
                with lock:
                    if len(job.gpus) != job.gpus_requested or in_use[node] & set(job.gpus):
                        errors.append(f"{job.job_id}: {job.gpus} overlaps {in_use[node]}")
                    in_use[node] |= set(job.gpus)
                    ran.append(job.job_id)
                time.sleep(0.002)
                with lock:
                    in_use[node] -= set(job.gpus)
                q.complete(job)

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        # 4-GPU jobs only fit n2; all others anywhere. Each job ran exactly once.
        assert sorted(ran) == sorted(ids)
        assert q.leases() == {}
