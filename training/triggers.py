"""Training triggers: submit a job from a stored spec when something happens.

A trigger is a name, a job spec template (submitted as is) and a kind:

- ``manual``: fires when asked (``carrara train triggers run NAME``, ``POST
  /training-triggers/{name}/run``);
- ``schedule``: a cron expression (:class:`CronSchedule`: 5 fields, @-aliases, ``L``/``W``/``#``,
  ``CRON_TZ=Zone`` prefix for a time zone with DST handled; UTC by default). The last
  minute checked is persisted with each decision, so a due minute fires at most once, across
  restarts and concurrent runners; after downtime a missed tick fires once (ticks older than a
  day are not caught up);
- ``new_data``: fires when new rows arrive for a feature group the spec reads, seen two ways:
  a ``feature-updates`` event for the group (streaming producers), and a new data file in the
  group's offline-store listing (batch ``ingest``/``write_offline`` appends, which publish no
  event). Compaction output (``*-c.parquet``) is not new data. The first look at a group
  records a baseline and fires nothing; files of a new group version all count as new;
- ``alert``: fires when a firing alert for the trigger's model (``model``, default the spec's
  ``model_name``) arrives on the ``alerts`` topic: drift or degradation retrains the model.

Coalescing: a trigger never has two runs QUEUED or RUNNING at once. Whatever arrives while a
run is active (events, due ticks, manual requests, any number of them) sets one ``pending``
flag, and exactly one follow-up run is submitted once the active run has finished, so data
that landed during a run is always trained on, without a pile of runs. Everything a poll sees
for one trigger collapses into at most one submit. The decision runs in one transaction with
the trigger's row locked (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so
concurrent runners cannot double-submit.

A trigger whose spec no longer validates (a feature was removed, GPUs shrank) submits
nothing: the decision is ``invalid``, its message is kept as ``last_error`` and what fired it
is dropped.

Events are read with the consumer group ``training-triggers`` (a restart resumes where it
stopped; events are acked after the decisions they cause are committed) and events older than
a trigger are ignored by it.
"""

from __future__ import annotations

import builtins
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from carrara.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from carrara.types import Topic

from .queue import Job, JobQueue
from .spec import JobSpec

if TYPE_CHECKING:
    from carrara.eventlog import Event, EventLog
    from carrara.feature_cache.service import FeatureService

__all__ = [
    "CONSUMER_GROUP",
    "KINDS",
    "CronSchedule",
    "Fire",
    "Trigger",
    "TriggerKind",
    "TriggerRunner",
    "TriggerStore",
]

log = logging.getLogger(__name__)

TriggerKind = Literal["manual", "schedule", "new_data", "alert"]
KINDS: tuple[TriggerKind, ...] = ("manual", "schedule", "new_data", "alert")
CONSUMER_GROUP = "training-triggers"
#: A missed schedule tick older than this is not caught up after downtime.
CATCH_UP_MINUTES = 24 * 60

# -- cron ------------------------------------------------------------------------------------

