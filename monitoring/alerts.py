"""Alerts: raised once when a condition starts, deduplicated while it holds, resolved when it
ends; delivered to the ``alerts`` topic and to webhooks.

State lives in ``monitoring_alerts`` (one row per condition key). Transitions are written in
the same transaction as the evaluation that caused them, together with an outbox row, and the
outbox is then drained to the sinks: a crash between commit and delivery delays an alert, it
does not lose it (delivery is at-least-once; ``key`` + ``state`` + ``started_ms`` identify one
transition for receivers that must dedupe).

Sinks are independent: each marks the queued alerts it took (``monitoring_alert_deliveries``,
by the sink's ``name``), gets the alerts in order, and a sink that fails (a webhook that is
down) stops only itself: it is retried from where it stopped, after a backoff that doubles per
failure (:class:`SinkBackoff`), while the ``alerts`` topic and the other sinks go on. An outbox
row is deleted once every sink of the drain has it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import msgspec

from carrara.errors import FailedPreconditionError, NotFoundError
from carrara.eventlog import EventLog
from carrara.sql import Database, Transaction
from carrara.types import Topic

from .schema import ensure_schema

__all__ = [
    "ActiveAlert",
    "Alert",
    "AlertSink",
    "AlertSubscriber",
    "CallbackSink",
    "Condition",
    "EventLogSink",
    "SinkBackoff",
    "WebhookSink",
    "acknowledge_alert",
    "active_alerts",
    "apply_conditions",
    "decode_alert",
    "deliver_outbox",
    "firing_alerts",
    "retrain_on_degradation",
    "sink_names",
]

log = logging.getLogger(__name__)

AlertKind = Literal["drift", "performance"]


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One transition of one condition, as sinks receive it."""

    key: str  # "{model}:v{version}:{kind}:{subject}"
    model: str
    version: int
    kind: AlertKind
    subject: str  # the feature ("__prediction__" for the output) or the metric
    state: Literal["firing", "resolved"]
    severity: str = "critical"
    statistic: str = ""  # what ``value`` and ``threshold`` measure ("PSI", "KS D", "auc", ...)
    value: float | None = None  # at this transition
    threshold: float | None = None
    samples: int | None = None  # rows the value was computed on
    message: str = ""
    started_ms: int  # when the condition began (same on its firing and resolved alerts)
    timestamp_ms: int  # when this transition happened
    window_start: int | None = None  # the drift window that caused it
    # While the condition holds, each evaluation refreshes these on the stored firing alert
    # (``active_alerts``); ``value``/``samples``/``message`` stay what fired it.
    latest_value: float | None = None
    latest_samples: int | None = None
    latest_message: str = ""
    latest_ms: int | None = None


class ActiveAlert(Alert, frozen=True, kw_only=True):
    """A firing alert as :func:`active_alerts` lists it: the firing :class:`Alert` and who
    acknowledged it (``acknowledged_by`` None while nobody has; an alert that resolves and
    fires again starts unacknowledged)."""

    acknowledged_by: str | None = None
    acknowledged_at_ms: int | None = None
    ack_comment: str = ""


class Condition(msgspec.Struct, frozen=True, kw_only=True):
    """The current truth of one alertable condition, as an evaluation found it."""

    model: str
    version: int
    kind: AlertKind
    subject: str
    active: bool
    statistic: str = ""
    value: float | None = None
    threshold: float | None = None
    samples: int | None = None
    message: str = ""
    window_start: int | None = None
    clear_after: int = 1  # consecutive clear evaluations before a firing alert resolves

    @property
    def key(self) -> str:
        return f"{self.model}:v{self.version}:{self.kind}:{self.subject}"


_msgpack = msgspec.msgpack.Encoder()
_alert_decoder = msgspec.msgpack.Decoder(Alert)


def decode_alert(payload: bytes) -> Alert:
    return _alert_decoder.decode(payload)


