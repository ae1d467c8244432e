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

from .scheduler import DEFAULT_BACKFILL_WINDOW_S, Candidate, choose, inventory_problem

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

    def spec(self) -> JobSpec:
        from .spec import JobSpec

        return msgspec.json.decode(self.spec_json, type=JobSpec)


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
    " gpus_requested, node, gpus_json, trigger_name"
)
_result_decoder = msgspec.json.Decoder(dict[str, Any])
_gpus_decoder = msgspec.json.Decoder(list[int])


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
    )


def _release(tx: Transaction, job_id: str) -> None:
    """Free the job's GPU leases (idempotent)."""
    tx.execute("DELETE FROM training_gpu_leases WHERE job_id = ?", (job_id,))


class JobQueue:
    """Submit, claim, heartbeat and finish training jobs (thread-safe; one per process).

    ``gpus_per_node`` is the configured GPU inventory of a node (settings
    ``training_gpus_per_node``); with the inventories workers declared when claiming, it
    bounds what a job may ask for at submit. ``backfill_window_s``: see
    :mod:`carrara.training.scheduler`.
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
    ) -> None:
        self.db = db
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
    ) -> JobQueue:
        return cls(
            connect(url),
            events=events,
            lease_timeout_s=lease_timeout_s,
            gpus_per_node=gpus_per_node,
            backfill_window_s=backfill_window_s,
            data_roots=data_roots,
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

    def known_gpus_per_node(self) -> int:
        """The largest GPU inventory of a node: configured, or declared by a worker."""
        with self.db.transaction() as tx:
            rows = tx.fetchall("SELECT gpus_json FROM training_nodes")
        declared = [len(_gpus_decoder.decode(r[0])) for r in rows]
        return max([self.gpus_per_node, *declared])

    def validate(self, spec: JobSpec, *, features: FeatureService | None = None) -> None:
        """Everything :meth:`submit` checks, without queueing (InvalidArgumentError; with
        ``data_roots``, PermissionDeniedError for a label source outside them, and
        InvalidArgumentError for a label file that is missing, unreadable or lacks the
        spec's columns: only its schema/header is read)."""
        from .spec import check_label_source, label_file_problems, validate_spec

        problem = inventory_problem(spec.resources.gpus, self.known_gpus_per_node())
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
            " submitted_at_us, gpus_requested, trigger_name)"
            " VALUES (?, ?, ?, 'QUEUED', ?, ?, ?, ?)",
            (
                job_id,
                spec.model_name,
                spec.to_json(),
                submitted_by,
                _now_us(),
                spec.resources.gpus,
                trigger,
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
        """Current GPU leases: (node, gpu id) -> job id."""
        with self.db.transaction() as tx:
            if node is None:
                rows = tx.fetchall("SELECT node, gpu_id, job_id FROM training_gpu_leases")
            else:
                rows = tx.fetchall(
                    "SELECT node, gpu_id, job_id FROM training_gpu_leases WHERE node = ?", (node,)
                )
        return {(r[0], int(r[1])): r[2] for r in rows}

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
                " AND heartbeat_at_us < ?" + lock,
                (stale,),
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
                        " error = ? WHERE job_id = ?",
                        ("worker stopped heartbeating; requeued", stale_id),
                    )
                _release(tx, stale_id)
                changed.append(self._get(tx, stale_id))
        for job in changed:
            self._publish(job)

    def claim(
        self, worker: str | None = None, *, node: str | None = None, gpus: Sequence[int] = ()
    ) -> Job | None:
        """Start the first admissible queued job (see :mod:`carrara.training.scheduler`) on
        this worker; ``gpus`` are the GPU ids the worker's ``node`` may use. The job's GPUs
        are leased in the same transaction, all or none; ``Job.gpus`` lists them."""
        worker = worker or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        node = node or socket.gethostname()
        inventory = tuple(sorted({int(g) for g in gpus}))
        if any(g < 0 for g in inventory):
            raise InvalidArgumentError(f"GPU ids must be >= 0, got {list(gpus)}")
        self._reap_stale()
        now = _now_us()
        with self.db.transaction() as tx:
            pg = tx.dialect == "postgresql"
            if inventory:
                if pg:
                    # One claimer per node at a time computes its free GPUs and leases them;
                    # other nodes' claimers and releases run concurrently.
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtext(?))", (f"carrara-gpus:{node}",)
                    )
                tx.execute(
                    "INSERT INTO training_nodes (node, gpus_json, seen_at_us) VALUES (?, ?, ?)"
                    " ON CONFLICT (node) DO UPDATE SET gpus_json = excluded.gpus_json,"
                    " seen_at_us = excluded.seen_at_us",
                    (node, msgspec.json.encode(list(inventory)).decode(), now),
                )
                leased = [
                    int(r[0])
                    for r in tx.fetchall(
                        "SELECT gpu_id FROM training_gpu_leases WHERE node = ?", (node,)
                    )
                ]
            else:
                leased = []
            candidates = [
                Candidate(r[0], int(r[1]), int(r[2]))
                for r in tx.fetchall(
                    "SELECT job_id, gpus_requested, submitted_at_us FROM training_jobs"
                    " WHERE state = 'QUEUED' ORDER BY submitted_at_us, job_id LIMIT 1000"
                )
            ]
            while True:
                pick = choose(
                    candidates,
                    inventory=inventory,
                    leased=leased,
                    now_us=now,
                    backfill_window_s=self.backfill_window_s,
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
                " gpus_json = ?, cancel_requested = 0 WHERE job_id = ?",
                (
                    worker,
                    now,
                    now,
                    node,
                    msgspec.json.encode(list(pick.gpus)).decode(),
                    pick.job_id,
                ),
            )
            if pick.gpus:
                tx.executemany(
                    "INSERT INTO training_gpu_leases (node, gpu_id, job_id, leased_at_us)"
                    " VALUES (?, ?, ?, ?)",
                    [(node, g, pick.job_id, now) for g in pick.gpus],
                )
            job = self._get(tx, pick.job_id)
        self._publish(job)
        return job

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
        :meth:`cancelled`). Raises FailedPreconditionError when the lease was lost."""
        with self.db.transaction() as tx:
            current = self._owned(tx, job)
            tx.execute(
                "UPDATE training_jobs SET heartbeat_at_us = ? WHERE job_id = ?",
                (_now_us(), job.job_id),
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
            tx.execute(
                "UPDATE training_jobs SET state = 'QUEUED', node = NULL, gpus_json = '[]',"
                " worker = NULL, error = ? WHERE job_id = ?",
                (reason, job.job_id),
            )
            _release(tx, job.job_id)
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
