"""The durable training job queue, in the registry database, with job logs and gang GPU
admission.

States: ``QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED`` (a queued job can be cancelled
directly; a running one gets a cancel request its worker sees on the next heartbeat). Workers
claim with row locks (``FOR UPDATE SKIP LOCKED``) on PostgreSQL; on SQLite ``BEGIN IMMEDIATE``
already serializes claimers. Which job a worker may start, and on which of its node's GPUs,
is :mod:`carrara.training.scheduler`'s rule (FIFO, bounded backfill); the GPUs are leased in
``training_gpu_leases`` in the claim's transaction (one claimer per node at a time on
PostgreSQL, by an advisory lock) and released when the job completes, fails, is cancelled or
requeued. A RUNNING job whose heartbeat is older than ``lease_timeout_s`` goes back to QUEUED
(its worker is presumed dead; its GPUs are freed) and is claimed again in its FIFO place;
completion is fenced on the claiming worker and attempt, so a presumed-dead worker that wakes
up cannot overwrite the new run. Every state change is published to the ``training-events``
topic when an event log is given. ``log``/``logs`` keep each job's log lines
(``training_job_logs``; seq per job, gapless).
"""

from __future__ import annotations

import builtins
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from carrara.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from carrara.sql import Database, Migration, Transaction, connect
from carrara.types import Topic

from .scheduler import (
    DEFAULT_BACKFILL_WINDOW_S,
    MILLI,
    Admission,
    Candidate,
    MigDevice,
    NodeInventory,
    choose,
    free_whole_gpus,
    gpu_key,
    inventory_problem,
)

if TYPE_CHECKING:
    from carrara.eventlog import EventLog
    from carrara.feature_cache.service import FeatureService

    from .spec import JobSpec

__all__ = [
    "LOG_LEVELS",
    "MIGRATIONS",
    "STATES",
    "Job",
    "JobEvent",
    "JobQueue",
    "JobState",
    "LogLine",
    "Rank",
    "Rendezvous",
    "upgrade",
]

JobState = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
STATES: tuple[JobState, ...] = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL: frozenset[str] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Longer log messages are cut here (a runaway traceback must not bloat the queue database).
MAX_LOG_MESSAGE = 16_384

MIGRATIONS = [
    Migration(
        id="0001_training_jobs",
        sql="""
CREATE TABLE training_jobs (
    job_id TEXT PRIMARY KEY,
    model_name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    submitted_at_us BIGINT NOT NULL,
    started_at_us BIGINT,
    finished_at_us BIGINT,
    heartbeat_at_us BIGINT,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    result_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX training_jobs_state ON training_jobs (state, submitted_at_us)
""",
    ),
    Migration(
        id="0002_training_job_logs",
        sql="""
CREATE TABLE training_job_logs (
    job_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts_us BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
)
""",
    ),
    Migration(
        id="0003_gpu_leases_and_triggers",
        sql="""
ALTER TABLE training_jobs ADD COLUMN gpus_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE training_jobs ADD COLUMN node TEXT;
ALTER TABLE training_jobs ADD COLUMN gpus_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE training_jobs ADD COLUMN trigger_name TEXT NOT NULL DEFAULT '';
CREATE INDEX training_jobs_trigger ON training_jobs (trigger_name, state);
CREATE TABLE training_gpu_leases (
    node TEXT NOT NULL,
    gpu_id INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    leased_at_us BIGINT NOT NULL,
    PRIMARY KEY (node, gpu_id)
);
CREATE INDEX training_gpu_leases_job ON training_gpu_leases (job_id);
CREATE TABLE training_nodes (
    node TEXT PRIMARY KEY,
    gpus_json TEXT NOT NULL,
    seen_at_us BIGINT NOT NULL
);
CREATE TABLE training_triggers (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    schedule TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    enabled INTEGER NOT NULL DEFAULT 1,
    created_by TEXT NOT NULL DEFAULT '',
    created_at_us BIGINT NOT NULL,
    last_fired_at_us BIGINT,
    last_job_id TEXT,
    pending INTEGER NOT NULL DEFAULT 0,
    state_json TEXT NOT NULL DEFAULT '{}'
)
""",
    ),
    Migration(
        id="0004_shared_gpus_and_multi_node",
        sql="""
ALTER TABLE training_jobs ADD COLUMN gpu_share_milli INTEGER NOT NULL DEFAULT 0;
ALTER TABLE training_jobs ADD COLUMN mig_profile TEXT NOT NULL DEFAULT '';
ALTER TABLE training_jobs ADD COLUMN mig_device TEXT NOT NULL DEFAULT '';
ALTER TABLE training_jobs ADD COLUMN nodes_requested INTEGER NOT NULL DEFAULT 1;
ALTER TABLE training_jobs ADD COLUMN rendezvous_json TEXT NOT NULL DEFAULT '';
ALTER TABLE training_jobs ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE training_nodes ADD COLUMN mig_json TEXT NOT NULL DEFAULT '[]';
CREATE TABLE training_device_leases (
    node TEXT NOT NULL,
    device TEXT NOT NULL,
    job_id TEXT NOT NULL,
    share_milli INTEGER NOT NULL,
    leased_at_us BIGINT NOT NULL,
    PRIMARY KEY (node, device, job_id)
);
CREATE INDEX training_device_leases_job ON training_device_leases (job_id);
INSERT INTO training_device_leases (node, device, job_id, share_milli, leased_at_us)
    SELECT node, CAST(gpu_id AS TEXT), job_id, 1000, leased_at_us FROM training_gpu_leases;
DROP TABLE training_gpu_leases;
CREATE TABLE training_workers (
    worker TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    seen_at_us BIGINT NOT NULL,
    job_id TEXT
);
CREATE TABLE training_job_ranks (
    job_id TEXT NOT NULL,
    node_rank INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    node TEXT NOT NULL,
    gpus_json TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,
    heartbeat_at_us BIGINT NOT NULL,
    PRIMARY KEY (job_id, node_rank)
);
CREATE INDEX training_job_ranks_worker ON training_job_ranks (worker, state)
""",
    ),
]


