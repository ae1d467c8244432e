"""Preemption (spot) handback: a worker told to stop (a notice file or URL, SIGTERM) checkpoints
at the next training step and hands the job back; the job resumes elsewhere and ends with the
weights an uninterrupted run of the same seed gets (bit-identical in one process)."""

from __future__ import annotations

import http.server
import io
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from carrara.errors import CancelledError
from carrara.feature_cache import FeatureService
from carrara.registry.registry import ModelRegistry
from carrara.training.checkpoints import CheckpointStore, checkpoint_root
from carrara.training.frameworks import Checkpoint, LocalContext, Preempted, TrainData
from carrara.training.frameworks import torch_trainer as tt
from carrara.training.queue import Job, JobQueue
from carrara.training.spec import JobSpec
from carrara.training.worker import Worker, WorkerContext, preemption_notice, run_job
from tests.training_data import mlp_job, worker_env

DAY_US = 86_400_000_000
T0_US = 1_780_000_000_000_000
N = 600  # 480 training rows: 120 steps of 4 rows per epoch
EPOCHS = 10
PARAMS: dict[str, Any] = {"epochs": EPOCHS, "batch_size": 4, "hidden": [8], "lr": 0.01}
LINE = re.compile(
    r"^preemption notice: (?P<notice>.+); checkpointed at epoch (?P<epoch>\d+) step "
    r"(?P<step>\d+); handed back in (?P<ms>\d+) ms$"
)


# -- fit level: mid-epoch checkpoints resume to the same weights ---------------------------------


def _data(n: int = 200, seed: int = 3) -> TrainData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] + rng.normal(size=n) * 0.3 > 0).astype(np.int64)
    cut = int(n * 0.8)
    return TrainData(
        x_train=x[:cut], y_train=y[:cut], x_val=x[cut:], y_val=y[cut:],
        feature_names=["a", "b", "c"], task="classification", classes=[0, 1],
    )  # fmt: skip