#: The usual @-aliases, as cron(8) documents them.
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class CronSchedule:
    """A cron schedule: 5 fields (minute hour day-of-month month day-of-week) with lists,
    ranges, steps, names, ``L`` / ``W`` / ``#``, the @-aliases, and an optional time zone as a
    ``CRON_TZ=Europe/Berlin`` (or ``TZ=``) prefix; UTC otherwise. Evaluated by ``cronsim``
    (Debian cron's rules: when both day fields are restricted a day matching either one is due;
    across DST a tick in a skipped hour runs once at the jump, a repeated hour runs once)."""

    def __init__(self, expression: str) -> None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from cronsim import CronSim, CronSimError

        self.expression = expression
        text = expression.strip()
        zone = "UTC"
        head, _, rest = text.partition(" ")
        if head.upper().startswith(("CRON_TZ=", "TZ=")):
            zone, text = head.split("=", 1)[1], rest.strip()
        try:
            self.tz = ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise InvalidArgumentError(
                f"cron time zone {zone!r} is unknown; use an IANA name such as Europe/Berlin"
            ) from exc
        self.fields = _ALIASES.get(text.lower(), text)
        if len(self.fields.split()) != 5:
            raise InvalidArgumentError(
                f"cron expression {expression!r} needs 5 fields (minute hour day-of-month "
                f"month day-of-week) or an @-alias, e.g. '0 3 * * *' or '@daily'"
            )
        self._sim = CronSim
        try:
            CronSim(self.fields, datetime(2000, 1, 1, tzinfo=self.tz))
        except CronSimError as exc:
            raise InvalidArgumentError(
                f"cron expression {expression!r}: {exc} (minute 0-59, hour 0-23, day of month "
                "1-31 or L, month 1-12 or jan-dec, day of week 0-7 or sun-sat)"
            ) from exc

    def latest(self, at_or_before: datetime) -> datetime:
        """The latest tick at or before ``at_or_before`` (minute resolution), in UTC. A tick is
        what forward iteration yields, so a wall-clock time repeated by a DST fall-back counts
        once: a candidate of the reverse iteration that forward iteration skips is passed."""
        end = at_or_before.astimezone(UTC).replace(second=0, microsecond=0)
        start = (end + timedelta(minutes=1)).astimezone(self.tz)
        for _ in range(4):
            tick = next(self._sim(self.fields, start, reverse=True)).astimezone(UTC)
            before = (tick - timedelta(minutes=1)).astimezone(self.tz)
            if next(self._sim(self.fields, before)).astimezone(UTC) == tick:
                return tick
            start = tick.astimezone(self.tz)
        return tick

    def matches(self, at: datetime) -> bool:
        """Whether the minute ``at`` falls in is a tick."""
        minute = at.astimezone(UTC).replace(second=0, microsecond=0)
        return self.latest(minute) == minute

    def due_minute(self, after_minute: int, until_minute: int) -> int | None:
        """The latest epoch minute in ``(after_minute, until_minute]`` this schedule fires in
        (at most ``CATCH_UP_MINUTES`` back), found in one step of the library."""
        start = max(after_minute, until_minute - CATCH_UP_MINUTES)
        tick = self.latest(datetime.fromtimestamp(until_minute * 60, UTC))
        minute = int(tick.timestamp()) // 60
        return minute if minute > start else None


# -- storage ---------------------------------------------------------------------------------


