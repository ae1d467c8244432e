"""GPU admission with simulated inventories (no GPU needed): all-or-nothing leases, FIFO with
bounded backfill, release on every way out, submit-time rejection, concurrent claimers;
fractional shares and MIG instances; multi-node gangs across workers."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import msgspec
import pytest

from carrara.errors import FailedPreconditionError, InvalidArgumentError
from carrara.training.queue import JobQueue
from carrara.training.scheduler import (
    MILLI,
    Candidate,
    MigDevice,
    NodeInventory,
    choose,
    inventory_problem,
    parse_gpus,
    parse_mig,
)
from carrara.training.spec import (
    DatasetSpec,
    JobSpec,
    ModelSpec,
    Resources,
    resource_problems,
)


def gpu_spec(gpus: float, name: str = "m", framework: str = "pytorch", **res: int) -> JobSpec:
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


# -- GPU sharing: fractions and MIG instances ---------------------------------------------------


def share_spec(gpus: float = 0, name: str = "s", mig: str = "") -> JobSpec:
    return msgspec.structs.replace(gpu_spec(0, name), resources=Resources(gpus=gpus, mig=mig))


def test_fractions_pack_best_fit_and_never_pass_one_gpu() -> None:
    inv = NodeInventory((0, 1))
    quarter = Candidate("q", 0, 0, share_milli=250)
    # An empty node: the first share goes on the lowest GPU...
    got = choose([quarter], inventory=inv, leased={}, now_us=0, backfill_window_s=60)
    assert got is not None and got.gpus == (0,) and got.share_milli == 250
    # ...later ones onto the most used GPU they still fit on, so GPU 1 stays whole.
    got = choose([quarter], inventory=inv, leased={"0": 500}, now_us=0, backfill_window_s=60)
    assert got is not None and got.gpus == (0,)
    got = choose([quarter], inventory=inv, leased={"0": 800, "1": 250}, now_us=0,
                 backfill_window_s=60)  # fmt: skip
    assert got is not None and got.gpus == (1,)  # 0.8 + 0.25 > 1.0
    assert (
        choose(
            [quarter], inventory=inv, leased={"0": 800, "1": 900}, now_us=0, backfill_window_s=60
        )
        is None
    )
    # A whole-GPU job never takes a GPU that holds a share; a gang never splits.
    whole = Candidate("w", 1, 0)
    got = choose([whole], inventory=inv, leased={"0": 250}, now_us=0, backfill_window_s=60)
    assert got is not None and got.gpus == (1,) and got.share_milli == MILLI
    pair = Candidate("p", 2, 0)
    assert choose([pair], inventory=inv, leased={"0": 1}, now_us=0, backfill_window_s=60) is None


def test_mig_instances_by_profile_and_reservation_per_pool() -> None:
    inv = NodeInventory(
        (0,), (MigDevice("MIG-a", "1g.10gb"), MigDevice("MIG-b", "1g.10gb"),
               MigDevice("MIG-c", "3g.40gb"))
    )  # fmt: skip
    small = Candidate("small", 0, 0, mig_profile="1g.10gb")
    got = choose([small], inventory=inv, leased={"MIG-a": MILLI}, now_us=0, backfill_window_s=0)
    assert got is not None and got.mig_device == "MIG-b" and got.gpus == ()
    # A profile the node lacks never fits here (skipped, no reservation).
    other = Candidate("x", 0, 0, mig_profile="2g.20gb")
    got = choose([other, small], inventory=inv, leased={}, now_us=0, backfill_window_s=0)
    assert got is not None and got.job_id == "small"
    # A blocked 1g.10gb job reserves the 1g.10gb pool only: the GPU pool still admits.
    used = {"MIG-a": MILLI, "MIG-b": MILLI}
    later_mig = Candidate("later", 0, 5, mig_profile="1g.10gb")
    gpu_job = Candidate("g", 1, 6)
    got = choose([small, later_mig, gpu_job], inventory=inv, leased=used, now_us=10,
                 backfill_window_s=0)  # fmt: skip
    assert got is not None and got.job_id == "g" and got.gpus == (0,)


def test_random_inventories_never_exceed_a_device() -> None:
    """Property over simulated nodes: admitting random whole, fractional and MIG jobs until
    nothing fits never puts more than 1.0 on a device, never shares a whole GPU, and a job is
    only refused when it truly does not fit."""
    rng = random.Random(11)
    for _ in range(200):
        gpus = tuple(range(rng.randint(0, 4)))
        mig = tuple(
            MigDevice(f"MIG-{i}", rng.choice(["1g.10gb", "3g.40gb"]))
            for i in range(rng.randint(0, 3))
        )
        inv = NodeInventory(gpus, mig)
        used: dict[str, int] = {}
        whole: set[str] = set()
        for n in range(12):
            kind = rng.random()
            if kind < 0.3:
                c = Candidate(f"j{n}", rng.randint(1, 3), n)
            elif kind < 0.8:
                c = Candidate(f"j{n}", 0, n, share_milli=rng.choice([100, 250, 500, 700]))
            else:
                c = Candidate(f"j{n}", 0, n, mig_profile=rng.choice(["1g.10gb", "3g.40gb"]))
            got = choose([c], inventory=inv, leased=used, now_us=n, backfill_window_s=3600)
            if got is None:
                if c.mig_profile:
                    assert all(used.get(d.id, 0) for d in mig if d.profile == c.mig_profile)
                elif c.share_milli:
                    assert all(used.get(str(g), 0) + c.share_milli > MILLI for g in gpus)
                else:
                    assert sum(1 for g in gpus if not used.get(str(g))) < c.gpus
                continue
            keys = [got.mig_device] if got.mig_device else [str(g) for g in got.gpus]
            for k in keys:
                assert k not in whole
                share = MILLI if got.mig_device or not c.share_milli else got.share_milli
                if share == MILLI:
                    assert used.get(k, 0) == 0
                    whole.add(k)
                used[k] = used.get(k, 0) + share
                assert used[k] <= MILLI


def test_shares_and_mig_through_the_queue(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as q:
        with pytest.raises(InvalidArgumentError, match="no node with GPUs is known"):
            q.submit(share_spec(0.5))
        with pytest.raises(InvalidArgumentError, match=r"MIG profile '1g\.10gb'.*no node offers"):
            q.submit(share_spec(mig="1g.10gb"))
        mig = parse_mig("1g.10gb=MIG-a")
        assert q.claim("w0", node="n", gpus=[0], mig=mig) is None  # declares the node
        jobs = [q.submit(share_spec(0.4, f"s{i}")) for i in range(3)]
        m = q.submit(share_spec(mig="1g.10gb", name="m"))
        a = q.claim("w1", node="n", gpus=[0], mig=mig)
        b = q.claim("w2", node="n", gpus=[0], mig=mig)
        assert a is not None and b is not None and a.gpus == b.gpus == [0]
        assert a.gpu_share == b.gpu_share == 0.4
        # 0.4 + 0.4 + 0.4 > 1.0: the third share waits; the MIG job backfills past it.
        c = q.claim("w3", node="n", gpus=[0], mig=mig)
        assert c is not None and c.job_id == m.job_id and c.mig_device == "MIG-a"
        assert q.claim("w4", node="n", gpus=[0], mig=mig) is None
        assert sorted(q.device_leases()) == sorted(
            [("n", "0", a.job_id, 400), ("n", "0", b.job_id, 400), ("n", "MIG-a", m.job_id, 1000)]
        )
        q.complete(a)
        d = q.claim("w4", node="n", gpus=[0], mig=mig)
        assert d is not None and d.job_id == jobs[2].job_id
        for held in (b, c, d):
            q.complete(held)
        assert q.device_leases() == []


def test_share_and_mig_spec_rules() -> None:
    assert resource_problems(Resources(gpus=0.25), "sklearn") == []
    assert "thousandths" in resource_problems(Resources(gpus=0.0001), "pytorch")[0]
    assert "whole number" in resource_problems(Resources(gpus=1.5), "pytorch")[0]
    assert "not both" in resource_problems(Resources(gpus=1, mig="1g.10gb"), "pytorch")[0]
    assert "not a MIG profile" in resource_problems(Resources(mig="big"), "pytorch")[0]
    assert (
        "one process on one node" in (resource_problems(Resources(gpus=0.5, nodes=2), "pytorch")[0])
    )
    assert parse_mig("1g.10gb=MIG-a, 3g.40gb=MIG-b") == (
        MigDevice("MIG-a", "1g.10gb"), MigDevice("MIG-b", "3g.40gb"),
    )  # fmt: skip
    for bad in ("1g.10gb", "huge=MIG-a", "1g.10gb=a,1g.10gb=a"):
        with pytest.raises(ValueError):
            parse_mig(bad)


# -- multi-node gangs ---------------------------------------------------------------------------


def test_choose_multi_node_needs_its_gang_and_reserves_past_the_window() -> None:
    gang = Candidate("gang", 1, 0, nodes=2)
    later = Candidate("later", 1, 5)
    cpu = Candidate("cpu", 0, 6)
    # Without a callback (or when the other nodes are busy) it is skipped...
    assert choose([gang], inventory=[0], leased=[], now_us=1, backfill_window_s=60) is None
    got = choose([gang, later], inventory=[0], leased=[], now_us=1, backfill_window_s=60,
                 gang_ready=lambda c, a: False)  # fmt: skip
    assert got is not None and got.job_id == "later"
    # ...until it has waited the window: then nothing later starts here, CPU jobs included.
    late = 61_000_000
    assert choose([gang, later, cpu], inventory=[0], leased=[], now_us=late,
                  backfill_window_s=60, gang_ready=lambda c, a: False) is None  # fmt: skip
    got = choose([gang, later], inventory=[0], leased=[], now_us=late, backfill_window_s=60,
                 gang_ready=lambda c, a: True)  # fmt: skip
    assert got is not None and got.job_id == "gang" and got.gpus == (0,)


def test_multi_node_admission_is_all_or_nothing(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", worker_presence_s=60) as q:
        assert q.claim("wa", node="a", gpus=[0, 1]) is None  # idle on node a
        job = q.submit(gpu_spec(2, "gang", nodes=3))
        # Only node a is idle besides the claimer: no gang of 3, nothing leased.
        assert q.claim("wb", node="b", gpus=[0, 1]) is None
        assert q.device_leases() == [] and q.get(job.job_id).state == "QUEUED"
        # A second worker on node b is not another node.
        assert q.claim("wb2", node="b", gpus=[0, 1]) is None
        leader = q.claim("wc", node="c", gpus=[0, 1])
        assert leader is not None and leader.job_id == job.job_id and leader.node_rank == 0
        ranks = q.ranks(job.job_id)
        assert [(r.node_rank, r.node, r.state) for r in ranks] == [
            (0, "c", "RUNNING"), (1, "a", "ASSIGNED"), (2, "b", "ASSIGNED"),
        ]  # fmt: skip
        assert len({r.worker for r in ranks}) == 3
        # Every node's GPUs leased in the same transaction.
        assert {(n, d) for n, d, _, _ in q.device_leases()} == {
            (n, g) for n in "abc" for g in ("0", "1")
        }
        # The followers get their ranks on their next claim; the other idle worker gets none.
        follower = q.claim(ranks[1].worker, node="a", gpus=[0, 1])
        assert follower is not None and follower.node_rank == 1 and follower.gpus == [0, 1]
        assert follower.node == "a" and follower.rank_worker == ranks[1].worker
        other = "wb2" if ranks[2].worker == "wb" else "wb"
        assert q.claim(other, node="b", gpus=[0, 1]) is None
        assert q.heartbeat(follower) is False
        # A failed rank fails the attempt on every node; the job is queued again whole.
        back = q.fail_attempt(follower, "rank 3 exited -9")
        assert back.state == "QUEUED" and "failed on node rank 1" in back.error
        assert q.device_leases() == [] and q.ranks(job.job_id) == []
        with pytest.raises(FailedPreconditionError):
            q.heartbeat(follower)
        assert q.fail_attempt(leader, "late report").state == "QUEUED"  # fenced: no-op


def test_multi_node_rank_that_never_joins_requeues_and_attempts_are_bounded(
    tmp_path: Path,
) -> None:
    with JobQueue.open(
        f"sqlite:///{tmp_path / 'q.db'}",
        lease_timeout_s=0.2,
        max_attempts=2,
        worker_presence_s=0.25,
    ) as q:
        job = q.submit(gpu_spec(0, "cpu-gang", nodes=2))
        assert q.claim("w1", node="n1") is None
        leader = q.claim("w2", node="n2")
        assert leader is not None and leader.nodes == 2
        time.sleep(0.3)  # w1 never picks up its rank (and w2 stopped beating)
        q.claim("w3", node="n3")  # reaps: back in the queue (w1, w2 no longer present)
        assert q.get(job.job_id).state == "QUEUED"
        assert q.get(job.job_id).attempts == 1
        again = q.claim("w1", node="n1")  # w3 (just seen) is its other node now
        assert again is not None and again.attempts == 2
        assert [r.worker for r in q.ranks(job.job_id)] == ["w1", "w3"]
        # The requeue after a silent worker is no failure; two failed attempts are the cap.
        back = q.fail_attempt(again, "rank died")
        assert back.state == "QUEUED" and "attempt 2 failed" in back.error
        q.claim("w3", node="n3")
        third = q.claim("w1", node="n1")
        assert third is not None and third.attempts == 3
        final = q.fail_attempt(third, "rank died again")
        assert final.state == "FAILED" and "attempt 3 failed" in final.error


def test_a_worker_that_leaves_is_no_gang_member(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", worker_presence_s=60) as q:
        job = q.submit(gpu_spec(0, "gang", nodes=2))
        assert q.claim("w1", node="n1") is None
        q.leave("w1")  # shutting down: never counted on again
        assert q.claim("w2", node="n2") is None
        assert q.get(job.job_id).state == "QUEUED"
        # Admitted but leaving before its rank started: the job goes back to the queue.
        assert q.claim("w3", node="n3") is not None
        assert q.get(job.job_id).state == "RUNNING"
        follower = next(r for r in q.ranks(job.job_id) if r.node_rank == 1)
        q.leave(follower.worker)
        back = q.get(job.job_id)
        assert back.state == "QUEUED" and "left before its node rank started" in back.error
        assert q.device_leases() == [] and q.ranks(job.job_id) == []


def test_a_handed_back_attempt_is_not_a_failure(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", max_attempts=1) as q:
        job = q.submit(gpu_spec(0, "gang", nodes=2))
        nodes = {"w1": "n1", "w2": "n2"}
        for _ in range(4):  # preempted before starting, again and again: never FAILED
            leader = q.claim("w1", node="n1") or q.claim("w2", node="n2")
            assert leader is not None and leader.node_rank == 0
            other = "w2" if leader.worker == "w1" else "w1"
            follower = q.claim(other, node=nodes[other])
            assert follower is not None and follower.node_rank == 1
            back = q.hand_back_attempt(follower, "its node was preempted before it started")
            assert back.state == "QUEUED" and "was handed back on node rank 1" in back.error
        last = q.claim("w1", node="n1") or q.claim("w2", node="n2")
        assert last is not None and last.attempts == 5
        assert q.fail_attempt(last, "rank died").state == "FAILED"  # the first real failure
        assert q.get(job.job_id).state == "FAILED"
