"""Preemption handback benchmark: time from a preemption notice to the handed-back checkpoint,
and the training steps lost (redone after the resume), for the PyTorch trainer.

Run ``python -m bench.preemption [-n 10] [--torchrun-n 5] [--worker-n 6] [--json PATH]``. Each
repeat trains a small MLP (100 steps per epoch) and raises the notice at a random moment after
the first epoch:

- ``step``: the worker's preemption flag (``TrainContext.preempting``), polled every step; the
  fit writes a mid-epoch checkpoint and raises ``Preempted``;
- ``epoch``: the old wiring (the notice only reaches ``should_stop``, read at the epoch end),
  for comparison: the epoch under way runs to its end and is thrown away;
- ``torchrun``: ``fit_distributed`` with 2 gloo ranks; the launcher writes the ``preempt``
  file, the ranks agree by an all-reduce per step and rank 0's checkpoint is relayed;
- ``worker``: a whole :class:`Worker` (SQLite queue, feature store, registry in a temp folder)
  runs a queued PyTorch job in a thread and polls a notice file every 50 ms; the file is
  created at a random moment after the job's first checkpoint. Two figures: file created →
  the job reads QUEUED (the queue polled every 2 ms from another connection), and the
  worker's own ``Handback.ms`` (notice seen → ``queue.release`` committed).

Work lost = optimizer steps run in the preempted attempt minus the steps its checkpoint holds
(one process; the ranks' steps are not counted, their checkpoint is at the step they stopped
after by construction). The fit cases write to a local :class:`CheckpointStore` and do not
include the queue's ``release`` (one transaction); the worker case does.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from torch.optim.optimizer import register_optimizer_step_post_hook

from carrara.errors import CancelledError
from carrara.feature_cache import FeatureService
from carrara.registry.registry import ModelRegistry
from carrara.training.checkpoints import CheckpointStore, checkpoint_root
from carrara.training.frameworks import Preempted, TrainData
from carrara.training.frameworks import torch_trainer as tt
from carrara.training.queue import Job, JobQueue
from carrara.training.spec import JobSpec
from carrara.training.worker import Worker, WorkerContext
from tests.training_data import mlp_job

ROWS = 2000  # 1600 training rows: 100 steps of 16 per epoch
STEPS_PER_EPOCH = 100
PARAMS: dict[str, Any] = {"batch_size": 16, "hidden": [64, 64], "lr": 1e-3}


class Result(msgspec.Struct):
    name: str
    n: int
    median_ms: float
    p99_ms: float
    max_ms: float
    lost_steps_mean: float  # steps redone after the resume (-1: not counted)
    lost_steps_max: int
    steps_since_epoch_start: float  # at the notice, mean (-1: not counted)


def make_data(rows: int = ROWS, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] + rng.normal(size=rows) * 0.3 > 0).astype(np.int64)
    cut = int(rows * 0.8)
    return TrainData(
        x_train=x[:cut], y_train=y[:cut], x_val=x[cut:], y_val=y[cut:],
        feature_names=[f"f{i}" for i in range(8)], task="classification", classes=[0, 1],
    )  # fmt: skip


class _Steps:
    """Counts optimizer steps in this process (a global post-step hook)."""

    def __init__(self) -> None:
        self.count = 0
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


def _one(
    mode: str, data: TrainData, epochs: int, target: int, root: str, i: int
) -> tuple[float, int, int]:
    """One preempted fit, the notice raised from another thread once about ``target`` steps
    ran; returns (notice→handback ms, steps lost, steps since the epoch start)."""
    event = threading.Event()
    store = CheckpointStore(root, f"{mode}-{i}", keep=2)
    if mode == "step":
        ctx = WorkerContext(seed=i, store=store, preempting=event)
    else:  # the old wiring: the notice only reaches should_stop
        ctx = WorkerContext(seed=i, store=store, should_stop=event.is_set)
    steps = _Steps()
    notice: dict[str, float] = {}

    finished = threading.Event()

    def fire() -> None:  # the notice comes at no particular point of a step
        while steps.count < target and not finished.wait(0.0005):
            pass
        notice["at"] = time.perf_counter()
        notice["steps"] = steps.count
        event.set()

    timer = threading.Thread(target=fire, daemon=True)
    try:
        timer.start()
        tt.TRAINER.fit("mlp", {**PARAMS, "epochs": epochs}, data, ctx)
        raise RuntimeError(f"the {mode} fit ended before its notice (step {target})")
    except (Preempted, CancelledError):
        ended = time.perf_counter()
    finally:
        finished.set()
        timer.join()
        steps.close()
    if "at" not in notice:
        raise RuntimeError("the fit stopped without a notice")
    latest = store.latest()
    saved = 0 if latest is None else (latest.epoch + 1) * STEPS_PER_EPOCH + latest.step
    since = int(notice["steps"]) % STEPS_PER_EPOCH
    return (ended - notice["at"]) * 1e3, steps.count - saved, since


def bench_single(n: int = 10, epochs: int = 6, seed: int = 0) -> list[Result]:
    """``n`` preempted single-process fits per mode, notices at random mid-run moments."""
    data = make_data()
    tt.TRAINER.fit("mlp", {**PARAMS, "epochs": 1}, data, WorkerContext())  # warm up
    rng = random.Random(seed)
    out = []
    with tempfile.TemporaryDirectory(prefix="carrara-bench-preempt-") as root:
        for mode in ("step", "epoch"):
            last = (epochs - 1) * STEPS_PER_EPOCH
            targets = [rng.randrange(STEPS_PER_EPOCH + 1, last) for _ in range(n)]
            rows = [_one(mode, data, epochs, target, root, i) for i, target in enumerate(targets)]
            ms = np.array([r[0] for r in rows])
            lost = np.array([r[1] for r in rows])
            out.append(
                Result(
                    name=f"preemption_handback_{mode}_single_process",
                    n=n,
                    median_ms=float(np.percentile(ms, 50)),
                    p99_ms=float(np.percentile(ms, 99)),
                    max_ms=float(ms.max()),
                    lost_steps_mean=float(lost.mean()),
                    lost_steps_max=int(lost.max()),
                    steps_since_epoch_start=float(np.mean([r[2] for r in rows])),
                )
            )
    return out


class _LauncherCtx(WorkerContext):
    """Preempted ``delay_s`` after epoch 0 was reported (the ranks are up by then)."""

    def __init__(self, event: threading.Event, delay_s: float, **kw: Any) -> None:
        super().__init__(preempting=event, **kw)
        self.event, self.delay_s = event, delay_s
        self.notice_at = 0.0

    def report(self, epoch: int, metrics: Any) -> bool:
        if not self.epochs:

            def fire() -> None:
                self.notice_at = time.perf_counter()
                self.event.set()

            threading.Timer(self.delay_s, fire).start()
        return super().report(epoch, metrics)


def bench_torchrun(n: int = 5, epochs: int = 4, seed: int = 0) -> Result:
    """``n`` preempted 2-rank torchrun fits: notice → ``fit_distributed`` raised Preempted."""
    data = make_data()
    rng = random.Random(seed)
    ms = []
    with tempfile.TemporaryDirectory(prefix="carrara-bench-preempt-") as root:
        for i in range(n):
            ctx = _LauncherCtx(
                threading.Event(), rng.uniform(0.0, 0.5), seed=i,
                store=CheckpointStore(root, f"ddp-{i}", keep=2),
            )  # fmt: skip
            try:
                tt.fit_distributed("mlp", {**PARAMS, "epochs": epochs}, data, ctx, nproc_per_node=2)
                raise RuntimeError("the torchrun fit ended before its notice")
            except Preempted:
                ms.append((time.perf_counter() - ctx.notice_at) * 1e3)
            latest = ctx.store.latest() if ctx.store is not None else None
            if latest is None or latest.step == 0:
                raise RuntimeError(f"no mid-epoch checkpoint after the notice: {latest}")
    return Result(
        name="preemption_handback_step_torchrun_2_ranks",
        n=n,
        median_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(max(ms)),
        lost_steps_mean=-1.0,
        lost_steps_max=-1,
        steps_since_epoch_start=-1.0,
    )


# -- whole worker: notice file -> job QUEUED ----------------------------------------------------

WORKER_ROWS = 600  # 480 training rows (the newest 20 % validate): 120 steps of 4 rows per epoch
WORKER_STEPS_PER_EPOCH = 120
WORKER_PARAMS: dict[str, Any] = {"epochs": 40, "batch_size": 4, "hidden": [8], "lr": 0.01}
DAY_US = 86_400_000_000
T0_US = 1_780_000_000_000_000


def _worker_job(features: FeatureService, root: Path) -> JobSpec:
    return mlp_job(features, root, model_name="preemptible", n=WORKER_ROWS, params=WORKER_PARAMS)


def _wait(what: str, until: Any, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout_s} s")
        time.sleep(poll_s)


def _one_worker(
    queue: JobQueue,
    probe: JobQueue,
    features: FeatureService,
    registry: ModelRegistry,
    spec: JobSpec,
    notice: Path,
    delay_s: float,
) -> tuple[float, float, int]:
    """One job preempted by a notice file ``delay_s`` after its first checkpoint; returns
    (file created → QUEUED ms, the worker's notice seen → released ms, steps lost)."""
    job: Job = queue.submit(spec, submitted_by="bench")
    worker = Worker(
        queue, features=features, registry=registry, heartbeat_interval_s=0.5,
        preemption_notice=str(notice), preemption_poll_s=0.05,
    )  # fmt: skip
    store = CheckpointStore(checkpoint_root(registry), job.job_id)
    steps = _Steps()
    ran: list[list[Job]] = []
    thread = threading.Thread(target=lambda: ran.append(worker.run(poll_interval_s=0.2)))
    try:
        thread.start()
        _wait("the job's first checkpoint", lambda: bool(store.epochs()), 120, 0.005)
        time.sleep(delay_s)
        if probe.get(job.job_id).state != "RUNNING":
            raise RuntimeError(f"the job is {probe.get(job.job_id).state} before its notice")
        created = time.perf_counter()  # just before: the watcher may see it mid-write
        notice.write_text("spot instance-action: terminate")
        _wait("the handback", lambda: probe.get(job.job_id).state == "QUEUED", 10, 0.002)
        queued = time.perf_counter()
        thread.join(timeout=60)
    finally:
        worker.preempt("bench over")  # never leave the thread running
        thread.join()
        steps.close()
    if not ran or [j.state for j in ran[0]] != ["QUEUED"] or not worker.handbacks:
        raise RuntimeError(f"the worker did not hand the job back: {ran}")
    latest = store.latest()
    if latest is None:
        raise RuntimeError("no checkpoint after the handback")
    saved = (latest.epoch + 1) * WORKER_STEPS_PER_EPOCH + latest.step
    queue.cancel(job.job_id)  # the next repeat's worker claims its own job
    return (queued - created) * 1e3, worker.handbacks[-1].ms, steps.count - saved


def bench_worker(n: int = 6, seed: int = 0) -> list[Result]:
    """``n`` queued PyTorch jobs, each handed back by a :class:`Worker` on a notice file
    created 0-300 ms after the job's first checkpoint."""
    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="carrara-bench-preempt-worker-") as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'registry.db'}"
        features = FeatureService.open(catalog_url=url, offline_path=str(root / "offline"))
        registry = ModelRegistry.open(url, root / "artifacts")
        queue, probe = JobQueue.open(url), JobQueue.open(url)
        try:
            spec = _worker_job(features, root)
            for i in range(n):
                notice = root / f"spot-notice-{i}"
                rows.append(
                    _one_worker(
                        queue, probe, features, registry, spec, notice, rng.uniform(0.0, 0.3)
                    )
                )
        finally:
            probe.close()
            queue.close()
            registry.close()
            features.close()
    lost = np.array([r[2] for r in rows])
    out = []
    for name, ms in (
        ("preemption_handback_worker_file_to_queued", np.array([r[0] for r in rows])),
        ("preemption_handback_worker_seen_to_queued", np.array([r[1] for r in rows])),
    ):
        out.append(
            Result(
                name=name,
                n=n,
                median_ms=float(np.percentile(ms, 50)),
                p99_ms=float(np.percentile(ms, 99)),
                max_ms=float(ms.max()),
                lost_steps_mean=float(lost.mean()),
                lost_steps_max=int(lost.max()),
                steps_since_epoch_start=-1.0,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=10, help="preempted fits per single-process mode")
    parser.add_argument("--torchrun-n", type=int, default=5, help="preempted torchrun fits")
    parser.add_argument("--worker-n", type=int, default=6, help="preempted worker jobs")
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)
    results = bench_single(args.n)
    if args.torchrun_n > 0:
        results.append(bench_torchrun(args.torchrun_n))
    if args.worker_n > 0:
        results.extend(bench_worker(args.worker_n))
    head = f"{'case':48s} {'p50':>10s} {'p99':>10s} {'max':>10s} {'lost steps (mean/max)':>22s}"
    print(head)
    for r in results:
        lost = f"{r.lost_steps_mean:.1f}/{r.lost_steps_max}" if r.lost_steps_max >= 0 else "-"
        print(f"{r.name:48s} {r.median_ms:8.1f}ms {r.p99_ms:8.1f}ms {r.max_ms:8.1f}ms {lost:>22s}")
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(msgspec.json.encode(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
