"""The durable training job queue, in the registry database.

States: ``QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED`` (a queued job can be cancelled
directly; a running one gets a cancel request its worker sees on the next heartbeat). Workers
claim with ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite ``BEGIN IMMEDIATE``
already serializes claimers. A RUNNING job whose heartbeat is older than ``lease_timeout_s``
can be claimed again (its worker is presumed dead); completion is fenced on the claiming
worker and attempt, so a presumed-dead worker that wakes up cannot overwrite the new run.
Every state change is published to the ``training-events`` topic when an event log is given.
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

if TYPE_CHECKING:
    from carrara.eventlog import EventLog
    from carrara.feature_cache.service import FeatureService

    from .spec import JobSpec

__all__ = [
    "EVENTS_TOPIC",
    "MIGRATIONS",
    "STATES",
    "Job",
    "JobEvent",
    "JobQueue",
    "JobState",
    "upgrade",
]

JobState = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
STATES: tuple[JobState, ...] = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL: frozenset[str] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
EVENTS_TOPIC = "training-events"

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
    )
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

    def spec(self) -> JobSpec:
        from .spec import JobSpec

        return msgspec.json.decode(self.spec_json, type=JobSpec)


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


_COLUMNS = (
    "job_id, model_name, spec_json, state, submitted_by, submitted_at_us, started_at_us,"
    " finished_at_us, heartbeat_at_us, worker, attempts, cancel_requested, error, result_json"
)
_result_decoder = msgspec.json.Decoder(dict[str, Any])


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
    )


class JobQueue:
    """Submit, claim, heartbeat and finish training jobs (thread-safe; one per process)."""

    def __init__(
        self,
        db: Database,
        *,
        events: EventLog | None = None,
        lease_timeout_s: float = 60.0,
        upgrade: bool = True,
    ) -> None:
        self.db = db
        self.events = events
        self.lease_timeout_s = lease_timeout_s
        if upgrade:
            db.migrate("training", MIGRATIONS)

    @classmethod
    def open(
        cls, url: str, *, events: EventLog | None = None, lease_timeout_s: float = 60.0
    ) -> JobQueue:
        return cls(connect(url), events=events, lease_timeout_s=lease_timeout_s)

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
        )
        self.events.append(EVENTS_TOPIC, msgspec.json.encode(event))

    # -- API --------------------------------------------------------------------------------

    def submit(
        self, spec: JobSpec, *, submitted_by: str = "", features: FeatureService | None = None
    ) -> Job:
        """Validate the spec (features against the catalog when ``features`` is given) and
        queue the job; an invalid spec raises InvalidArgumentError and queues nothing."""
        from .spec import validate_spec

        validate_spec(spec, features=features)
        job_id = uuid.uuid4().hex
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO training_jobs (job_id, model_name, spec_json, state, submitted_by,"
                " submitted_at_us) VALUES (?, ?, ?, 'QUEUED', ?, ?)",
                (job_id, spec.model_name, spec.to_json(), submitted_by, _now_us()),
            )
            job = self._get(tx, job_id)
        self._publish(job)
        return job

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

    def list(self, *, state: str | None = None, limit: int = 100) -> builtins.list[Job]:
        """Jobs, newest first, optionally in one state."""
        if state is not None and state not in STATES:
            raise InvalidArgumentError(f"unknown job state {state!r}; known: {', '.join(STATES)}")
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {_COLUMNS} FROM training_jobs {where}"
                " ORDER BY submitted_at_us DESC, job_id DESC LIMIT ?",
                (*params, limit),
            )
        return [_row(r) for r in rows]

    def claim(self, worker: str | None = None) -> Job | None:
        """Take the oldest queued job (or one whose worker stopped heartbeating)."""
        worker = worker or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        now = _now_us()
        stale = now - int(self.lease_timeout_s * 1_000_000)
        abandoned: builtins.list[Job] = []
        with self.db.transaction() as tx:
            # A stale job whose cancel was requested is not rerun: it ends CANCELLED.
            lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
            for (stale_id,) in tx.fetchall(
                "SELECT job_id FROM training_jobs WHERE state = 'RUNNING'"
                " AND heartbeat_at_us < ? AND cancel_requested = 1" + lock,
                (stale,),
            ):
                tx.execute(
                    "UPDATE training_jobs SET state = 'CANCELLED', finished_at_us = ?,"
                    " error = 'cancelled' WHERE job_id = ?",
                    (now, stale_id),
                )
                abandoned.append(self._get(tx, stale_id))
        for job in abandoned:
            self._publish(job)
        with self.db.transaction() as tx:
            sql = (
                f"SELECT {_COLUMNS} FROM training_jobs"
                " WHERE state = 'QUEUED'"
                " OR (state = 'RUNNING' AND heartbeat_at_us < ? AND cancel_requested = 0)"
                " ORDER BY submitted_at_us, job_id LIMIT 1"
            )
            if tx.dialect == "postgresql":
                sql += " FOR UPDATE SKIP LOCKED"
            row = tx.fetchone(sql, (stale,))
            if row is None:
                return None
            job_id = row[0]
            tx.execute(
                "UPDATE training_jobs SET state = 'RUNNING', worker = ?, started_at_us = ?,"
                " heartbeat_at_us = ?, attempts = attempts + 1, error = '' WHERE job_id = ?",
                (worker, now, now, job_id),
            )
            job = self._get(tx, job_id)
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
            else:
                tx.execute(
                    "UPDATE training_jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,)
                )
            job = self._get(tx, job_id)
        if job.state == "CANCELLED":
            self._publish(job)
        return job
