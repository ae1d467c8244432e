"""GPU admission: which queued job a worker on a node may start, on which devices.

A worker declares its node and the devices that node lets it use (``carrara train worker
--node n1 --gpus 0,1,2 --mig 1g.10gb=MIG-ab12,1g.10gb=MIG-cd34``): whole GPUs by id and MIG
instances by id and profile. Each device has a capacity of 1.0 (``MILLI`` shares). A job asks
for one of:

- ``gpus: g`` (an integer >= 1): ``g`` whole, *unshared* GPUs of one node, leased all at once
  (gang) or not at all; ``nodes: N`` asks for that on each of ``N`` nodes (see
  :mod:`carrara.training.queue` for the cross-node gang);
- ``gpus: 0.25`` (a fraction in (0, 1), in thousandths): a share of one GPU. Fractions are
  packed best-fit: onto the most used GPU they still fit on (never past 1.0 per device), so
  whole GPUs stay free for gangs; a whole-GPU job never gets a device that holds a share;
- ``mig: "1g.10gb"``: one free MIG instance of that profile;
- nothing: a CPU job.

The leases are written in the claim's transaction and released when the job completes, fails,
is cancelled or is requeued. The leased ids travel on the job (``Job.gpus``, ``Job.mig_device``)
so the worker can set ``CUDA_VISIBLE_DEVICES``.

Order is FIFO by submit time, with backfill:

- a CPU job is always admissible (it takes nothing a GPU job waits for);
- a job that never fits this node (more GPUs than it has, a MIG profile it lacks) is skipped
  here (another node may fit it; jobs that fit no known node are rejected at submit, see
  :func:`inventory_problem`);
- a job that fits the node but not its free devices is *blocked*. While every blocked job ahead
  has waited less than ``backfill_window_s``, later jobs may start on the free devices
  (backfill). Once a blocked job has waited ``backfill_window_s`` it holds a *reservation* on
  its pool (the node's GPUs, or its MIG instances of that profile): no later job of that pool
  starts on this node, so running jobs drain and the blocked job gets its devices when they
  finish. That bounds its wait by the window plus the longest running job, so it is never
  starved. ``backfill_window_s = 0`` is strict FIFO per pool.
- a multi-node job also needs idle workers on other nodes (``gang_ready``); when it waits past
  the window it reserves the whole worker (no later job starts here), so nodes drain and go
  idle until the gang can form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgspec

__all__ = [
    "DEFAULT_BACKFILL_WINDOW_S",
    "MAX_CPUS",
    "MIG_PROFILE",
    "MILLI",
    "Admission",
    "Candidate",
    "MigDevice",
    "NodeInventory",
    "choose",
    "free_whole_gpus",
    "gpu_key",
    "inventory_problem",
    "parse_gpus",
    "parse_mig",
]

#: How long a blocked GPU job lets later, smaller GPU jobs overtake it.
DEFAULT_BACKFILL_WINDOW_S = 600.0
#: Cores one job may ask for (per node); more is a typo, not a machine.
MAX_CPUS = 1024
#: A device's capacity in shares: ``gpus: 0.25`` leases 250 of a GPU's 1000.
MILLI = 1000
#: A MIG profile name as NVIDIA spells it: ``1g.10gb``, ``3g.40gb``, ``1g.10gb+me``.
MIG_PROFILE = re.compile(r"^[1-9][0-9]?g\.[1-9][0-9]*gb(\+me)?$")


class MigDevice(msgspec.Struct, frozen=True):
    """One MIG instance a node offers: its id (what ``CUDA_VISIBLE_DEVICES`` takes, e.g. a
    ``MIG-…`` UUID) and its profile."""

    id: str
    profile: str


class NodeInventory(msgspec.Struct, frozen=True):
    """The devices a worker's node lets it use."""

    gpus: tuple[int, ...] = ()
    mig: tuple[MigDevice, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.gpus and not self.mig


class Candidate(msgspec.Struct, frozen=True):
    """A queued job as the scheduler sees it: ``gpus`` whole GPUs per node, or a share of one
    GPU (``share_milli`` in 1..999), or one MIG instance of ``mig_profile``; ``nodes`` nodes."""

    job_id: str
    gpus: int
    submitted_at_us: int
    share_milli: int = 0
    mig_profile: str = ""
    nodes: int = 1

    @property
    def cpu_only(self) -> bool:
        return self.gpus <= 0 and self.share_milli <= 0 and not self.mig_profile


class Admission(msgspec.Struct, frozen=True):
    """The job to start and what to lease for it on this node: whole GPUs (``share_milli`` =
    ``MILLI``), one GPU's share, or one MIG instance; all empty for a CPU job."""

    job_id: str
    gpus: tuple[int, ...]
    share_milli: int = MILLI
    mig_device: str = ""


def gpu_key(gpu: int) -> str:
    """A whole GPU's device key in the lease table (MIG instances use their own id)."""
    return str(gpu)


def free_whole_gpus(inventory: NodeInventory, used: Mapping[str, int]) -> list[int]:
    """The node's GPUs nothing is leased on (a GPU holding a share is not free)."""
    return sorted(g for g in set(inventory.gpus) if used.get(gpu_key(g), 0) <= 0)


def _normalize(
    inventory: NodeInventory | Sequence[int], leased: Mapping[str, int] | Iterable[int]
) -> tuple[NodeInventory, dict[str, int]]:
    inv = inventory if isinstance(inventory, NodeInventory) else NodeInventory(tuple(inventory))
    if isinstance(leased, Mapping):
        used = {str(k): int(v) for k, v in leased.items()}
    else:
        used = {gpu_key(int(g)): MILLI for g in leased}
    return inv, used


def _place(c: Candidate, inv: NodeInventory, used: Mapping[str, int]) -> Admission | bool | None:
    """Where ``c`` goes on this node now: an Admission, None (fits the node, blocked now) or
    False (never fits this node)."""
    if c.mig_profile:
        offered = [d for d in inv.mig if d.profile == c.mig_profile]
        if not offered:
            return False
        free = [d for d in offered if used.get(d.id, 0) <= 0]
        return Admission(c.job_id, (), MILLI, free[0].id) if free else None
    if c.share_milli > 0:
        if not inv.gpus:
            return False
        fitting = [
            g for g in sorted(set(inv.gpus)) if used.get(gpu_key(g), 0) + c.share_milli <= MILLI
        ]
        if not fitting:
            return None
        # Best fit: the most used GPU it still fits on, so whole GPUs stay whole.
        best = max(fitting, key=lambda g: (used.get(gpu_key(g), 0), -g))
        return Admission(c.job_id, (best,), c.share_milli)
    if c.gpus > len(set(inv.gpus)):
        return False
    whole = free_whole_gpus(inv, used)
    return Admission(c.job_id, tuple(whole[: c.gpus])) if c.gpus <= len(whole) else None


def choose(
    candidates: Iterable[Candidate],
    *,
    inventory: NodeInventory | Sequence[int],
    leased: Mapping[str, int] | Iterable[int],
    now_us: int,
    backfill_window_s: float,
    gang_ready: Callable[[Candidate, Admission], bool] | None = None,
) -> Admission | None:
    """The first admissible candidate (in the given FIFO order) for a node offering
    ``inventory``, of which ``leased`` is taken (device key -> shares leased; a plain list of
    GPU ids means whole GPUs); None when nothing may start. A multi-node candidate is
    admissible here only when ``gang_ready(candidate, admission)`` says its other nodes can
    start too (no callback: multi-node jobs are never admitted)."""
    inv, used = _normalize(inventory, leased)
    window_us = int(backfill_window_s * 1_000_000)
    reserved: set[str] = set()  # pools ("gpu", "mig:<profile>") held for an older job
    everything_reserved = False
    for c in candidates:
        pool = f"mig:{c.mig_profile}" if c.mig_profile else ("" if c.cpu_only else "gpu")
        waited = now_us - c.submitted_at_us >= window_us
        if everything_reserved:
            return None
        if c.cpu_only and c.nodes <= 1:
            return Admission(c.job_id, ())
        place = _place(c, inv, used)
        if place is False:
            continue  # never fits here; another node may take it
        if isinstance(place, Admission):
            if pool in reserved:
                continue  # an older blocked job holds a reservation on this pool
            if c.nodes <= 1:
                return place
            if gang_ready is not None and gang_ready(c, place):
                return place
            if waited:
                everything_reserved = True  # drain this node so the gang can form
            continue
        if waited:
            if c.nodes > 1:
                everything_reserved = True
            else:
                reserved.add(pool)
    return None


def inventory_problem(
    gpus: float, known: int | Sequence[NodeInventory], *, mig: str = ""
) -> str | None:
    """Why a job asking for ``gpus`` GPUs (or one ``mig`` instance) can never run, given the
    node inventories known (or, as an int, the largest node's GPU count: configured
    ``training_gpus_per_node`` or declared by a worker)."""
    inventories = [NodeInventory(tuple(range(known)))] if isinstance(known, int) else list(known)
    known_max = max((len(set(i.gpus)) for i in inventories), default=0)
    if mig:
        profiles = sorted({d.profile for i in inventories for d in i.mig})
        if mig in profiles:
            return None
        offered = f"known profiles: {', '.join(profiles)}" if profiles else "no node offers MIG"
        return (
            f"impossible resources: MIG profile {mig!r} requested but no known node offers it "
            f"({offered}); start a worker with --mig {mig}=<device id>"
        )
    need = 1 if 0 < gpus < 1 else int(gpus)
    if need <= known_max:
        return None
    if known_max == 0:
        return (
            f"impossible resources: {gpus:g} GPU(s) requested but no node with GPUs is known; "
            "set training_gpus_per_node (CARRARA_TRAINING_GPUS_PER_NODE) or start a worker "
            "with --gpus"
        )
    return (
        f"impossible resources: {gpus:g} GPU(s) requested but the largest node has "
        f"{known_max}; ask for at most {known_max}"
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


def parse_mig(text: str) -> tuple[MigDevice, ...]:
    """``"1g.10gb=MIG-ab,3g.40gb=MIG-cd"`` -> MIG devices; ``""`` -> (); ValueError on a bad
    profile, a missing id or a repeated id."""
    text = text.strip()
    if not text:
        return ()
    out: list[MigDevice] = []
    for part in text.split(","):
        profile, sep, device = part.strip().partition("=")
        profile, device = profile.strip(), device.strip()
        if not sep or not device:
            raise ValueError(f"MIG devices are PROFILE=DEVICE_ID, got {part.strip()!r}")
        if not MIG_PROFILE.match(profile):
            raise ValueError(f"not a MIG profile: {profile!r} (e.g. 1g.10gb, 3g.40gb)")
        out.append(MigDevice(device, profile))
    if len({d.id for d in out}) != len(out):
        raise ValueError(f"MIG device ids must be distinct, got {text!r}")
    return tuple(out)