def apply_conditions(
    tx: Transaction, conditions: Iterable[Condition], *, now_ms: int | None = None
) -> list[Alert]:
    """Record conditions; returns (and queues in the outbox) the transitions they cause."""
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    out: list[Alert] = []
    for c in conditions:
        row = tx.fetchone(
            "SELECT active, alert, clear_streak FROM monitoring_alerts WHERE alert_key = ?",
            (c.key,),
        )
        was_active = row is not None and bool(row[0])
        streak = int(row[2]) if row is not None else 0
        if was_active and not c.active and streak + 1 < c.clear_after:
            # Hysteresis: not resolved until it has been clear ``clear_after`` times running.
            tx.execute(
                "UPDATE monitoring_alerts SET clear_streak = clear_streak + 1, updated_ms = ?"
                " WHERE alert_key = ?",
                (now, c.key),
            )
            continue
        if c.active == was_active:
            if c.active and row is not None:  # still holding: no new alert, fresh figures
                held = msgspec.structs.replace(
                    _alert_decoder.decode(bytes(row[1])),
                    latest_value=c.value,
                    latest_samples=c.samples,
                    latest_message=c.message,
                    latest_ms=now,
                )
                tx.execute(
                    "UPDATE monitoring_alerts SET clear_streak = 0, updated_ms = ?, alert = ?"
                    " WHERE alert_key = ?",
                    (now, _msgpack.encode(held), c.key),
                )
            continue
        started = now
        if not c.active and row is not None:
            started = _alert_decoder.decode(bytes(row[1])).started_ms
        alert = Alert(
            key=c.key,
            model=c.model,
            version=c.version,
            kind=c.kind,
            subject=c.subject,
            state="firing" if c.active else "resolved",
            statistic=c.statistic,
            value=c.value,
            threshold=c.threshold,
            samples=c.samples,
            message=c.message,
            started_ms=started,
            timestamp_ms=now,
            window_start=c.window_start,
        )
        blob = _msgpack.encode(alert)
        if row is None:
            tx.execute(
                "INSERT INTO monitoring_alerts (alert_key, model, version, kind, subject, active,"
                " alert, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (c.key, c.model, c.version, c.kind, c.subject, int(c.active), blob, now),
            )
        elif c.active:  # fires again after it resolved: a new condition, not acknowledged
            tx.execute(
                "UPDATE monitoring_alerts SET active = 1, alert = ?, updated_ms = ?,"
                " clear_streak = 0, acknowledged_by = NULL, acknowledged_ms = NULL,"
                " ack_comment = NULL WHERE alert_key = ?",
                (blob, now, c.key),
            )
        else:
            tx.execute(
                "UPDATE monitoring_alerts SET active = 0, alert = ?, updated_ms = ?,"
                " clear_streak = 0 WHERE alert_key = ?",
                (blob, now, c.key),
            )
        tx.execute("INSERT INTO monitoring_alert_outbox (payload) VALUES (?)", (blob,))
        out.append(alert)
    return out


_ALERT_COLUMNS = "alert, acknowledged_by, acknowledged_ms, ack_comment"


def _active(row: Sequence[Any]) -> ActiveAlert:
    blob, by, at, comment = row
    return ActiveAlert(
        **msgspec.structs.asdict(_alert_decoder.decode(bytes(blob))),
        acknowledged_by=None if by is None else str(by),
        acknowledged_at_ms=None if at is None else int(at),
        ack_comment="" if comment is None else str(comment),
    )


def active_alerts(db: Database, model: str | None = None) -> list[Alert]:
    """Conditions firing now (the firing alert of each; an :class:`ActiveAlert`, with its
    acknowledgement: :func:`firing_alerts` says so in its type)."""
    return [*firing_alerts(db, model)]


def firing_alerts(db: Database, model: str | None = None) -> list[ActiveAlert]:
    """Conditions firing now, each with its acknowledgement, by key."""
    ensure_schema(db)
    with db.transaction() as tx:
        sql = f"SELECT {_ALERT_COLUMNS} FROM monitoring_alerts WHERE active = 1"
        params: tuple[Any, ...] = ()
        if model is not None:
            sql += " AND model = ?"
            params = (model,)
        rows = tx.fetchall(sql + " ORDER BY alert_key", params)
    return [_active(r) for r in rows]


