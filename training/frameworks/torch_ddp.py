"""One torchrun rank of a data-parallel PyTorch fit (launched by
:func:`carrara.training.frameworks.torch_trainer.fit_distributed`)::

    python -m torch.distributed.run ... -m carrara.training.frameworks.torch_ddp <workdir>

The workdir holds ``job.json`` (params, config, seed, backend), ``data.npz`` and optionally
``resume.pt``. Every rank builds the same seeded model, wraps it in DistributedDataParallel
(gloo on CPU, NCCL on ``cuda:<local rank>``) and runs the shared epoch loop on its ``r::world``
share of each global batch. Rank 0 writes ``ckpt-<epoch>.pt`` then one line to
``events.jsonl`` per epoch, waits for the launcher's ``decision-<epoch>`` (continue / stop /
cancel / prune) and the loop broadcasts it; at the end rank 0 writes ``final.pt``. A rank that
fails writes its traceback to ``error-rank<r>.txt`` for the launcher to report.

Preemption: every rank checks for its workdir's ``preempt`` file after each step (a stat; the
ranks agree by a MAX all-reduce, so one node's file stops every node's ranks after the same
step). Rank 0 then writes ``ckpt-preempt.pt`` and a ``{"preempt": true, ...}`` line to
``events.jsonl``; every rank leaves ``preempted-rank<r>`` and exits 0 (the launcher, once it
sees all its ranks' markers, does not wait for torchrun's teardown).

Teardown: a rank that passed the final barrier leaves ``done-rank<r>``, destroys its process
group and leaves with ``os._exit`` (no interpreter finalization: gloo's background threads,
destroyed at exit while still joinable, can abort a finished rank with "terminate called
without an active exception"). A launcher whose torchrun exits non-zero after every local rank
left its marker and rank 0 wrote ``final.pt`` keeps the result and logs the exit code.
"""

# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import datetime
import io
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from carrara.errors import CancelledError, DeadlineExceededError

from .base import Preempted, Pruned, TrainData
from .launch import LAUNCHER_PID_ENV, ORPHANED
from .torch_trainer import (
    Decision,
    Distributed,
    MLPParams,
    load_blob,
    prepare,
    train_loop,
)

__all__ = ["FAULT_ENV", "TEARDOWN_FAULT_ENV", "main", "run_rank"]

#: Fault injection for tests: the rank named here raises before training.
FAULT_ENV = "CARRARA_TORCH_DDP_FAIL_RANK"
#: Fault injection for tests: the rank named here aborts (SIGABRT) after it finished, as a
#: crash in the process group's teardown would.
TEARDOWN_FAULT_ENV = "CARRARA_TORCH_DDP_ABORT_AT_EXIT"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _leader_hook(workdir: Path, deadline: float) -> Callable[..., Decision]:
    events = workdir / "events.jsonl"

    def on_epoch(epoch: int, metrics: dict[str, float], blob: Callable[[], bytes]) -> Decision:
        name = f"ckpt-{epoch}.pt"
        _write_atomic(workdir / name, blob())
        line = json.dumps({"epoch": epoch, "metrics": metrics, "checkpoint": name})
        with events.open("a") as f:
            f.write(line + "\n")
        answer = workdir / f"decision-{epoch}"
        while not answer.exists():
            if time.monotonic() > deadline:
                raise DeadlineExceededError(f"no decision from the launcher for epoch {epoch}")
            time.sleep(0.002)
        decision = answer.read_text().strip()
        if decision not in ("continue", "stop", "cancel", "prune"):
            raise ValueError(f"bad decision {decision!r} for epoch {epoch}")
        return decision  # type: ignore[return-value]

    return on_epoch


def _leader_preempt(workdir: Path) -> Callable[[int, int, Callable[[], bytes]], None]:
    def on_preempt(epoch: int, step: int, blob: Callable[[], bytes]) -> None:
        name = "ckpt-preempt.pt"
        _write_atomic(workdir / name, blob())
        line = json.dumps({"preempt": True, "epoch": epoch, "step": step, "checkpoint": name})
        with (workdir / "events.jsonl").open("a") as f:
            f.write(line + "\n")

    return on_preempt