class PreemptAfter(LocalContext):
    """Preempted once ``steps`` training steps of this attempt are done (the loop polls
    ``preempting`` once per step)."""

    def __init__(self, steps: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.steps = steps
        self.polls = 0

    def preempting(self) -> bool:
        self.polls += 1
        return self.polls >= self.steps


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max abs diff {(a[k] - b[k]).abs().max()}"


FIT = {"epochs": 4, "batch_size": 8, "hidden": [8], "lr": 0.01}  # 20 steps per epoch


@pytest.mark.parametrize(
    "preempt_at",
    [[1], [7], [20], [27, 13], [41, 1, 1]],
    ids=["first-step", "mid-epoch", "last-step-of-epoch", "twice", "three-times"],
)
def test_mid_epoch_resume_equals_an_uninterrupted_fit(preempt_at: list[int]) -> None:
    data = _data()
    straight = LocalContext(seed=5)
    reference = tt.TRAINER.fit("mlp", FIT, data, straight)
    checkpoints: list[Checkpoint] = []
    done_steps = 0
    for steps in preempt_at:
        ctx = PreemptAfter(steps, seed=5)
        ctx.checkpoints = list(checkpoints)
        with pytest.raises(Preempted) as info:
            tt.TRAINER.fit("mlp", FIT, data, ctx)
        done_steps += steps
        last = ctx.checkpoints[-1]
        assert 1 <= last.step <= 20  # mid-epoch: steps into epoch last.epoch + 1
        assert (last.epoch + 1) * 20 + last.step == done_steps  # nothing lost, nothing extra
        assert (info.value.epoch, info.value.step) == (last.epoch, last.step)
        assert isinstance(info.value, CancelledError)  # preemption is a kind of stop
        checkpoints = ctx.checkpoints
    resumed = LocalContext(seed=5)
    resumed.checkpoints = checkpoints
    result = tt.TRAINER.fit("mlp", FIT, data, resumed)
    _assert_same(_weights(result.model), _weights(reference.model))
    # the resumed epoch is reported once, with the whole epoch's training loss
    assert [e for e, _ in straight.reports][-len(resumed.reports) :] == [
        e for e, _ in resumed.reports
    ]
    assert resumed.reports[0][1]["loss"] == pytest.approx(
        straight.reports[resumed.reports[0][0]][1]["loss"], rel=1e-12
    )
    assert result.epochs_run == 4


def test_preempting_context_flag_is_cheap_and_separate_from_cancel() -> None:
    ctx = WorkerContext()
    assert not ctx.preempting() and not ctx.should_stop()
    event = threading.Event()
    ctx = WorkerContext(preempting=event)
    event.set()
    assert ctx.preempting() and not ctx.should_stop()


# -- the checkpoint store -----------------------------------------------------------------------


def test_store_orders_mid_epoch_checkpoints_and_prunes_them(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job1", keep=2)
    store.save(0, b"e0")
    store.save(0, b"e1s5", step=5)  # 5 steps into epoch 1
    assert store.positions() == [(0, 0), (0, 5)]
    assert store.epochs() == [0]
    latest = store.latest()
    assert latest is not None and (latest.epoch, latest.step, latest.state) == (0, 5, b"e1s5")
    assert Path(latest.path).name == "epoch-000001-step-000000005.ckpt"
    store.save(-1, b"first", step=3)  # mid-epoch 0 sorts before everything else
    assert store.positions() == [(0, 0), (0, 5)]  # ... and is pruned at once (keep=2)
    store.save(1, b"e1")
    assert store.positions() == [(0, 5), (1, 0)]
    latest = store.latest()
    assert latest is not None and (latest.epoch, latest.step) == (1, 0)
    # a torn mid-epoch file is skipped
    store.save(1, b"e2s9", step=9)
    Path(store.path(1, 9)).write_bytes(b"CRCKPT1\ntorn")
    latest = store.latest()
    assert latest is not None and (latest.epoch, latest.step) == (1, 0)


# -- other frameworks: per boosting round -------------------------------------------------------


def test_xgboost_hands_back_after_a_round_and_resumes_to_the_same_booster() -> None:
    from carrara.training.frameworks.xgboost_trainer import TRAINER as XGB

    data = _data(300)
    params = {"n_estimators": 8, "max_depth": 3}
    reference = XGB.fit("gradient_boosting", params, data, LocalContext(seed=2))

    class PreemptAfterRounds(LocalContext):
        def preempting(self) -> bool:
            return len(self.reports) >= 3

    ctx = PreemptAfterRounds(seed=2)
    with pytest.raises(Preempted, match="after round 2") as info:
        XGB.fit("gradient_boosting", params, data, ctx)
    assert info.value.epoch == 2 and ctx.checkpoints[-1].epoch == 2
    resumed = LocalContext(seed=2)
    resumed.checkpoints = ctx.checkpoints
    result = XGB.fit("gradient_boosting", params, data, resumed)
    assert [e for e, _ in resumed.reports] == [3, 4, 5, 6, 7]
    assert result.native == reference.native


# -- notice sources ------------------------------------------------------------------------------


class _Metadata(http.server.BaseHTTPRequestHandler):
    """A cloud metadata endpoint: 404 (AWS: no notice) until ``answer`` is set."""

    answer: tuple[int, bytes] = (404, b"")
    headers_seen: list[str] = []  # noqa: RUF012 - test double

    def do_GET(self) -> None:
        type(self).headers_seen.append(self.headers.get("Metadata-Flavor", ""))
        status, body = type(self).answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def metadata() -> Iterator[tuple[str, type[_Metadata]]]:
    handler = type("Metadata", (_Metadata,), {"answer": (404, b""), "headers_seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/spot/instance-action", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_notice_sources(tmp_path: Path, metadata: tuple[str, type[_Metadata]]) -> None:
    url, handler = metadata
    assert preemption_notice(url) is None  # AWS: 404 until a notice
    handler.answer = (200, b"FALSE")  # GCP: no preemption yet
    assert preemption_notice(url) is None
    handler.answer = (200, b"TRUE")
    assert preemption_notice(url) == f"{url} answered TRUE"
    handler.answer = (200, b'{"action": "terminate", "time": "2026-12-07T12:00:00Z"}')
    found = preemption_notice(url)
    assert found is not None and '"action": "terminate"' in found
    assert set(handler.headers_seen) == {"Google"}
    assert preemption_notice("http://127.0.0.1:9/nothing-listens", timeout_s=0.5) is None
    notice = tmp_path / "notice"
    assert preemption_notice(str(notice)) is None
    notice.write_text("")
    assert preemption_notice(str(notice)) == f"notice file {notice} exists"
    assert preemption_notice(f"file://{notice}") == f"notice file {notice} exists"


# -- jobs: a worker hands the job back, another one finishes it ----------------------------------


def _setup(features: FeatureService, tmp_path: Path) -> JobSpec:
    return mlp_job(features, tmp_path, model_name="preemptible", n=N, params=PARAMS)


def _native_weights(registry: ModelRegistry, name: str, version: int) -> dict[str, torch.Tensor]:
    blob = torch.load(
        io.BytesIO(registry.load_artifact(name, version, "native")), weights_only=True
    )
    return dict(blob["state_dict"])


def _wait(what: str, until: Any, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"{what} did not happen in {timeout_s} s:\n{tail}")
        time.sleep(0.01)


def _finish_and_compare(
    queue: JobQueue,
    features: FeatureService,
    registry: ModelRegistry,
    spec: JobSpec,
    job: Job,
    handed_back_at: tuple[int, int],
) -> None:
    """A second worker resumes the handed-back job; the registered model equals an
    uninterrupted run's, bit for bit."""
    worker = Worker(queue, features=features, registry=registry, heartbeat_interval_s=0.3)
    (done,) = worker.run(until_idle=True)
    assert done.job_id == job.job_id and done.state == "SUCCEEDED", done.error
    assert done.attempts == 2
    r = done.result
    epoch, step = handed_back_at
    assert r["resumed_from_epoch"] == epoch and r["epochs_run"] == EPOCHS
    assert r["epochs_this_attempt"] == EPOCHS - (epoch + 1)  # the resumed epoch counts once
    versions = registry.list_versions(spec.model_name)
    assert [v.run_id for v in versions] == [job.job_id]  # registered once
    lines = [x.message for x in queue.logs(job.job_id)]
    assert (
        f"resuming from the checkpoint at epoch {epoch + 2} step {step} "
        "(taken when the previous worker was preempted)"
    ) in lines
    straight = run_job(
        msgspec.structs.replace(spec, model_name="uninterrupted"),
        features=features,
        registry=registry,
    )
    _assert_same(
        _native_weights(registry, spec.model_name, versions[0].version),
        _native_weights(registry, "uninterrupted", straight["version"]),
    )


def _stores(tmp_path: Path, url: str) -> tuple[FeatureService, ModelRegistry, JobQueue]:
    features = FeatureService.open(catalog_url=url, offline_path=str(tmp_path / "offline"))
    registry = ModelRegistry.open(url, tmp_path / "artifacts")
    return features, registry, JobQueue.open(url)  # the 60 s lease: a handback must not wait


def _handed_back(queue: JobQueue, job: Job, store: CheckpointStore) -> tuple[int, int, str]:
    """Checks on a handed-back job; returns its checkpoint position and the handback line."""
    back = queue.get(job.job_id)
    assert back.state == "QUEUED" and back.attempts == 1 and back.worker is None
    assert back.error.startswith("preempted (")
    latest = store.latest()
    assert latest is not None and latest.step > 0  # a mid-epoch checkpoint
    assert 0 <= latest.epoch < EPOCHS - 1
    lines = [x.message for x in queue.logs(job.job_id)]
    assert "worker shutting down; job requeued to resume from its checkpoint" in lines
    (line,) = [x for x in lines if x.startswith("preemption notice: ")]
    m = LINE.match(line)
    assert m is not None, line
    assert (int(m["epoch"]), int(m["step"])) == (latest.epoch + 2, latest.step)
    return latest.epoch, latest.step, line


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def test_notice_file_hands_the_job_back_mid_epoch(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    features, registry, queue = _stores(tmp_path, url)
    notice = tmp_path / "spot-notice"
    proc: subprocess.Popen[bytes] | None = None
    try:
        spec = _setup(features, tmp_path)
        job = queue.submit(spec, submitted_by="ci")
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "carrara", "train", "worker", "--poll", "0.2",
                 "--preemption-notice", str(notice), "--preemption-poll-s", "0.05"],
                env=worker_env(tmp_path, url), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            store = CheckpointStore(checkpoint_root(registry), job.job_id)
            _wait("a checkpoint of epoch 0", lambda: bool(store.epochs()), 120, proc, log)
            notice.write_text("spot instance-action: terminate")
            t0 = time.monotonic()
            _wait("the handback", lambda: queue.get(job.job_id).state == "QUEUED", 10, proc, log)
            handback_s = time.monotonic() - t0
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]  # the worker exits
        assert handback_s < 5.0
        epoch, step, line = _handed_back(queue, job, store)
        assert f"notice file {notice} exists" in line
        _finish_and_compare(queue, features, registry, spec, job, (epoch, step))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.close()
        registry.close()
        features.close()


def test_sigterm_hands_the_job_back_at_the_next_step(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    features, registry, queue = _stores(tmp_path, url)
    proc: subprocess.Popen[bytes] | None = None
    try:
        spec = _setup(features, tmp_path)
        job = queue.submit(spec, submitted_by="ci")
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "carrara", "train", "worker", "--poll", "0.2"],
                env=worker_env(tmp_path, url), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            store = CheckpointStore(checkpoint_root(registry), job.job_id)
            _wait("a checkpoint of epoch 0", lambda: bool(store.epochs()), 120, proc, log)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            _wait("the handback", lambda: queue.get(job.job_id).state == "QUEUED", 10, proc, log)
            handback_s = time.monotonic() - t0
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert handback_s < 5.0
        epoch, step, line = _handed_back(queue, job, store)
        assert line.startswith("preemption notice: SIGTERM;")
        _finish_and_compare(queue, features, registry, spec, job, (epoch, step))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.close()
        registry.close()
        features.close()


def test_url_notice_hands_the_job_back(
    tmp_path: Path, metadata: tuple[str, type[_Metadata]]
) -> None:
    """An in-process worker polling a metadata URL (404 until the notice, as AWS answers)."""
    notice_url, handler = metadata
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    features, registry, queue = _stores(tmp_path, url)
    try:
        spec = _setup(features, tmp_path)
        job = queue.submit(spec, submitted_by="ci")
        worker = Worker(
            queue, features=features, registry=registry, heartbeat_interval_s=0.3,
            preemption_notice=notice_url, preemption_poll_s=0.05,
        )  # fmt: skip
        store = CheckpointStore(checkpoint_root(registry), job.job_id)
        ran: list[list[Job]] = []
        thread = threading.Thread(target=lambda: ran.append(worker.run(poll_interval_s=0.2)))
        thread.start()
        try:
            _wait("a checkpoint of epoch 0", lambda: bool(store.epochs()), 120)
            handler.answer = (200, b'{"action": "stop"}')
            thread.join(timeout=30)
        finally:
            worker.preempt("test over")  # never leave the thread running
            thread.join()
        assert ran and [j.state for j in ran[0]] == ["QUEUED"]
        (handback,) = worker.handbacks
        assert handback.job_id == job.job_id and handback.notice.startswith(notice_url)
        assert handback.ms < 5000
        epoch, step, _ = _handed_back(queue, job, store)
        assert (handback.epoch, handback.step) == (epoch, step)
        _finish_and_compare(queue, features, registry, spec, job, (epoch, step))
    finally:
        queue.close()
        registry.close()
        features.close()


# -- torchrun ranks ------------------------------------------------------------------------------


class _PreemptAfterEpoch(LocalContext):
    """The launcher's context: preempted once epoch 0 has been reported."""

    def preempting(self) -> bool:
        return len(self.reports) >= 1


@pytest.mark.timeout(300)  # three torchrun launches on a small box
def test_torchrun_ranks_stop_after_the_same_step_and_resume() -> None:
    data = _data(240)
    params = {"epochs": 2, "batch_size": 4, "hidden": [8], "lr": 0.01}  # 48 steps per epoch
    straight = tt.fit_distributed("mlp", params, data, LocalContext(seed=7), nproc_per_node=2)
    ctx = _PreemptAfterEpoch(seed=7)
    with pytest.raises(Preempted) as info:
        tt.fit_distributed("mlp", params, data, ctx, nproc_per_node=2)
    last = ctx.checkpoints[-1]
    assert last.step > 0 and last.epoch >= 0  # mid-epoch, after epoch 0's checkpoint
    assert (info.value.epoch, info.value.step) == (last.epoch, last.step)
    resumed = LocalContext(seed=7)
    resumed.checkpoints = list(ctx.checkpoints)
    result = tt.fit_distributed("mlp", params, data, resumed, nproc_per_node=2)
    assert result.epochs_run == 2 and result.extra["world_size"] == 2
    a, b = _weights(result.model), _weights(straight.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