def acknowledge_alert(
    db: Database, key: str, by: str, comment: str = "", *, now_ms: int | None = None
) -> ActiveAlert:
    """Mark the firing alert ``key`` acknowledged by ``by`` (again: the newest
    acknowledgement replaces the earlier one). NotFoundError for a key no condition ever had,
    FailedPreconditionError for a condition that is not firing now."""
    ensure_schema(db)
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    with db.transaction() as tx:
        row = tx.fetchone("SELECT active FROM monitoring_alerts WHERE alert_key = ?", (key,))
        if row is None:
            raise NotFoundError(
                f"no alert {key!r}; keys are '<model>:v<version>:<kind>:<subject>'"
                " (GET /monitoring/alerts lists the active ones)"
            )
        if not row[0]:
            raise FailedPreconditionError(
                f"alert {key!r} is not firing (it resolved); only active alerts can be acknowledged"
            )
        tx.execute(
            "UPDATE monitoring_alerts SET acknowledged_by = ?, acknowledged_ms = ?,"
            " ack_comment = ? WHERE alert_key = ? AND active = 1",
            (by, now, comment, key),
        )
        found = tx.fetchone(
            f"SELECT {_ALERT_COLUMNS} FROM monitoring_alerts WHERE alert_key = ?", (key,)
        )
    assert found is not None
    return _active(found)


class AlertSink(Protocol):
    """Where alerts go. A sink may also have a ``name`` attribute: its stable identity in the
    outbox (where it stopped), which must differ between the sinks of one consumer; without
    one the class name is used."""

    def send(self, alert: Alert) -> None:
        """Deliver one alert; raise to have it retried later."""


class EventLogSink:
    """Appends alerts (msgpack :class:`Alert`) to the ``alerts`` topic."""

    def __init__(self, event_log: EventLog, topic: str = Topic.ALERTS) -> None:
        self._log = event_log
        self._topic = topic
        self.name = f"topic:{topic}"

    def send(self, alert: Alert) -> None:
        self._log.append(self._topic, _msgpack.encode(alert))