def _leave_with_launcher(poll_s: float = 0.5) -> None:
    """End this rank (exit status 143, as for SIGTERM) once the launcher that started it is
    gone: torchrun killed without the chance to stop its ranks must not leave them training.
    The launcher is ``$CARRARA_LAUNCHER_PID`` (set by :mod:`.launch`, torchrun itself), else
    this process's parent at start."""
    expected = os.environ.get(LAUNCHER_PID_ENV, "")
    parent = int(expected) if expected.isdigit() else os.getppid()
    if os.getppid() != parent:
        os._exit(ORPHANED)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # reparented: the launcher died
                os._exit(ORPHANED)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run_rank(workdir: Path) -> None:
    """Train this rank's share; rank 0 reports and writes the final state."""
    _leave_with_launcher()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    job: dict[str, Any] = json.loads((workdir / "job.json").read_text())
    if os.environ.get(FAULT_ENV) == str(rank):
        raise RuntimeError(f"injected failure on rank {rank} ({FAULT_ENV})")
    p = msgspec.convert(job["params"], MLPParams)
    torch.set_num_threads(p.threads)
    timeout = datetime.timedelta(seconds=float(job["timeout_s"]))
    deadline = time.monotonic() + float(job["timeout_s"])
    if job["cuda"]:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=job["backend"], timeout=timeout)
    try:
        with np.load(workdir / "data.npz") as npz:
            data = TrainData(
                x_train=npz["x_train"], y_train=npz["y_train"], x_val=npz["x_val"],
                y_val=npz["y_val"], feature_names=list(job["feature_names"]), task=job["task"],
                classes=list(job["classes"]),
            )  # fmt: skip
        model, arrays = prepare(p, data, int(job["seed"]), device)
        ddp = DistributedDataParallel(
            model,
            device_ids=[local_rank] if job["cuda"] else None,
            broadcast_buffers=False,  # the standardization buffers are equal on every rank
        )
        resume_path = workdir / "resume.pt"
        state = load_blob(resume_path.read_bytes()) if resume_path.exists() else None
        try:
            loop = train_loop(
                model, p, arrays, seed=int(job["seed"]), start_epoch=int(job["resume_epoch"]) + 1,
                resume_state=state, on_epoch=_leader_hook(workdir, deadline) if rank == 0 else None,
                dist=Distributed(rank=rank, world=world), ddp_model=ddp,
                preempting=(workdir / "preempt").exists,
                on_preempt=_leader_preempt(workdir) if rank == 0 else None,
            )  # fmt: skip
        except Preempted as exc:
            _write_atomic(workdir / f"preempted-rank{rank}", str(exc).encode())
            return
        except (CancelledError, Pruned) as exc:
            if rank == 0:
                kind = "cancelled" if isinstance(exc, CancelledError) else "pruned"
                _write_atomic(workdir / kind, str(exc).encode())
            return
        if rank == 0:
            buf = io.BytesIO()
            torch.save(
                {
                    "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "epochs_run": loop.epochs_run,
                    "best_epoch": loop.best_epoch,
                    "stopped_early": loop.stopped_early,
                    "history": loop.history,
                    "world_size": world,
                },
                buf,
            )
            _write_atomic(workdir / "final.pt", buf.getvalue())
        dist.barrier()
        _write_atomic(workdir / f"done-rank{rank}", b"done")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m carrara.training.frameworks.torch_ddp <workdir>", file=sys.stderr)
        return 2
    workdir = Path(args[0])
    try:
        run_rank(workdir)
    except BaseException:
        rank = os.environ.get("RANK", "?")
        (workdir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0 and os.environ.get(TEARDOWN_FAULT_ENV) == os.environ.get("RANK"):
        os.abort()
    os._exit(code)  # skip finalization: see the module docstring (teardown)