class Trigger(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: TriggerKind
    spec: JobSpec
    schedule: str = ""  # cron, for kind "schedule"
    model: str = ""  # whose alerts fire it, for kind "alert" ("" = spec.model_name)
    enabled: bool = True
    created_by: str = ""
    created_at_us: int = 0
    last_fired_at_us: int | None = None
    last_job_id: str | None = None
    pending: bool = False  # a follow-up run is owed once the active one finishes
    last_error: str = ""  # why the last decision could not submit (spec no longer valid)

    @property
    def groups(self) -> list[str]:
        """The feature groups the spec reads."""
        return sorted({ref.partition(":")[0] for ref in self.spec.dataset.features})

    @property
    def alert_model(self) -> str:
        return self.model or self.spec.model_name


class _State(msgspec.Struct, kw_only=True):
    checked_minute: int | None = None
    files: dict[str, list[str]] = msgspec.field(default_factory=dict)  # "group:vN" -> names
    last_error: str = ""


class Fire(msgspec.Struct, frozen=True, kw_only=True):
    """What one trigger decision did: ``submitted`` a job, ``deferred`` to one follow-up
    after the active run, or found the spec ``invalid`` (nothing submitted)."""

    trigger: str
    outcome: Literal["submitted", "deferred", "invalid"]
    reasons: list[str]
    job_id: str | None = None
    error: str = ""


_COLUMNS = (
    "name, kind, spec_json, schedule, model, enabled, created_by, created_at_us,"
    " last_fired_at_us, last_job_id, pending, state_json"
)
_spec_decoder = msgspec.json.Decoder(JobSpec)
_state_decoder = msgspec.json.Decoder(_State)


def _row(r: Sequence[Any]) -> Trigger:
    return Trigger(
        name=r[0],
        kind=r[1],
        spec=_spec_decoder.decode(r[2]),
        schedule=r[3],
        model=r[4],
        enabled=bool(r[5]),
        created_by=r[6],
        created_at_us=int(r[7]),
        last_fired_at_us=None if r[8] is None else int(r[8]),
        last_job_id=r[9],
        pending=bool(r[10]),
        last_error=_state_decoder.decode(r[11]).last_error,
    )


def _now_us() -> int:
    return time.time_ns() // 1000


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class TriggerStore:
    """Triggers in the training database (the queue's), and the one place that fires them."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.db = queue.db

    def add(
        self,
        name: str,
        kind: str,
        spec: JobSpec,
        *,
        schedule: str = "",
        model: str = "",
        created_by: str = "",
        features: FeatureService | None = None,
    ) -> Trigger:
        """Store a trigger after checking its name, kind, schedule and spec."""
        if not name or len(name) > 128 or not set(name) <= _NAME_OK or not name[0].isalpha():
            raise InvalidArgumentError(
                f"trigger name {name!r} must start with a letter and use letters, digits, "
                "'_', '.', '-' (at most 128)"
            )
        if kind not in KINDS:
            raise InvalidArgumentError(f"unknown trigger kind {kind!r}; known: {', '.join(KINDS)}")
        if kind == "schedule":
            if not schedule:
                raise InvalidArgumentError(
                    "a schedule trigger needs a cron schedule, e.g. '0 3 * * *'"
                )
            CronSchedule(schedule)
        elif schedule:
            raise InvalidArgumentError(f"schedule is only for kind 'schedule', not {kind!r}")
        if model and kind != "alert":
            raise InvalidArgumentError(f"model is only for kind 'alert', not {kind!r}")
        self.queue.validate(spec, features=features)
        now = _now_us()
        state = _State(checked_minute=now // 60_000_000)
        with self.db.transaction() as tx:
            if tx.fetchone("SELECT 1 FROM training_triggers WHERE name = ?", (name,)):
                raise AlreadyExistsError(
                    f"training trigger {name!r} already exists; remove it first to replace it"
                )
            tx.execute(
                f"INSERT INTO training_triggers ({_COLUMNS}) VALUES"
                " (?, ?, ?, ?, ?, 1, ?, ?, NULL, NULL, 0, ?)",
                (
                    name,
                    kind,
                    spec.to_json(),
                    schedule,
                    model,
                    created_by,
                    now,
                    msgspec.json.encode(state).decode(),
                ),
            )
            return self._get(tx, name)

    def _get(self, tx: Any, name: str, *, lock: bool = False) -> Trigger:
        sql = f"SELECT {_COLUMNS} FROM training_triggers WHERE name = ?"
        if lock and tx.dialect == "postgresql":
            sql += " FOR UPDATE"
        row = tx.fetchone(sql, (name,))
        if row is None:
            raise NotFoundError(f"training trigger {name!r} does not exist")
        return _row(row)

    def get(self, name: str) -> Trigger:
        with self.db.transaction() as tx:
            return self._get(tx, name)

    def list(self) -> list[Trigger]:
        with self.db.transaction() as tx:
            rows = tx.fetchall(f"SELECT {_COLUMNS} FROM training_triggers ORDER BY name")
        return [_row(r) for r in rows]

    def remove(self, name: str) -> Trigger:
        """Delete a trigger (its jobs stay, tagged with its name)."""
        with self.db.transaction() as tx:
            trigger = self._get(tx, name, lock=True)
            tx.execute("DELETE FROM training_triggers WHERE name = ?", (name,))
        return trigger

    def state(self, name: str) -> _State:
        with self.db.transaction() as tx:
            row = tx.fetchone("SELECT state_json FROM training_triggers WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"training trigger {name!r} does not exist")
        return _state_decoder.decode(row[0])

    def fire(
        self, name: str, *, reason: str = "manual", features: FeatureService | None = None
    ) -> Fire:
        """Fire a trigger now (any kind): submit a run, or defer to one follow-up when a run
        of it is active."""
        self.get(name)  # NotFoundError for an unknown name
        fire = self.decide(name, reasons=[reason], features=features)
        if fire is None:
            raise FailedPreconditionError(
                f"training trigger {name!r} is disabled or changed while firing; try again"
            )
        return fire

    def decide(
        self,
        name: str,
        *,
        reasons: Sequence[str] = (),
        now_minute: int | None = None,
        files: dict[str, builtins.list[str]] | None = None,
        features: FeatureService | None = None,
    ) -> Fire | None:
        """The one decision procedure: with the trigger's row locked, add what is due (a cron
        tick since the last checked minute, new offline files since the last listing) to
        ``reasons``, then submit, defer or do nothing. Returns None when nothing fired."""
        # The spec is validated (catalog, GPU inventory) before the locked transaction, and
        # only when something may be owed; the locked pass then recomputes what is due.
        try:
            trigger, state = self._load(name)
        except NotFoundError:
            return None
        if not trigger.enabled:
            return None
        validated = False
        error = ""
        if trigger.pending or _due(trigger, state, list(reasons), now_minute, files)[0]:
            validated = True
            try:
                self.queue.validate(trigger.spec, features=features)
            except InvalidArgumentError as exc:
                error = str(exc)
        job: Job | None = None
        fire: Fire | None = None
        with self.db.transaction() as tx:
            try:
                trigger = self._get(tx, name, lock=True)
            except NotFoundError:
                return None  # removed meanwhile
            row = tx.fetchone("SELECT state_json FROM training_triggers WHERE name = ?", (name,))
            state = _state_decoder.decode(row[0] if row else "{}")
            why, state = _due(trigger, state, list(reasons), now_minute, files)
            owed = trigger.pending or bool(why)
            if owed and not validated:
                return None  # another runner changed it since the check: decide next poll
            pending = trigger.pending
            if owed:
                active = tx.fetchone(
                    "SELECT job_id FROM training_jobs WHERE trigger_name = ?"
                    " AND state IN ('QUEUED', 'RUNNING') LIMIT 1",
                    (name,),
                )
                follow_up = not why
                if follow_up:
                    why = ["follow-up: events arrived during the previous run"]
                if error:
                    state.last_error = error
                    pending = False
                    fire = Fire(trigger=name, outcome="invalid", reasons=why, error=error)
                elif active is not None:
                    if not follow_up:  # an owed follow-up still waiting is no news
                        fire = Fire(trigger=name, outcome="deferred", reasons=why, job_id=active[0])
                    pending = True
                else:
                    job = self.queue._insert(
                        tx, trigger.spec, submitted_by=f"trigger:{name}", trigger=name
                    )
                    pending = False
                    state.last_error = ""
                    tx.execute(
                        "UPDATE training_triggers SET last_fired_at_us = ?, last_job_id = ?"
                        " WHERE name = ?",
                        (_now_us(), job.job_id, name),
                    )
                    fire = Fire(trigger=name, outcome="submitted", reasons=why, job_id=job.job_id)
            tx.execute(
                "UPDATE training_triggers SET pending = ?, state_json = ? WHERE name = ?",
                (int(pending), msgspec.json.encode(state).decode(), name),
            )
        if job is not None and fire is not None:
            self.queue._publish(job)
            self.queue.log(job.job_id, f"submitted by trigger {name!r}: {'; '.join(fire.reasons)}")
        if fire is not None and fire.outcome == "invalid":
            log.error("trigger %s did not fire: %s", name, error)
        return fire

    def _load(self, name: str) -> tuple[Trigger, _State]:
        with self.db.transaction() as tx:
            trigger = self._get(tx, name)
            row = tx.fetchone("SELECT state_json FROM training_triggers WHERE name = ?", (name,))
        return trigger, _state_decoder.decode(row[0] if row else "{}")


def _due(
    trigger: Trigger,
    state: _State,
    reasons: list[str],
    now_minute: int | None,
    files: dict[str, list[str]] | None,
) -> tuple[list[str], _State]:
    """``reasons`` plus what is due by the clock or the offline listing, and the state after
    this look (a copy; the input is not changed)."""
    state = msgspec.structs.replace(state, files=dict(state.files))
    why = list(reasons)
    if trigger.kind == "schedule" and now_minute is not None:
        after = state.checked_minute if state.checked_minute is not None else now_minute
        if now_minute > after:
            due = CronSchedule(trigger.schedule).due_minute(after, now_minute)
            state.checked_minute = now_minute
            if due is not None:
                at = datetime.fromtimestamp(due * 60, UTC).strftime("%Y-%m-%dT%H:%MZ")
                why.append(f"schedule '{trigger.schedule}' due at {at}")
    if trigger.kind == "new_data" and files is not None:
        for key, names in files.items():
            group = key.rsplit(":v", 1)[0]
            older = [k for k in state.files if k != key and k.rsplit(":v", 1)[0] == group]
            seen = state.files.get(key)
            if seen is None and older:
                seen = []  # the group got a new version: everything in it is new data
            for k in older:
                del state.files[k]
            if seen is not None:
                new = sorted(set(names) - set(seen))
                if new:
                    why.append(f"new offline data for {key}: {len(new)} file(s)")
            state.files[key] = sorted(names)  # the first look is a baseline: no fire
    return why, state


# -- the runner ------------------------------------------------------------------------------


class _EventHead(msgspec.Struct):
    """The fields of ``feature-updates`` / ``alerts`` payloads the runner reads (msgpack
    maps; other fields are skipped)."""

    group: str = ""
    model: str = ""
    kind: str = ""
    state: str = ""


_head_decoder = msgspec.msgpack.Decoder(_EventHead)


class TriggerRunner:
    """Evaluates every enabled trigger on each :meth:`poll_once` and submits their runs."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        events: EventLog | None = None,
        features: FeatureService | None = None,
        consumer_group: str = CONSUMER_GROUP,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = TriggerStore(queue)
        self.events = events
        self.features = features
        self.consumer_group = consumer_group
        self.consumer = consumer or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.clock = clock

    def _read(self, topic: str) -> list[Event]:
        assert self.events is not None
        out: list[Event] = []
        while True:
            batch = self.events.read(topic, self.consumer_group, self.consumer, count=500)
            out.extend(batch)
            if len(batch) < 500:
                return out

    def _offline_files(self, trigger: Trigger) -> dict[str, list[str]] | None:
        if self.features is None:
            return None
        out: dict[str, list[str]] = {}
        for group in trigger.groups:
            try:
                g = self.features.group(group)
            except NotFoundError:
                continue
            names = [f.rsplit("/", 1)[-1] for f in self.features.offline.files(g.name, g.version)]
            out[f"{g.name}:v{g.version}"] = sorted(_data_files(names))
        return out

    def poll_once(self, now: float | None = None) -> list[Fire]:
        """Read new events, look at the clock and the offline store, and decide for every
        enabled trigger; returns what fired or was deferred. Events are acked afterwards."""
        now_s = self.clock() if now is None else now
        minute = int(now_s // 60)
        triggers = [t for t in self.store.list() if t.enabled]
        reasons: dict[str, list[str]] = {t.name: [] for t in triggers}
        acks: list[tuple[Topic, list[str]]] = []
        if self.events is not None:
            for topic in (Topic.FEATURE_UPDATES, Topic.ALERTS):
                batch = self._read(topic)
                if batch:
                    acks.append((topic, [e.id for e in batch]))
                self._match(topic, batch, triggers, reasons)
        fires: list[Fire] = []
        for t in triggers:
            files = self._offline_files(t) if t.kind == "new_data" else None
            fire = self.store.decide(
                t.name,
                reasons=_dedupe(reasons[t.name]),
                now_minute=minute if t.kind == "schedule" else None,
                files=files,
                features=self.features,
            )
            if fire is not None:
                fires.append(fire)
        for topic, ids in acks:
            if self.events is not None:
                self.events.ack(topic, self.consumer_group, ids)
        return fires

    def _match(
        self,
        topic: str,
        batch: Iterable[Event],
        triggers: Sequence[Trigger],
        reasons: dict[str, list[str]],
    ) -> None:
        for event in batch:
            try:
                head = _head_decoder.decode(event.payload)
            except msgspec.DecodeError:
                log.warning("skipping undecodable %s event %s", topic, event.id)
                continue
            at_us = event.timestamp_ms * 1000
            for t in triggers:
                if at_us + 1000 <= t.created_at_us:
                    continue  # older than the trigger
                if (
                    topic == Topic.FEATURE_UPDATES
                    and t.kind == "new_data"
                    and head.group in t.groups
                ):
                    reasons[t.name].append(f"feature-updates event for group {head.group!r}")
                elif (
                    topic == Topic.ALERTS
                    and t.kind == "alert"
                    and head.state == "firing"
                    and head.model == t.alert_model
                ):
                    reasons[t.name].append(f"{head.kind} alert for model {head.model!r}")

    def run_forever(self, stop: threading.Event, *, interval_s: float = 5.0) -> None:
        """Poll until ``stop`` is set; a failing poll is logged and retried next interval."""
        while not stop.is_set():
            try:
                for fire in self.poll_once():
                    log.info(
                        "trigger %s %s %s (%s)",
                        fire.trigger,
                        fire.outcome,
                        fire.job_id or "",
                        "; ".join(fire.reasons),
                    )
            except Exception:
                log.exception("trigger poll failed; retrying in %.1fs", interval_s)
            stop.wait(interval_s)


def _data_files(names: Iterable[str]) -> list[str]:
    """Files an append wrote (compaction output ends in ``-c.parquet`` and holds no new rows)."""
    return [n for n in names if not n.endswith("-c.parquet")]


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