class WebhookSink:
    """POSTs each alert as JSON to ``url`` (a non-2xx answer counts as a failure)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, headers: dict[str, str] | None = None):
        import httpx

        self.url = url
        self.name = f"webhook:{url}"
        self._client = httpx.Client(timeout=timeout_s, headers=headers or {})

    def send(self, alert: Alert) -> None:
        response = self._client.post(
            self.url,
            content=msgspec.json.encode(alert),
            headers={"content-type": "application/json"},
        )
        response.raise_for_status()

    def close(self) -> None:
        self._client.close()


class CallbackSink:
    """Calls a function in-process (tests, embedded subscribers)."""

    def __init__(self, fn: Callable[[Alert], None], *, name: str = "") -> None:
        self._fn = fn
        self.name = name or f"callback:{getattr(fn, '__qualname__', type(fn).__qualname__)}"

    def send(self, alert: Alert) -> None:
        self._fn(alert)


class SinkBackoff:
    """When each failing sink may be tried again: ``base_s`` after its first failure, doubling
    per consecutive failure up to ``max_s``; a success resets it. In memory: a restarted
    consumer retries every sink at once."""

    def __init__(
        self,
        base_s: float = 1.0,
        max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self.failures: dict[str, int] = {}
        self._next: dict[str, float] = {}

    def ready(self, sink: str) -> bool:
        return self._clock() >= self._next.get(sink, float("-inf"))

    def failed(self, sink: str) -> float:
        """Record a failure; returns the delay before the next try."""
        n = self.failures.get(sink, 0) + 1
        self.failures[sink] = n
        delay = min(self.max_s, self.base_s * 2.0 ** (n - 1))
        self._next[sink] = self._clock() + delay
        return delay

    def succeeded(self, sink: str) -> None:
        self.failures.pop(sink, None)
        self._next.pop(sink, None)


def sink_names(sinks: Sequence[AlertSink]) -> list[str]:
    """Each sink's identity in ``monitoring_alert_deliveries`` (its ``name``, else its class
    name; repeats numbered)."""
    out: list[str] = []
    for sink in sinks:
        base = str(getattr(sink, "name", "") or type(sink).__qualname__)
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}#{n}"
        out.append(name)
    return out


def deliver_outbox(
    db: Database,
    sinks: Sequence[AlertSink],
    *,
    limit: int = 1000,
    backoff: SinkBackoff | None = None,
) -> int:
    """Send queued alerts to every sink, oldest first, each sink on its own; returns how many
    alerts every sink now has (they leave the outbox).

    A sink that fails keeps its place: it gets that alert and the later ones, in order, on a
    later drain (with ``backoff``, not before its delay has passed), while the other sinks
    are served. With no sinks nothing is drained: the alerts wait for a consumer that has
    sinks (e.g. ``carrara monitor run`` publishing to the ``alerts`` topic).
    """
    ensure_schema(db)
    if not sinks:
        return 0
    with db.transaction() as tx:
        if tx.fetchone("SELECT id FROM monitoring_alert_outbox LIMIT 1") is None:
            return 0
    names = sink_names(sinks)
    for name, sink in zip(names, sinks, strict=True):
        if backoff is not None and not backoff.ready(name):
            continue
        # What this sink has not taken yet (a mark per alert and sink, rather than a
        # position: ids may commit out of order when several consumers raise alerts).
        with db.transaction() as tx:
            rows = tx.fetchall(
                "SELECT o.id, o.payload FROM monitoring_alert_outbox o WHERE NOT EXISTS"
                " (SELECT 1 FROM monitoring_alert_deliveries d"
                "  WHERE d.outbox_id = o.id AND d.sink = ?) ORDER BY o.id LIMIT ?",
                (name, limit),
            )
        for oid, payload in rows:
            alert = _alert_decoder.decode(bytes(payload))
            try:
                sink.send(alert)
            except Exception as exc:  # this sink retries later; the others go on
                delay = backoff.failed(name) if backoff is not None else 0.0
                log.warning(
                    "alert %s (%s) not delivered to %s, will retry%s: %s",
                    alert.key,
                    alert.state,
                    name,
                    f" in {delay:.1f} s" if delay else "",
                    exc,
                )
                break
            with db.transaction() as tx:
                tx.execute(
                    "INSERT INTO monitoring_alert_deliveries (outbox_id, sink) VALUES (?, ?)"
                    " ON CONFLICT (outbox_id, sink) DO NOTHING",
                    (int(oid), name),
                )
        else:
            if backoff is not None:
                backoff.succeeded(name)
    marks = ", ".join("?" * len(names))
    with db.transaction() as tx:
        done = [
            int(r[0])
            for r in tx.fetchall(
                "SELECT outbox_id FROM monitoring_alert_deliveries"
                f" WHERE sink IN ({marks}) GROUP BY outbox_id HAVING COUNT(*) = ?",
                (*names, len(names)),
            )
        ]
        for i in range(0, len(done), 500):
            chunk = done[i : i + 500]
            ids = ", ".join("?" * len(chunk))
            tx.execute(f"DELETE FROM monitoring_alert_outbox WHERE id IN ({ids})", chunk)
            tx.execute(f"DELETE FROM monitoring_alert_deliveries WHERE outbox_id IN ({ids})", chunk)
    return len(done)


class AlertSubscriber:
    """Reads the ``alerts`` topic with its own consumer group and calls ``handler`` for the
    alerts that match (at-least-once: acked after the handler returns)."""

    def __init__(
        self,
        event_log: EventLog,
        handler: Callable[[Alert], None],
        *,
        group: str,
        consumer: str = "subscriber-1",
        kinds: Sequence[AlertKind] = ("drift", "performance"),
        states: Sequence[str] = ("firing",),
        topic: str = Topic.ALERTS,
    ) -> None:
        self._log = event_log
        self._handler = handler
        self._group = group
        self._consumer = consumer
        self._kinds = set(kinds)
        self._states = set(states)
        self._topic = topic

    def poll(self, *, count: int = 100, block_ms: int = 0) -> int:
        """Handle one batch; returns how many alerts were passed to the handler."""
        events = self._log.read(
            self._topic, self._group, self._consumer, count=count, block_ms=block_ms
        )
        handled = 0
        for event in events:
            try:
                alert = decode_alert(event.payload)
            except msgspec.DecodeError:
                log.warning("skipping undecodable alert %s", event.id)
                continue
            if alert.kind in self._kinds and alert.state in self._states:
                self._handler(alert)
                handled += 1
        self._log.ack(self._topic, self._group, [e.id for e in events])
        return handled


def retrain_on_degradation(
    event_log: EventLog,
    trigger: Callable[[str, int, Alert], None],
    *,
    group: str = "retrain-on-degradation",
    consumer: str = "trainer-1",
) -> AlertSubscriber:
    """A subscriber for the training trigger: ``trigger(model, version, alert)`` is called
    each time a performance-degradation alert fires. Call ``poll()`` from the trigger's loop."""
    return AlertSubscriber(
        event_log,
        lambda a: trigger(a.model, a.version, a),
        group=group,
        consumer=consumer,
        kinds=("performance",),
    )
