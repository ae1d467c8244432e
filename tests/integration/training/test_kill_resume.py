"""A worker process SIGKILLed mid-job: the next worker reclaims the job after the lease, resumes
from the latest checkpoint, trains exactly the remaining epochs and registers exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carrara.feature_cache import FeatureService
from carrara.registry.registry import ModelRegistry
from carrara.training.checkpoints import CheckpointStore, checkpoint_root
from carrara.training.queue import JobQueue
from carrara.training.spec import JobSpec
from carrara.training.worker import Worker, run_job
from tests.proc import alive, cmdline, descendants, status
from tests.training_data import mlp_job, worker_env

DAY_US = 86_400_000_000
T0_US = 1_780_000_000_000_000
N = 300
EPOCHS = 60


def _setup(features: FeatureService, tmp_path: Path) -> JobSpec:
    # Many small epochs (each writes a checkpoint) so the kill lands mid-run.
    params = {"epochs": EPOCHS, "batch_size": 16, "hidden": [8], "lr": 0.01}
    return mlp_job(features, tmp_path, model_name="resumable", n=N, params=params)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def test_sigkilled_worker_is_resumed_from_its_checkpoint(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    offline, artifacts = tmp_path / "offline", tmp_path / "artifacts"
    features = FeatureService.open(catalog_url=url, offline_path=str(offline))
    registry = ModelRegistry.open(url, artifacts)
    queue = JobQueue.open(url, lease_timeout_s=1.0)
    proc: subprocess.Popen[bytes] | None = None
    try:
        spec = _setup(features, tmp_path)
        job = queue.submit(spec, submitted_by="ci")
        env = worker_env(tmp_path, url)
        log_file = open(tmp_path / "worker1.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "carrara", "train", "worker", "--until-idle"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        store = CheckpointStore(checkpoint_root(registry), job.job_id)
        deadline = time.monotonic() + 90
        while not any(e >= 2 for e in store.epochs()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log_file.close()
                pytest.fail(
                    f"worker exited ({proc.returncode}) or no checkpoint >= 2 in time:\n"
                    + (tmp_path / "worker1.log").read_text()[-3000:]
                )
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log_file.close()
        assert proc.returncode == -signal.SIGKILL
        killed = queue.get(job.job_id)
        assert killed.state == "RUNNING" and killed.attempts == 1  # a stale lease, no more
        latest = store.latest()
        assert latest is not None and 2 <= latest.epoch < EPOCHS - 1
        assert registry.list_models() == []

        time.sleep(1.2)  # past lease_timeout_s: the job may be reclaimed
        worker = Worker(queue, features=features, registry=registry, heartbeat_interval_s=0.3)
        (done,) = worker.run(until_idle=True)
        assert done.job_id == job.job_id
        assert done.state == "SUCCEEDED", done.error
        assert done.attempts == 2
        r = done.result
        resumed = r["resumed_from_epoch"]
        assert resumed >= latest.epoch >= 2  # a checkpoint written after our look counts too
        assert r["epochs_run"] == EPOCHS
        assert r["epochs_this_attempt"] == EPOCHS - (resumed + 1)  # none skipped or repeated
        versions = registry.list_versions("resumable")
        assert [v.run_id for v in versions] == [job.job_id]
        assert versions[0].tags["training.resumed_from_epoch"] == str(resumed)
        assert versions[0].tags["training.attempt"] == "2"
        assert store.epochs() == [] and not Path(store.job_dir).exists()
        lines = [x.message for x in queue.logs(job.job_id)]
        assert f"resuming from the checkpoint of epoch {resumed + 1}" in lines
        assert lines[-1] == "registered resumable v1"

        # The resumed model equals an uninterrupted run of the same spec (same seed).
        straight = run_job(spec, features=features, registry=registry)
        assert straight["resumed_from_epoch"] == -1
        assert straight["metrics"]["log_loss"] == pytest.approx(r["metrics"]["log_loss"], rel=1e-6)
        assert straight["metrics"]["auc"] == pytest.approx(r["metrics"]["auc"], abs=1e-9)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.close()
        registry.close()
        features.close()


def test_sigterm_hands_the_running_job_back_to_the_queue(tmp_path: Path) -> None:
    """A worker told to stop (SIGTERM) requeues its job at once (no lease wait), keeps the
    checkpoints, and exits 0; the next worker resumes and registers once."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    offline, artifacts = tmp_path / "offline", tmp_path / "artifacts"
    features = FeatureService.open(catalog_url=url, offline_path=str(offline))
    registry = ModelRegistry.open(url, artifacts)
    queue = JobQueue.open(url)  # the default 60 s lease: a requeue must not wait for it
    proc: subprocess.Popen[bytes] | None = None
    try:
        spec = _setup(features, tmp_path)
        job = queue.submit(spec, submitted_by="ci")
        env = worker_env(tmp_path, url)
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "carrara", "train", "worker", "--poll", "0.2"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            store = CheckpointStore(checkpoint_root(registry), job.job_id)
            deadline = time.monotonic() + 90
            while not any(e >= 2 for e in store.epochs()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint >= 2 in time:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        back = queue.get(job.job_id)
        assert back.state == "QUEUED" and back.attempts == 1 and back.worker is None
        latest = store.latest()
        assert latest is not None and latest.epoch >= 2
        lines = [x.message for x in queue.logs(job.job_id)]
        assert "worker shutting down; job requeued to resume from its checkpoint" in lines

        worker = Worker(queue, features=features, registry=registry, heartbeat_interval_s=0.3)
        (done,) = worker.run(until_idle=True)
        assert done.state == "SUCCEEDED", done.error
        assert done.attempts == 2
        assert done.result["resumed_from_epoch"] >= latest.epoch
        assert done.result["epochs_run"] == EPOCHS
        assert [v.run_id for v in registry.list_versions("resumable")] == [job.job_id]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.close()
        registry.close()
        features.close()


def _training(pids: set[int]) -> dict[int, str]:
    """The torchrun launchers and ranks among ``pids``, with their command lines."""
    out = {}
    for pid in pids:
        cmd = cmdline(pid)
        if "torch.distributed.run" in cmd or "carrara.training.frameworks.torch_ddp" in cmd:
            out[pid] = cmd
    return out


@pytest.mark.parametrize("victim", ["worker", "torchrun"])
def test_a_sigkilled_worker_leaves_no_torchrun_behind(tmp_path: Path, victim: str) -> None:
    """A worker killed while torchrun trains a 2-rank job: torchrun gets SIGTERM from the
    kernel as its parent dies and stops its ranks; nothing keeps training unowned. torchrun
    itself SIGKILLed (it cannot stop its ranks then): each rank sees its launcher gone and
    leaves."""
    from carrara.training.spec import Resources

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    features = FeatureService.open(catalog_url=url, offline_path=str(tmp_path / "offline"))
    queue = JobQueue.open(url)
    proc: subprocess.Popen[bytes] | None = None
    try:
        params = {"epochs": 500, "batch_size": 16, "hidden": [8], "lr": 0.01}
        spec = mlp_job(
            features, tmp_path, model_name="orphans", n=N, params=params,
            resources=Resources(processes_per_node=2),
        )  # fmt: skip
        queue.submit(spec, submitted_by="ci")
        with open(tmp_path / "worker.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "carrara", "train", "worker", "--until-idle"],
                env=worker_env(tmp_path, url),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        training: dict[int, str] = {}
        while len(training) < 3:  # torchrun and its two ranks
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no torchrun with 2 ranks under the worker ({proc.returncode}):\n"
                    + (tmp_path / "worker.log").read_text()[-3000:]
                )
            time.sleep(0.2)
            training = _training(descendants(proc.pid))
        time.sleep(1.0)  # the ranks are training
        training = _training(descendants(proc.pid))
        if victim == "worker":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        else:
            [launcher] = [pid for pid, cmd in training.items() if "torch.distributed.run" in cmd]
            os.kill(launcher, signal.SIGKILL)
        deadline = time.monotonic() + 45
        while any(alive(pid) for pid in training) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: training[pid] for pid in training if alive(pid)}
        states = {pid: status(pid) for pid in left}
        for pid in left:  # leave nothing running whatever the outcome
            os.kill(pid, signal.SIGKILL)
        assert left == {}, f"still running after the worker died: {left}\n{states}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.close()
        features.close()
