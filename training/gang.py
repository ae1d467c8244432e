"""Multi-node attempts: what node rank 0 publishes for the other nodes, and what they run.

The queue admits a ``resources.nodes = N`` job on N workers at once (see
:class:`carrara.training.queue.JobQueue`). The worker holding node rank 0 (the *leader*) runs
the job as any other: it builds the training set, and its torchrun launcher
(:func:`carrara.training.frameworks.torch_trainer.fit_distributed`) writes the ranks' inputs
(params, arrays, the checkpoint to resume) to a work folder. With a :class:`GangLink` it then
packs that folder into one archive on the checkpoint store (any fsspec URL: the followers may be
other machines), picks its rendezvous port, and publishes the :class:`Rendezvous` on the job.
Each follower (:func:`run_follower`) waits for it, fetches and verifies the archive (sha256),
and starts ``torchrun --nnodes N --node-rank r`` against rank 0's store. Data is split across
all ``N x processes_per_node`` ranks (each sample once per epoch); rank 0 alone reports,
checkpoints and registers. Any node's failure fails the attempt on every node
(:meth:`JobQueue.fail_attempt`): the job is requeued and resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from carrara import ports
from carrara.errors import DeadlineExceededError, FailedPreconditionError
from carrara.storage import open_root, publish_bytes, refresh

from .frameworks.base import Preempted
from .queue import Job, JobQueue, Rendezvous

__all__ = ["GANG", "GangLink", "RankFailedError", "run_follower"]

log = logging.getLogger(__name__)

#: Files of the launcher's work folder the other nodes need.
INPUT_FILES = ("job.json", "data.npz", "resume.pt")


class RankFailedError(FailedPreconditionError):
    """A node's ranks failed (a rank died or lost its peers): the attempt failed, not the job;
    the worker requeues it to resume from its checkpoint."""


def _pack(workdir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in INPUT_FILES:
            if (workdir / name).exists():
                tar.add(workdir / name, arcname=name)
    return buf.getvalue()


def _unpack(blob: bytes, workdir: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for member in tar.getmembers():
            if member.name not in INPUT_FILES or not member.isfile():
                raise FailedPreconditionError(f"unexpected entry {member.name!r} in gang inputs")
            f = tar.extractfile(member)
            if f is None:
                raise FailedPreconditionError(f"gang inputs: {member.name} is unreadable")
            (workdir / member.name).write_bytes(f.read())


def free_port(address: str) -> int:
    """A free TCP port on ``address`` (rank 0's torchrun store listens there), below the
    ephemeral range so no outgoing connection takes it before torchrun binds it."""
    try:
        return ports.free_port(address)
    except OSError:  # the address is not one of this machine's (a name for other nodes)
        return ports.free_port("")


class GangLink:
    """The leader's side of a multi-node attempt, handed to the torchrun launcher."""

    def __init__(self, queue: JobQueue, job: Job, *, root: str, address: str) -> None:
        self.queue = queue
        self.job = job
        self.root = root.rstrip("/")
        self.address = address
        self.nnodes = job.nodes
        self._path = ""

    def publish(self, workdir: Path) -> tuple[str, int]:
        """Store the ranks' inputs, publish the rendezvous; returns (master addr, port)."""
        blob = _pack(workdir)
        digest = hashlib.sha256(blob).hexdigest()
        fs, base, _ = open_root(self.root)
        path = f"{base}/{self.job.job_id}/gang/attempt-{self.job.attempts}.tar"
        publish_bytes(fs, path, blob)  # whole or not at all, on a folder or an object store
        self._path = path
        port = free_port(self.address)
        self.queue.publish_rendezvous(
            self.job,
            Rendezvous(
                nnodes=self.nnodes,
                master_addr=self.address,
                master_port=port,
                inputs=path,
                inputs_sha256=digest,
            ),
        )
        return self.address, port

    def cleanup(self) -> None:
        if self._path:
            fs, _, _ = open_root(self.root)
            with contextlib.suppress(Exception):
                fs.rm(self._path)


#: Set by the worker while it runs node rank 0 of a multi-node job.
GANG: contextvars.ContextVar[GangLink | None] = contextvars.ContextVar("gang", default=None)


def run_follower(
    queue: JobQueue,
    job: Job,
    *,
    root: str,
    heartbeat_interval_s: float,
    stopping: threading.Event,
    progress: Callable[[str], None],
    wait_s: float | None = None,
) -> Job:
    """Run this worker's node rank of ``job`` to the end; returns the job as it then is.

    Waits for rank 0's rendezvous (rank 0 publishes it once it has built the training set;
    while the attempt lives, or at most ``wait_s`` when given), fetches
    the inputs, runs the node's ranks with the job's leased GPUs, heartbeats the rank, and
    reports: done (:meth:`JobQueue.rank_done`) or failed (:meth:`JobQueue.fail_attempt`).
    ``stopping`` (the worker is preempted) makes the ranks stop at their next step; rank 0
    then checkpoints and hands the job back."""
    from .frameworks.torch_trainer import run_node

    where = f"node rank {job.node_rank}/{job.nodes} on {job.node} ({job.rank_worker})"
    cancel = threading.Event()
    lost = threading.Event()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(heartbeat_interval_s):
            try:
                if queue.heartbeat(job):
                    cancel.set()
            except FailedPreconditionError:
                lost.set()  # the attempt ended elsewhere: stop this node's ranks
                return
            except Exception as exc:  # database trouble: keep running, retry the beat
                log.warning("heartbeat for %s of job %s failed: %s", where, job.job_id, exc)

    left = threading.Event()

    def preempting() -> bool:
        if not stopping.is_set():
            return False
        if not left.is_set():  # no new gang may count on this worker
            left.set()
            with contextlib.suppress(Exception):
                queue.leave(job.rank_worker)
        return True

    thread = threading.Thread(target=beat, name=f"rank-beat-{job.job_id[:8]}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + wait_s if wait_s is not None else None
        rdzv: Rendezvous | None = None
        while rdzv is None or not rdzv.inputs:
            if lost.is_set():
                return queue.get(job.job_id)
            if stopping.is_set():  # preempted before its ranks started
                queue.leave(job.rank_worker)
                return queue.hand_back_attempt(job, "its node was preempted before it started")
            try:
                rdzv = queue.rendezvous(job)
            except FailedPreconditionError:
                return queue.get(job.job_id)
            if rdzv is not None and rdzv.inputs:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceededError(f"{where}: rank 0 published no rendezvous in time")
            time.sleep(0.2)
        fs, _, _ = open_root(root)
        refresh(fs, rdzv.inputs)
        blob = bytes(fs.cat_file(rdzv.inputs))
        if hashlib.sha256(blob).hexdigest() != rdzv.inputs_sha256:
            raise FailedPreconditionError(f"{where}: gang inputs {rdzv.inputs} fail their sha256")
        progress(
            f"{where}: joining rank 0 at {rdzv.master_addr}:{rdzv.master_port} "
            f"(attempt {job.attempts})"
        )
        with tempfile.TemporaryDirectory(prefix="carrara-node-") as tmp:
            workdir = Path(tmp)
            _unpack(blob, workdir)
            run_node(
                workdir,
                nnodes=rdzv.nnodes,
                node_rank=job.node_rank,
                master_addr=rdzv.master_addr,
                master_port=rdzv.master_port,
                nproc_per_node=job.spec().resources.processes_per_node,
                gpus=job.gpus,
                should_stop=lambda: lost.is_set() or cancel.is_set(),
                preempting=preempting,
            )
    except Preempted:
        done.set()
        thread.join()
        progress(f"{where}: ranks stopped for a preemption; rank 0 hands the job back")
        queue.rank_done(job)
        return queue.get(job.job_id)
    except Exception as exc:
        done.set()
        thread.join()
        if lost.is_set():  # the attempt ended elsewhere; nothing to report
            return queue.get(job.job_id)
        error = f"{type(exc).__name__}: {exc}"
        progress(f"{where} failed: {error}")
        return queue.fail_attempt(job, error)
    done.set()
    thread.join()
    queue.rank_done(job)
    progress(f"{where}: ranks finished")
    return queue.get(job.job_id)
