"""Gang GPU admission: which queued job a worker on a node may start, and on which GPUs.

A worker declares its node and the GPU ids that node lets it use (``carrara train worker
--node n1 --gpus 0,1,2``). A job asking for ``g`` GPUs is admitted only when ``g`` of that
node's GPUs are free at once; they are leased in the claim's transaction (never partially)
and released when the job completes, fails, is cancelled or is requeued after its worker
stopped heartbeating. The leased ids travel on the job (``Job.gpus``) so the worker can set
``CUDA_VISIBLE_DEVICES``.

Order is FIFO by submit time, with backfill:

- a job that needs no GPUs is always admissible (it takes nothing a GPU job waits for);
- a job asking for more GPUs than this node has is skipped here (another node may fit it;
  jobs that fit no known node are rejected at submit, see :func:`inventory_problem`);
- a GPU job that fits the node but not its free GPUs is *blocked*. While every blocked job
  ahead has waited less than ``backfill_window_s``, later smaller GPU jobs may start on the
  free GPUs (backfill). Once a blocked job has waited ``backfill_window_s`` it holds a
  *reservation*: no later GPU job starts on this node, so running jobs drain and the big job
  gets its GPUs when they finish. That bounds its wait by the window plus the longest
  running job, so it is never starved. ``backfill_window_s = 0`` is strict FIFO for GPU jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

__all__ = [
    "DEFAULT_BACKFILL_WINDOW_S",
    "MAX_CPUS",
    "Admission",
    "Candidate",
    "choose",
    "inventory_problem",
    "parse_gpus",
]

#: How long a blocked GPU job lets later, smaller GPU jobs overtake it.
DEFAULT_BACKFILL_WINDOW_S = 600.0
#: Cores one job may ask for (per node); more is a typo, not a machine.
MAX_CPUS = 1024


class Candidate(msgspec.Struct, frozen=True):
    """A queued job as the scheduler sees it."""

    job_id: str
    gpus: int
    submitted_at_us: int


class Admission(msgspec.Struct, frozen=True):
    """The job to start and the GPU ids to lease for it (empty for a CPU job)."""

    job_id: str
    gpus: tuple[int, ...]


def choose(
    candidates: Iterable[Candidate],
    *,
    inventory: Sequence[int],
    leased: Iterable[int],
    now_us: int,
    backfill_window_s: float,
) -> Admission | None:
    """The first admissible candidate (in the given FIFO order) for a node whose usable GPUs
    are ``inventory`` and of which ``leased`` are taken; None when nothing may start."""
    free = sorted(set(inventory) - set(leased))
    window_us = int(backfill_window_s * 1_000_000)
    reserved = False
    for c in candidates:
        if c.gpus <= 0:
            return Admission(c.job_id, ())
        if c.gpus > len(set(inventory)):
            continue  # never fits here; another node may take it
        if c.gpus <= len(free):
            if reserved:
                continue  # an older blocked job holds a reservation on this node
            return Admission(c.job_id, tuple(free[: c.gpus]))
        if now_us - c.submitted_at_us >= window_us:
            reserved = True
    return None


def inventory_problem(gpus: int, known_max: int) -> str | None:
    """Why a job asking for ``gpus`` GPUs can never run, given the largest node inventory
    known (configured ``training_gpus_per_node`` or declared by a worker)."""
    if gpus <= known_max:
        return None
    if known_max == 0:
        return (
            f"impossible resources: {gpus} GPU(s) requested but no node with GPUs is known; "
            "set training_gpus_per_node (CARRARA_TRAINING_GPUS_PER_NODE) or start a worker "
            "with --gpus"
        )
    return (
        f"impossible resources: {gpus} GPU(s) requested but the largest node has {known_max}; "
        f"ask for at most {known_max}"
    )


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"0,1,3"`` -> (0, 1, 3); ``""`` -> (); ValueError on anything else."""
    text = text.strip()
    if not text:
        return ()
    ids = tuple(int(part) for part in text.split(","))
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"GPU ids must be distinct non-negative integers, got {text!r}")
    return ids