def upgrade(url: str) -> list[str]:
    """Apply pending training migrations to the database at ``url``; returns their ids."""
    with connect(url) as db:
        return db.migrate("training", MIGRATIONS)


def _now_us() -> int:
    return time.time_ns() // 1000


class Job(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    model_name: str
    spec_json: str
    state: JobState
    submitted_by: str
    submitted_at_us: int
    started_at_us: int | None
    finished_at_us: int | None
    heartbeat_at_us: int | None
    worker: str | None
    attempts: int
    cancel_requested: bool
    error: str
    result: dict[str, Any]
    gpus_requested: int = 0
    node: str | None = None  # where the current attempt runs (set by the claim)
    gpus: list[int] = msgspec.field(default_factory=list)  # leased GPU ids on ``node``
    trigger: str = ""  # the trigger that submitted it ("" for a direct submit)
    gpu_share: float = 0.0  # a requested share of one GPU (0: whole GPUs or none)
    mig_profile: str = ""  # a requested MIG instance profile
    mig_device: str = ""  # the leased MIG instance (its id)
    nodes: int = 1  # nodes the job trains on (torchrun --nnodes)
    rendezvous: Rendezvous | None = None  # where the ranks meet (multi-node, set by rank 0)
    #: This worker's node in a multi-node attempt (0 = the leader, which owns the job row;
    #: > 0 = a follower, which owns only its rank) and the follower's worker id.
    node_rank: int = 0
    rank_worker: str = ""

    def spec(self) -> JobSpec:
        from .spec import JobSpec

        return msgspec.json.decode(self.spec_json, type=JobSpec)


class Rendezvous(msgspec.Struct, frozen=True, kw_only=True):
    """Where the nodes of one multi-node attempt meet: rank 0's torchrun store
    (``master_addr:master_port``) and the training inputs it published for the others
    (an archive on the checkpoint store, with its sha256)."""

    nnodes: int
    master_addr: str
    master_port: int
    inputs: str = ""
    inputs_sha256: str = ""


class Rank(msgspec.Struct, frozen=True, kw_only=True):
    """One node of a multi-node attempt."""

    node_rank: int
    worker: str
    node: str
    gpus: list[int]
    state: str  # ASSIGNED (waiting for its worker), RUNNING, DONE
    heartbeat_at_us: int


class LogLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a job's log; ``seq`` counts from 1 per job, without gaps."""

    seq: int
    ts_us: int
    level: str
    message: str


class JobEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The payload published on ``training-events``."""

    job_id: str
    model_name: str
    state: JobState
    at_us: int
    attempt: int = 0
    worker: str = ""
    error: str = ""
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    trigger: str = ""


_COLUMNS = (
    "job_id, model_name, spec_json, state, submitted_by, submitted_at_us, started_at_us,"
    " finished_at_us, heartbeat_at_us, worker, attempts, cancel_requested, error, result_json,"
    " gpus_requested, node, gpus_json, trigger_name, gpu_share_milli, mig_profile, mig_device,"
    " nodes_requested, rendezvous_json"
)
_result_decoder = msgspec.json.Decoder(dict[str, Any])
_gpus_decoder = msgspec.json.Decoder(list[int])
_mig_decoder = msgspec.json.Decoder(list[MigDevice])
_rendezvous_decoder = msgspec.json.Decoder(Rendezvous)


def _row(row: Sequence[Any]) -> Job:
    return Job(
        job_id=row[0],
        model_name=row[1],
        spec_json=row[2],
        state=row[3],
        submitted_by=row[4],
        submitted_at_us=int(row[5]),
        started_at_us=None if row[6] is None else int(row[6]),
        finished_at_us=None if row[7] is None else int(row[7]),
        heartbeat_at_us=None if row[8] is None else int(row[8]),
        worker=row[9],
        attempts=int(row[10]),
        cancel_requested=bool(row[11]),
        error=row[12],
        result=_result_decoder.decode(row[13]),
        gpus_requested=int(row[14]),
        node=row[15],
        gpus=_gpus_decoder.decode(row[16]),
        trigger=row[17],
        gpu_share=int(row[18]) / MILLI,
        mig_profile=row[19],
        mig_device=row[20],
        nodes=int(row[21]),
        rendezvous=_rendezvous_decoder.decode(row[22]) if row[22] else None,
    )


def _release(tx: Transaction, job_id: str) -> None:
    """Free the job's device leases on every node, its ranks and its workers (idempotent)."""
    tx.execute("DELETE FROM training_device_leases WHERE job_id = ?", (job_id,))
    tx.execute("DELETE FROM training_job_ranks WHERE job_id = ?", (job_id,))
    tx.execute("UPDATE training_workers SET job_id = NULL WHERE job_id = ?", (job_id,))


def _requeue(tx: Transaction, job_id: str, error: str) -> None:
    """Put a RUNNING job back in the queue in its place (its attempt over: no worker, node,
    devices or rendezvous) and free its leases, ranks and workers."""
    tx.execute(
        "UPDATE training_jobs SET state = 'QUEUED', node = NULL, gpus_json = '[]',"
        " mig_device = '', rendezvous_json = '', worker = NULL, error = ? WHERE job_id = ?",
        (error, job_id),
    )
    _release(tx, job_id)


def _assigned(tx: Transaction, worker: str) -> builtins.list[tuple[str, int]]:
    """(job id, node rank) of the current attempts' ranks waiting for ``worker`` to start."""
    return [
        (r[0], int(r[1]))
        for r in tx.fetchall(
            "SELECT r.job_id, r.node_rank FROM training_job_ranks r JOIN training_jobs j"
            " ON j.job_id = r.job_id WHERE r.worker = ? AND r.state = 'ASSIGNED'"
            " AND j.state = 'RUNNING' AND r.attempt = j.attempts ORDER BY r.job_id",
            (worker,),
        )
    ]


def _used(tx: Transaction, node: str) -> dict[str, int]:
    """Shares leased per device of ``node``."""
    return {
        str(r[0]): int(r[1])
        for r in tx.fetchall(
            "SELECT device, SUM(share_milli) FROM training_device_leases WHERE node = ?"
            " GROUP BY device",
            (node,),
        )
    }


def _lease(tx: Transaction, node: str, job_id: str, pick: Admission, now: int) -> None:
    rows = [(node, gpu_key(g), job_id, pick.share_milli, now) for g in pick.gpus]
    if pick.mig_device:
        rows.append((node, pick.mig_device, job_id, MILLI, now))
    if rows:
        tx.executemany(
            "INSERT INTO training_device_leases (node, device, job_id, share_milli,"
            " leased_at_us) VALUES (?, ?, ?, ?, ?)",
            rows,
        )


class _Peer(msgspec.Struct, frozen=True):
    worker: str
    node: str
    gpus: tuple[int, ...]


class JobQueue:
    """Submit, claim, heartbeat and finish training jobs (thread-safe; one per process).

    ``gpus_per_node`` is the configured GPU inventory of a node (settings
    ``training_gpus_per_node``); with the inventories workers declared when claiming, it
    bounds what a job may ask for at submit. ``backfill_window_s``: see
    :mod:`carrara.training.scheduler`.

    Multi-node jobs (``resources.nodes = N``) are admitted all or nothing: the claiming worker
    becomes node rank 0 only when ``N - 1`` other workers, each on its own node, are idle
    (they claimed within ``worker_presence_s``) and their nodes have the GPUs free; their
    ranks and leases are written in the same transaction, and each of them receives its rank
    from its next :meth:`claim`. An attempt that fails on any node (:meth:`fail_attempt`, or a
    rank whose worker stops heartbeating) is requeued in its FIFO place to resume from its
    checkpoint, until ``max_attempts`` attempts have failed.
    """

    def __init__(
        self,
        db: Database,
        *,
        events: EventLog | None = None,
        lease_timeout_s: float = 60.0,
        upgrade: bool = True,
        gpus_per_node: int = 0,
        backfill_window_s: float = DEFAULT_BACKFILL_WINDOW_S,
        data_roots: Sequence[str] | None = None,
        max_attempts: int = 3,
        worker_presence_s: float = 15.0,
    ) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.worker_presence_s = worker_presence_s
        self.events = events
        self.lease_timeout_s = lease_timeout_s
        self.gpus_per_node = gpus_per_node
        self.backfill_window_s = backfill_window_s
        #: Folders a spec's label source must lie under (None: any, the embedded default;
        #: servers pass ``Settings.resolved_data_roots``).
        self.data_roots = None if data_roots is None else tuple(data_roots)
        if upgrade:
            db.migrate("training", MIGRATIONS)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        events: EventLog | None = None,
        lease_timeout_s: float = 60.0,
        gpus_per_node: int = 0,
        backfill_window_s: float = DEFAULT_BACKFILL_WINDOW_S,
        data_roots: Sequence[str] | None = None,
        max_attempts: int = 3,
        worker_presence_s: float = 15.0,
    ) -> JobQueue:
        return cls(
            connect(url),
            events=events,
            lease_timeout_s=lease_timeout_s,
            gpus_per_node=gpus_per_node,
            backfill_window_s=backfill_window_s,
            data_roots=data_roots,
            max_attempts=max_attempts,
            worker_presence_s=worker_presence_s,
        )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events -----------------------------------------------------------------------------

    def _publish(self, job: Job) -> None:
        if self.events is None:
            return
        event = JobEvent(
            job_id=job.job_id,
            model_name=job.model_name,
            state=job.state,
            at_us=_now_us(),
            attempt=job.attempts,
            worker=job.worker or "",
            error=job.error,
            result=job.result,
            trigger=job.trigger,
        )
        self.events.append(Topic.TRAINING_EVENTS, msgspec.json.encode(event))

    # -- API --------------------------------------------------------------------------------

    def known_inventories(self) -> builtins.list[NodeInventory]:
        """The device inventories workers declared, plus the configured GPUs per node."""
        with self.db.transaction() as tx:
            rows = tx.fetchall("SELECT gpus_json, mig_json FROM training_nodes")
        out = [
            NodeInventory(tuple(_gpus_decoder.decode(r[0])), tuple(_mig_decoder.decode(r[1])))
            for r in rows
        ]
        if self.gpus_per_node:
            out.append(NodeInventory(tuple(range(self.gpus_per_node))))
        return out

    def known_gpus_per_node(self) -> int:
        """The largest GPU inventory of a node: configured, or declared by a worker."""
        return max((len(i.gpus) for i in self.known_inventories()), default=0)

    def validate(self, spec: JobSpec, *, features: FeatureService | None = None) -> None:
        """Everything :meth:`submit` checks, without queueing (InvalidArgumentError; with
        ``data_roots``, PermissionDeniedError for a label source outside them, and
        InvalidArgumentError for a label file that is missing, unreadable or lacks the
        spec's columns: only its schema/header is read)."""
        from .spec import check_label_source, label_file_problems, validate_spec

        r = spec.resources
        problem = inventory_problem(r.gpus, self.known_inventories(), mig=r.mig)
        try:
            validate_spec(spec, features=features)
        except InvalidArgumentError as exc:
            if problem is not None:
                raise InvalidArgumentError(f"{exc}; {problem}") from exc
            raise
        if problem is not None:
            raise InvalidArgumentError(f"invalid training job spec: {problem}")
        if self.data_roots is not None:
            path = check_label_source(spec.dataset.label_source, self.data_roots)
            file_problems = label_file_problems(path, spec)
            if file_problems:
                raise InvalidArgumentError("invalid training job spec: " + "; ".join(file_problems))

    def submit(
        self,
        spec: JobSpec,
        *,
        submitted_by: str = "",
        features: FeatureService | None = None,
        trigger: str = "",
    ) -> Job:
        """Validate the spec (features against the catalog when ``features`` is given; GPUs
        against the known node inventories) and queue the job; an invalid spec raises
        InvalidArgumentError and queues nothing."""
        self.validate(spec, features=features)
        with self.db.transaction() as tx:
            job = self._insert(tx, spec, submitted_by=submitted_by, trigger=trigger)
        self._publish(job)
        return job

    def _insert(self, tx: Transaction, spec: JobSpec, *, submitted_by: str, trigger: str) -> Job:
        """Queue an already validated spec inside ``tx`` (the caller publishes the event)."""
        job_id = uuid.uuid4().hex
        tx.execute(
            "INSERT INTO training_jobs (job_id, model_name, spec_json, state, submitted_by,"
            " submitted_at_us, gpus_requested, trigger_name, gpu_share_milli, mig_profile,"
            " nodes_requested) VALUES (?, ?, ?, 'QUEUED', ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                spec.model_name,
                spec.to_json(),
                submitted_by,
                _now_us(),
                spec.resources.whole_gpus,
                trigger,
                spec.resources.gpu_share_milli,
                spec.resources.mig,
                spec.resources.nodes,
            ),
        )
        return self._get(tx, job_id)

    def _get(self, tx: Transaction, job_id: str, *, lock: bool = False) -> Job:
        sql = f"SELECT {_COLUMNS} FROM training_jobs WHERE job_id = ?"
        if lock and tx.dialect == "postgresql":
            sql += " FOR UPDATE"
        row = tx.fetchone(sql, (job_id,))
        if row is None:
            raise NotFoundError(f"training job {job_id!r} does not exist")
        return _row(row)

    def get(self, job_id: str) -> Job:
        with self.db.transaction() as tx:
            return self._get(tx, job_id)

    def list(
        self, *, state: str | None = None, limit: int = 100, trigger: str | None = None
    ) -> builtins.list[Job]:
        """Jobs, newest first, optionally in one state and/or from one trigger."""
        if state is not None and state not in STATES:
            raise InvalidArgumentError(f"unknown job state {state!r}; known: {', '.join(STATES)}")
        if limit < 1:
            raise InvalidArgumentError(f"limit must be >= 1, got {limit}")
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state:
            clauses.append("state = ?")
            params.append(state)
        if trigger is not None:
            clauses.append("trigger_name = ?")
            params.append(trigger)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {_COLUMNS} FROM training_jobs {where}"
                " ORDER BY submitted_at_us DESC, job_id DESC LIMIT ?",
                (*params, limit),
            )
        return [_row(r) for r in rows]

    def leases(self, node: str | None = None) -> dict[tuple[str, int], str]:
        """Current whole-GPU leases: (node, gpu id) -> job id (shares and MIG instances:
        :meth:`device_leases`)."""
        return {
            (n, int(d)): job
            for n, d, job, share in self.device_leases(node)
            if d.isdigit() and share == MILLI
        }

    def device_leases(self, node: str | None = None) -> builtins.list[tuple[str, str, str, int]]:
        """Every lease: (node, device, job id, shares of ``MILLI``), by node and device."""
        sql = "SELECT node, device, job_id, share_milli FROM training_device_leases"
        with self.db.transaction() as tx:
            rows = (
                tx.fetchall(sql + " ORDER BY node, device, job_id")
                if node is None
                else tx.fetchall(sql + " WHERE node = ? ORDER BY device, job_id", (node,))
            )
        return [(r[0], str(r[1]), r[2], int(r[3])) for r in rows]

    def ranks(self, job_id: str) -> builtins.list[Rank]:
        """The nodes of a multi-node job's current attempt, by node rank."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                "SELECT node_rank, worker, node, gpus_json, state, heartbeat_at_us"
                " FROM training_job_ranks WHERE job_id = ? ORDER BY node_rank",
                (job_id,),
            )
        return [
            Rank(
                node_rank=int(r[0]),
                worker=r[1],
                node=r[2],
                gpus=_gpus_decoder.decode(r[3]),
                state=r[4],
                heartbeat_at_us=int(r[5]),
            )
            for r in rows
        ]

    def _reap_stale(self) -> None:
        """Jobs whose worker stopped heartbeating: CANCELLED when a cancel was requested,
        else back to QUEUED (keeping their place by submit time); either way their GPUs are
        released. The old worker is fenced by state/attempt checks on every later call."""
        now = _now_us()
        stale = now - int(self.lease_timeout_s * 1_000_000)
        changed: builtins.list[Job] = []
        with self.db.transaction() as tx:
            lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
            for stale_id, cancel in tx.fetchall(
                "SELECT job_id, cancel_requested FROM training_jobs WHERE state = 'RUNNING'"
                " AND (heartbeat_at_us < ? OR job_id IN (SELECT job_id FROM training_job_ranks"
                " WHERE state IN ('ASSIGNED', 'RUNNING') AND heartbeat_at_us < ?))" + lock,
                (stale, stale),
            ):
                if cancel:
                    tx.execute(
                        "UPDATE training_jobs SET state = 'CANCELLED', finished_at_us = ?,"
                        " error = 'cancelled' WHERE job_id = ?",
                        (now, stale_id),
                    )
                else:
                    tx.execute(
                        "UPDATE training_jobs SET state = 'QUEUED', node = NULL, gpus_json = '[]',"
                        " mig_device = '', rendezvous_json = '', error = ? WHERE job_id = ?",
                        ("a worker of the job stopped heartbeating; requeued", stale_id),
                    )
                _release(tx, stale_id)
                changed.append(self._get(tx, stale_id))
        for job in changed:
            self._publish(job)

    def claim(
        self,
        worker: str | None = None,
        *,
        node: str | None = None,
        gpus: Sequence[int] = (),
        mig: Sequence[MigDevice] = (),
    ) -> Job | None:
        """Start the first admissible queued job (see :mod:`carrara.training.scheduler`) on
        this worker, or hand it the rank of a multi-node job another worker admitted it to;
        ``gpus`` / ``mig`` are the devices the worker's ``node`` may use. The job's devices
        are leased in the same transaction, all or none (on every node of a multi-node job);
        ``Job.gpus`` / ``Job.mig_device`` list this node's."""
        worker = worker or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        node = node or socket.gethostname()
        if any(int(g) < 0 for g in gpus):
            raise InvalidArgumentError(f"GPU ids must be >= 0, got {list(gpus)}")
        inventory = NodeInventory(tuple(sorted({int(g) for g in gpus})), tuple(mig))
        self._reap_stale()
        now = _now_us()
        gang: dict[str, builtins.list[_Peer]] = {}
        with self.db.transaction() as tx:
            pg = tx.dialect == "postgresql"
            if pg and not inventory.empty:
                # One claimer per node at a time computes its free devices and leases them;
                # other nodes' claimers and releases run concurrently.
                tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"carrara-gpus:{node}",))
            # This worker is idle (it is claiming): present, and free for a gang. The row lock
            # makes a gang forming elsewhere skip it while it claims.
            tx.execute(
                "INSERT INTO training_workers (worker, node, address, seen_at_us, job_id)"
                " VALUES (?, ?, '', ?, NULL) ON CONFLICT (worker) DO UPDATE SET"
                " node = excluded.node, seen_at_us = excluded.seen_at_us, job_id = NULL",
                (worker, node, now),
            )
            for assigned_job, node_rank in _assigned(tx, worker)[:1]:
                tx.execute(
                    "UPDATE training_job_ranks SET state = 'RUNNING', heartbeat_at_us = ?"
                    " WHERE job_id = ? AND node_rank = ?",
                    (now, assigned_job, node_rank),
                )
                tx.execute(
                    "UPDATE training_workers SET job_id = ? WHERE worker = ?",
                    (assigned_job, worker),
                )
                return self._rank_view(tx, assigned_job, node_rank)
            if not inventory.empty:
                tx.execute(
                    "INSERT INTO training_nodes (node, gpus_json, seen_at_us, mig_json)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (node) DO UPDATE SET"
                    " gpus_json = excluded.gpus_json, seen_at_us = excluded.seen_at_us,"
                    " mig_json = excluded.mig_json",
                    (
                        node,
                        msgspec.json.encode(list(inventory.gpus)).decode(),
                        now,
                        msgspec.json.encode(list(inventory.mig)).decode(),
                    ),
                )
            used = _used(tx, node) if not inventory.empty else {}
            candidates = [
                Candidate(r[0], int(r[1]), int(r[2]), int(r[3]), r[4], int(r[5]))
                for r in tx.fetchall(
                    "SELECT job_id, gpus_requested, submitted_at_us, gpu_share_milli,"
                    " mig_profile, nodes_requested FROM training_jobs WHERE state = 'QUEUED'"
                    " ORDER BY submitted_at_us, job_id LIMIT 1000"
                )
            ]

            def gang_ready(c: Candidate, _here: Admission) -> bool:
                peers = self._peers(tx, c, node=node, worker=worker, now=now)
                if peers is None:
                    return False
                gang[c.job_id] = peers
                return True

            while True:
                pick = choose(
                    candidates,
                    inventory=inventory,
                    leased=used,
                    now_us=now,
                    backfill_window_s=self.backfill_window_s,
                    gang_ready=gang_ready,
                )
                if pick is None:
                    return None
                if pg:
                    # Another claimer may hold or have taken it: skip to the next choice.
                    got = tx.fetchone(
                        "SELECT job_id FROM training_jobs WHERE job_id = ? AND state = 'QUEUED'"
                        " FOR UPDATE SKIP LOCKED",
                        (pick.job_id,),
                    )
                    if got is None:
                        candidates = [c for c in candidates if c.job_id != pick.job_id]
                        continue
                break
            tx.execute(
                "UPDATE training_jobs SET state = 'RUNNING', worker = ?, started_at_us = ?,"
                " heartbeat_at_us = ?, attempts = attempts + 1, error = '', node = ?,"
                " gpus_json = ?, mig_device = ?, rendezvous_json = '', cancel_requested = 0"
                " WHERE job_id = ?",
                (
                    worker,
                    now,
                    now,
                    node,
                    msgspec.json.encode(list(pick.gpus)).decode(),
                    pick.mig_device,
                    pick.job_id,
                ),
            )
            _lease(tx, node, pick.job_id, pick, now)
            tx.execute(
                "UPDATE training_workers SET job_id = ? WHERE worker = ?", (pick.job_id, worker)
            )
            job = self._get(tx, pick.job_id)
            peers = gang.get(pick.job_id)
            if peers is not None:
                self._form_gang(tx, job, _Peer(worker, node, pick.gpus), peers, now)
        self._publish(job)
        return job

    def _peers(
        self, tx: Transaction, c: Candidate, *, node: str, worker: str, now: int
    ) -> builtins.list[_Peer] | None:
        """Idle workers on ``c.nodes - 1`` other nodes whose GPUs fit ``c`` now (one per
        node), or None. On PostgreSQL their rows and nodes are locked for this transaction
        (skipping any another claimer holds, so two gangs never share a worker)."""
        pg = tx.dialect == "postgresql"
        rows = tx.fetchall(
            "SELECT w.worker, w.node, n.gpus_json FROM training_workers w"
            " LEFT JOIN training_nodes n ON n.node = w.node WHERE w.job_id IS NULL"
            " AND w.seen_at_us >= ? AND w.node <> ? AND w.worker <> ?"
            " ORDER BY w.node, w.seen_at_us DESC, w.worker",
            (now - int(self.worker_presence_s * 1_000_000), node, worker),
        )
        peers: builtins.list[_Peer] = []
        taken: set[str] = set()
        for peer_worker, peer_node, gpus_json in rows:
            if len(peers) == c.nodes - 1:
                break
            if peer_node in taken:
                continue
            gpus: tuple[int, ...] = ()
            if c.gpus > 0:
                inv = NodeInventory(tuple(_gpus_decoder.decode(gpus_json or "[]")))
                if pg:
                    got = tx.fetchone(
                        "SELECT pg_try_advisory_xact_lock(hashtext(?))",
                        (f"carrara-gpus:{peer_node}",),
                    )
                    if got is None or not got[0]:
                        continue  # that node's claimer is busy: try another node
                free = free_whole_gpus(inv, _used(tx, peer_node))
                if len(free) < c.gpus:
                    continue
                gpus = tuple(free[: c.gpus])
            if pg and (
                tx.fetchone(
                    "SELECT worker FROM training_workers WHERE worker = ? AND job_id IS NULL"
                    " FOR UPDATE SKIP LOCKED",
                    (peer_worker,),
                )
                is None
            ):
                continue
            peers.append(_Peer(peer_worker, peer_node, gpus))
            taken.add(peer_node)
        return peers if len(peers) == c.nodes - 1 else None

    def _form_gang(
        self, tx: Transaction, job: Job, leader: _Peer, peers: Sequence[_Peer], now: int
    ) -> None:
        """Write the ranks of a multi-node attempt and lease the followers' GPUs."""
        rows = [(job.job_id, 0, job.attempts, leader.worker, leader.node, leader.gpus, "RUNNING")]
        rows += [
            (job.job_id, r, job.attempts, p.worker, p.node, p.gpus, "ASSIGNED")
            for r, p in enumerate(peers, start=1)
        ]
        tx.executemany(
            "INSERT INTO training_job_ranks (job_id, node_rank, attempt, worker, node, gpus_json,"
            " state, heartbeat_at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*r[:5], msgspec.json.encode(list(r[5])).decode(), r[6], now) for r in rows],
        )
        for p in peers:
            _lease(tx, p.node, job.job_id, Admission(job.job_id, p.gpus), now)
            tx.execute(
                "UPDATE training_workers SET job_id = ? WHERE worker = ?", (job.job_id, p.worker)
            )

    def _rank_view(self, tx: Transaction, job_id: str, node_rank: int) -> Job:
        """The job as the worker holding ``node_rank`` sees it (its node and GPUs)."""
        job = self._get(tx, job_id)
        row = tx.fetchone(
            "SELECT worker, node, gpus_json FROM training_job_ranks WHERE job_id = ?"
            " AND node_rank = ?",
            (job_id, node_rank),
        )
        if row is None:
            raise NotFoundError(f"training job {job_id} has no node rank {node_rank}")
        return msgspec.structs.replace(
            job,
            node_rank=node_rank,
            rank_worker=row[0],
            node=row[1],
            gpus=_gpus_decoder.decode(row[2]),
            mig_device="",
        )

    def _owned_rank(self, tx: Transaction, job: Job) -> Job:
        current = self._get(tx, job.job_id, lock=True)
        row = tx.fetchone(
            "SELECT worker FROM training_job_ranks WHERE job_id = ? AND node_rank = ?"
            " AND attempt = ?",
            (job.job_id, job.node_rank, job.attempts),
        )
        if (
            current.state != "RUNNING"
            or current.attempts != job.attempts
            or row is None
            or row[0] != job.rank_worker
        ):
            raise FailedPreconditionError(
                f"training job {job.job_id}: node rank {job.node_rank} of attempt "
                f"{job.attempts} is no longer held by {job.rank_worker!r}; the job is "
                f"{current.state} (attempt {current.attempts})"
            )
        return current

    def publish_rendezvous(self, job: Job, rendezvous: Rendezvous) -> Job:
        """Rank 0 says where the other nodes meet it (and where its inputs are)."""
        with self.db.transaction() as tx:
            self._owned(tx, job)
            tx.execute(
                "UPDATE training_jobs SET rendezvous_json = ? WHERE job_id = ?",
                (msgspec.json.encode(rendezvous).decode(), job.job_id),
            )
            return self._get(tx, job.job_id)

    def rendezvous(self, job: Job) -> Rendezvous | None:
        """The rendezvous rank 0 published for this attempt (None: not yet); raises
        FailedPreconditionError once the attempt is over."""
        with self.db.transaction() as tx:
            current = self._get(tx, job.job_id)
        if current.state != "RUNNING" or current.attempts != job.attempts:
            raise FailedPreconditionError(
                f"training job {job.job_id} attempt {job.attempts} is over ({current.state}, "
                f"attempt {current.attempts})"
            )
        return current.rendezvous

    def rank_done(self, job: Job) -> None:
        """A follower's ranks finished: its worker is free (the leader completes the job)."""
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE training_job_ranks SET state = 'DONE' WHERE job_id = ? AND node_rank = ?"
                " AND attempt = ? AND worker = ?",
                (job.job_id, job.node_rank, job.attempts, job.rank_worker),
            )
            tx.execute(
                "UPDATE training_workers SET job_id = NULL WHERE worker = ? AND job_id = ?",
                (job.rank_worker, job.job_id),
            )

    def leave(self, worker: str) -> None:
        """The worker stops taking jobs (it is shutting down or was preempted): no gang is
        formed with it any more, and a multi-node job it was admitted to but had not started
        goes back to the queue."""
        requeued: builtins.list[Job] = []
        with self.db.transaction() as tx:
            for job_id, _ in _assigned(tx, worker):
                _requeue(tx, job_id, f"worker {worker} left before its node rank started; requeued")
                requeued.append(self._get(tx, job_id))
            tx.execute("DELETE FROM training_workers WHERE worker = ?", (worker,))
        for job in requeued:
            self._publish(job)

    def fail_attempt(self, job: Job, error: str) -> Job:
        """An attempt failed on some node (a rank died, a node was lost): the job goes back to
        the queue in its place to resume from its last checkpoint, or FAILED once
        ``max_attempts`` of its attempts have failed (attempts handed back for a preemption or
        requeued after a silent worker do not count). Any node of the attempt may call this;
        only the first call for an attempt acts."""
        return self._end_attempt(job, error, failed=True)

    def hand_back_attempt(self, job: Job, reason: str) -> Job:
        """A node of a multi-node attempt is going away (preempted) before its ranks started:
        the attempt ends and the job goes back to the queue, not counted as a failure. Any
        node of the attempt may call this; only the first call for an attempt acts."""
        return self._end_attempt(job, reason, failed=False)

    def _end_attempt(self, job: Job, error: str, *, failed: bool) -> Job:
        with self.db.transaction() as tx:
            current = self._get(tx, job.job_id, lock=True)
            if current.state != "RUNNING" or current.attempts != job.attempts:
                return current
            where = f"node rank {job.node_rank}" if current.nodes > 1 else "the job"
            row = tx.fetchone(
                "SELECT failed_attempts FROM training_jobs WHERE job_id = ?", (job.job_id,)
            )
            failures = (int(row[0]) if row is not None else 0) + (1 if failed else 0)
            tx.execute(
                "UPDATE training_jobs SET failed_attempts = ? WHERE job_id = ?",
                (failures, job.job_id),
            )
            what = "failed" if failed else "was handed back"
            if failed and failures >= self.max_attempts:
                tx.execute(
                    "UPDATE training_jobs SET state = 'FAILED', finished_at_us = ?, error = ?"
                    " WHERE job_id = ?",
                    (_now_us(), f"attempt {current.attempts} failed on {where}: {error}",
                     job.job_id),
                )  # fmt: skip
                _release(tx, job.job_id)
            else:
                _requeue(
                    tx,
                    job.job_id,
                    f"attempt {current.attempts} {what} on {where}: {error}; requeued",
                )
            after = self._get(tx, job.job_id)
        self._publish(after)
        return after

    def _owned(self, tx: Transaction, job: Job) -> Job:
        current = self._get(tx, job.job_id, lock=True)
        if (
            current.state != "RUNNING"
            or current.worker != job.worker
            or current.attempts != job.attempts
        ):
            raise FailedPreconditionError(
                f"training job {job.job_id} is no longer held by {job.worker!r} "
                f"(attempt {job.attempts}); it is {current.state} on {current.worker!r} "
                f"(attempt {current.attempts})"
            )
        return current

    def heartbeat(self, job: Job) -> bool:
        """Extend the lease; returns True when a cancel was requested (stop and call
        :meth:`cancelled`). Raises FailedPreconditionError when the lease was lost. A
        follower of a multi-node job extends its rank's lease."""
        now = _now_us()
        with self.db.transaction() as tx:
            if job.node_rank > 0:
                current = self._owned_rank(tx, job)
                tx.execute(
                    "UPDATE training_job_ranks SET heartbeat_at_us = ? WHERE job_id = ?"
                    " AND node_rank = ?",
                    (now, job.job_id, job.node_rank),
                )
                return current.cancel_requested
            current = self._owned(tx, job)
            tx.execute(
                "UPDATE training_jobs SET heartbeat_at_us = ? WHERE job_id = ?", (now, job.job_id)
            )
            tx.execute(
                "UPDATE training_job_ranks SET heartbeat_at_us = ? WHERE job_id = ?"
                " AND node_rank = 0",
                (now, job.job_id),
            )
        return current.cancel_requested

    def _finish(
        self, job: Job, state: JobState, *, error: str = "", result: dict[str, Any] | None = None
    ) -> Job:
        with self.db.transaction() as tx:
            self._owned(tx, job)
            tx.execute(
                "UPDATE training_jobs SET state = ?, finished_at_us = ?, error = ?,"
                " result_json = ? WHERE job_id = ?",
                (
                    state,
                    _now_us(),
                    error,
                    msgspec.json.encode(result or {}).decode(),
                    job.job_id,
                ),
            )
            _release(tx, job.job_id)
            done = self._get(tx, job.job_id)
        self._publish(done)
        return done

    def complete(self, job: Job, result: dict[str, Any] | None = None) -> Job:
        return self._finish(job, "SUCCEEDED", result=result)

    def fail(self, job: Job, error: str) -> Job:
        return self._finish(job, "FAILED", error=error)

    def cancelled(self, job: Job) -> Job:
        """The worker acknowledges a cancel request: RUNNING -> CANCELLED."""
        return self._finish(job, "CANCELLED", error="cancelled")

    def release(self, job: Job, reason: str = "worker stopped; requeued") -> Job:
        """The worker gives a RUNNING job back (it is shutting down): QUEUED again in its
        original place, GPUs released, checkpoints kept for the next attempt to resume."""
        with self.db.transaction() as tx:
            self._owned(tx, job)
            _requeue(tx, job.job_id, reason)
            back = self._get(tx, job.job_id)
        self._publish(back)
        return back

    def cancel(self, job_id: str) -> Job:
        """QUEUED -> CANCELLED now; RUNNING -> a cancel request its worker acts on."""
        with self.db.transaction() as tx:
            job = self._get(tx, job_id, lock=True)
            if job.state in TERMINAL:
                raise FailedPreconditionError(
                    f"training job {job_id} is already {job.state}; nothing to cancel"
                )
            if job.state == "QUEUED":
                tx.execute(
                    "UPDATE training_jobs SET state = 'CANCELLED', finished_at_us = ?,"
                    " error = 'cancelled' WHERE job_id = ?",
                    (_now_us(), job_id),
                )
                _release(tx, job_id)
            else:
                tx.execute(
                    "UPDATE training_jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,)
                )
            job = self._get(tx, job_id)
        if job.state == "CANCELLED":
            self._publish(job)
        return job

    # -- logs -------------------------------------------------------------------------------

    def log(self, job_id: str, message: str, level: str = "INFO") -> LogLine:
        """Append one line to the job's log (any state; the worker records progress here)."""
        level = level.upper()
        if level not in LOG_LEVELS:
            raise InvalidArgumentError(
                f"unknown log level {level!r}; known: {', '.join(LOG_LEVELS)}"
            )
        if len(message) > MAX_LOG_MESSAGE:
            message = (
                message[:MAX_LOG_MESSAGE] + f"... [{len(message) - MAX_LOG_MESSAGE} chars cut]"
            )
        now = _now_us()
        with self.db.transaction() as tx:
            # Locking the job row serializes writers of one job, so seq = max + 1 is gapless
            # and lines commit in seq order (a follower reading ``after=seq`` misses none).
            self._get(tx, job_id, lock=True)
            row = tx.fetchone(
                "SELECT COALESCE(MAX(seq), 0) FROM training_job_logs WHERE job_id = ?", (job_id,)
            )
            seq = int(row[0]) + 1 if row is not None else 1
            tx.execute(
                "INSERT INTO training_job_logs (job_id, seq, ts_us, level, message)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, seq, now, level, message),
            )
        return LogLine(seq=seq, ts_us=now, level=level, message=message)

    def logs(self, job_id: str, after: int = 0, *, limit: int = 10_000) -> builtins.list[LogLine]:
        """The job's log lines with ``seq > after``, oldest first (NotFoundError for an
        unknown job)."""
        with self.db.transaction() as tx:
            self._get(tx, job_id)
            rows = tx.fetchall(
                "SELECT seq, ts_us, level, message FROM training_job_logs"
                " WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, limit),
            )
        return [LogLine(seq=int(r[0]), ts_us=int(r[1]), level=r[2], message=r[3]) for r in rows]
