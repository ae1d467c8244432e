"""Multi-node PyTorch jobs from the queue: two `carrara train worker` processes, each its own
"node", admitted together, meeting through the queue (rank 0 publishes its torchrun store and
the ranks' inputs), trained with gloo across both nodes.

The reference is one process with the same seed and global batch: the nodes split each global
batch across their ranks, so the two are the same computation up to float reduction order. A
rank killed mid-epoch fails the attempt on both nodes; the job is admitted again and resumes
from its last checkpoint, and registers once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

pytest.importorskip("torch")

from carrara.feature_cache import (
    FeatureService,
)
from carrara.registry.registry import ModelRegistry
from carrara.training.checkpoints import CheckpointStore, checkpoint_root
from carrara.training.queue import Job, JobQueue
from carrara.training.spec import (
    JobSpec,
    Resources,
)
from carrara.training.worker import run_job
from tests.proc import cmdline
from tests.training_data import mlp_job, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY_US = 86_400_000_000
T0_US = 1_780_000_000_000_000
N = 320


def _spec(features: FeatureService, tmp_path: Path, *, epochs: int) -> JobSpec:
    params = {"epochs": epochs, "batch_size": 32, "hidden": [8], "lr": 0.02}
    return mlp_job(
        features, tmp_path, model_name="two-nodes", n=N, params=params, data_seed=5, seed=7,
        resources=Resources(nodes=2),
    )  # fmt: skip


class Nodes:
    """Worker processes, one per node (n1, n2, ...), on this machine; each watches its own
    preemption notice file ``notice-<node>``."""

    def __init__(self, tmp_path: Path, url: str, nodes: tuple[str, ...] = ("n1", "n2")) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for node in nodes:
            self.add(node)

    def add(self, node: str) -> None:
        argv = [
            sys.executable, "-m", "carrara", "train", "worker", "--node", node,
            "--address", "127.0.0.1", "--poll", "0.2", "--lease-timeout", "6",
            "--preemption-notice", str(self.tmp_path / f"notice-{node}"),
            "--preemption-poll-s", "0.1",
        ]  # fmt: skip
        with open(self.tmp_path / f"{node}.log", "wb") as log:
            self.procs.append(
                subprocess.Popen(
                    argv,
                    env=worker_env(self.tmp_path, self.url),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        self.names.append(node)

    def logs(self) -> str:
        return "\n".join(
            f"--- {n} ---\n" + (self.tmp_path / f"{n}.log").read_text()[-3000:] for n in self.names
        )

    def alive(self, *nodes: str) -> bool:
        """Whether the named workers (default: all) still run."""
        return all(
            p.poll() is None
            for n, p in zip(self.names, self.procs, strict=True)
            if not nodes or n in nodes
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def stores(
    postgres_url: str, tmp_path: Path
) -> Iterator[tuple[str, FeatureService, ModelRegistry, JobQueue]]:
    features = FeatureService.open(catalog_url=postgres_url, offline_path=str(tmp_path / "offline"))
    registry = ModelRegistry.open(postgres_url, tmp_path / "artifacts")
    queue = JobQueue.open(postgres_url)
    try:
        yield postgres_url, features, registry, queue
    finally:
        queue.close()
        registry.close()
        features.close()


def _wait(
    queue: JobQueue, job_id: str, nodes: Nodes, timeout_s: float, *, alive: tuple[str, ...] = ()
) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = queue.get(job_id)
        if job.state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        if not nodes.alive(*alive) or time.monotonic() > deadline:
            pytest.fail(f"job {job.state} after {timeout_s} s:\n{nodes.logs()}")
        time.sleep(0.1)


def _rank_pids(marker: str) -> list[int]:
    """The torchrun rank processes whose command line holds ``marker`` (a work folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        text = cmdline(entry.name) if entry.name.isdigit() else ""
        if (
            "carrara.training.frameworks.torch_ddp" in text
            and marker in text
            and ("torch.distributed.run" not in text)
        ):
            pids.append(int(entry.name))
    return pids


_REFERENCE: dict[int, dict[str, float]] = {}


def _reference(
    spec: JobSpec, features: FeatureService, registry: ModelRegistry
) -> dict[str, float]:
    """The one-process run's metrics (every test's data and seed are the same: one run per
    epoch count)."""
    epochs = int(spec.model.params["epochs"])
    if epochs not in _REFERENCE:
        one = msgspec.structs.replace(spec, model_name="one-process", resources=Resources())
        _REFERENCE[epochs] = dict(run_job(one, features=features, registry=registry)["metrics"])
    return _REFERENCE[epochs]


def test_two_node_job_from_the_queue_matches_one_process(
    stores: tuple[str, FeatureService, ModelRegistry, JobQueue], tmp_path: Path
) -> None:
    url, features, registry, queue = stores
    spec = _spec(features, tmp_path, epochs=5)
    job = queue.submit(spec, submitted_by="ci")
    nodes = Nodes(tmp_path, url)
    try:
        t0 = time.monotonic()
        done = _wait(queue, job.job_id, nodes, 120)
        took = time.monotonic() - t0
    finally:
        nodes.stop()
    for line in queue.logs(job.job_id):
        print(f"{(line.ts_us - job.submitted_at_us) / 1e6:7.2f}  {line.message[:120]}")
    assert done.state == "SUCCEEDED", f"{done.error}\n{nodes.logs()}"
    assert done.attempts == 1 and done.nodes == 2
    lines = [x.message for x in queue.logs(job.job_id)]
    assert any("node rank 1/2 on n" in x and "joining rank 0 at 127.0.0.1:" in x for x in lines)
    assert any("node rank 1/2" in x and "ranks finished" in x for x in lines)
    (version,) = registry.list_versions("two-nodes")
    assert version.run_id == job.job_id
    # Both nodes' ranks trained: world size 2 across the two workers.
    assert done.result["epochs_run"] == 5
    assert queue.device_leases() == [] and queue.ranks(job.job_id) == []
    # Same global batches as one process: same model up to float reduction order.
    ref = _reference(spec, features, registry)
    for name, value in done.result["metrics"].items():
        assert value == pytest.approx(ref[name], rel=1e-4, abs=1e-5), name
    print(f"2-node job: {took:.1f} s")


def test_a_killed_rank_fails_the_attempt_and_the_job_resumes_once(
    stores: tuple[str, FeatureService, ModelRegistry, JobQueue], tmp_path: Path
) -> None:
    url, features, registry, queue = stores
    epochs = 30
    spec = _spec(features, tmp_path, epochs=epochs)
    job = queue.submit(spec, submitted_by="ci")
    store = CheckpointStore(checkpoint_root(registry), job.job_id)
    nodes = Nodes(tmp_path, url)
    try:
        deadline = time.monotonic() + 90
        while not any(e >= 3 for e in store.epochs()):
            if not nodes.alive() or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint >= 3 in time:\n{nodes.logs()}")
            time.sleep(0.02)
        # Kill the follower node's rank mid-epoch (its work folder is carrara-node-*).
        victims = _rank_pids("carrara-node-")
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        done = _wait(queue, job.job_id, nodes, 150)
    finally:
        nodes.stop()
    assert done.state == "SUCCEEDED", f"{done.error}\n{nodes.logs()}"
    assert done.attempts == 2
    lines = [x.message for x in queue.logs(job.job_id)]
    assert any("failed" in x for x in lines), lines
    r = done.result
    assert r["resumed_from_epoch"] >= 3 and r["epochs_run"] == epochs
    assert r["epochs_this_attempt"] == epochs - (r["resumed_from_epoch"] + 1)
    versions = registry.list_versions("two-nodes")
    assert [v.run_id for v in versions] == [job.job_id]  # registered once
    assert versions[0].tags["training.attempt"] == "2"
    ref = _reference(spec, features, registry)
    for name, value in r["metrics"].items():
        assert value == pytest.approx(ref[name], rel=1e-3, abs=1e-4), name


def test_a_preempted_node_hands_the_gang_job_back_and_it_resumes_elsewhere(
    stores: tuple[str, FeatureService, ModelRegistry, JobQueue], tmp_path: Path
) -> None:
    """A spot notice on the follower's node: every rank stops after the same step, rank 0
    writes a mid-epoch checkpoint, the job goes back to the queue; a new node joins the
    remaining one and the job finishes from that checkpoint, registered once."""
    url, features, registry, queue = stores
    epochs = 30
    spec = _spec(features, tmp_path, epochs=epochs)
    job = queue.submit(spec, submitted_by="ci")
    store = CheckpointStore(checkpoint_root(registry), job.job_id)
    nodes = Nodes(tmp_path, url)
    try:
        deadline = time.monotonic() + 90
        while not any(e >= 2 for e in store.epochs()):
            if not nodes.alive() or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint >= 2 in time:\n{nodes.logs()}")
            time.sleep(0.02)
        leader, follower = queue.ranks(job.job_id)
        (tmp_path / f"notice-{follower.node}").write_text("spot notice")
        deadline = time.monotonic() + 30
        while queue.get(job.job_id).state != "QUEUED":
            if time.monotonic() > deadline:
                lines = "\n".join(x.message for x in queue.logs(job.job_id))
                pytest.fail(f"not handed back in time:\n{lines}\n{nodes.logs()}")
            time.sleep(0.02)
        assert "a node was preempted" in queue.get(job.job_id).error
        latest = store.latest()
        assert latest is not None and latest.step > 0  # a mid-epoch checkpoint
        nodes.add("n3")  # the replacement node; the preempted worker leaves
        done = _wait(queue, job.job_id, nodes, 150, alive=(leader.node, "n3"))
    finally:
        nodes.stop()
    assert done.state == "SUCCEEDED", f"{done.error}\n{nodes.logs()}"
    assert done.attempts == 2
    lines = [x.message for x in queue.logs(job.job_id)]
    assert any("a node of the job was preempted" in x for x in lines), lines
    assert any(f"step {latest.step}" in x for x in lines), lines  # resumed mid-epoch
    versions = registry.list_versions("two-nodes")
    assert [v.run_id for v in versions] == [job.job_id]
    assert done.result["epochs_run"] == epochs
    ref = _reference(spec, features, registry)
    for name, value in done.result["metrics"].items():
        assert value == pytest.approx(ref[name], rel=1e-3, abs=1e-4), name
