"""Alert state: raised once, deduplicated while a condition holds, resolved when it ends;
delivered through the outbox to the alerts topic and a webhook."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from carrara.eventlog import EventLog
from carrara.monitoring import Alert, CallbackSink, EventLogSink, WebhookSink, active_alerts
from carrara.monitoring.alerts import (
    AlertSink,
    AlertSubscriber,
    Condition,
    SinkBackoff,
    apply_conditions,
    deliver_outbox,
)
from carrara.monitoring.schema import ensure_schema
from carrara.sql import Database


def cond(active: bool, subject: str = "x1", value: float = 0.3) -> Condition:
    return Condition(
        model="m",
        version=2,
        kind="drift",
        subject=subject,
        active=active,
        value=value,
        threshold=0.2,
    )


def test_raise_once_hold_and_resolve(db: Database) -> None:
    ensure_schema(db)
    sequence = [True, True, True, False, False, True]
    transitions = []
    for t, active in enumerate(sequence):
        with db.transaction() as tx:
            transitions += apply_conditions(tx, [cond(active), cond(False, "x2")], now_ms=t)
    assert [(a.subject, a.state, a.timestamp_ms, a.started_ms) for a in transitions] == [
        ("x1", "firing", 0, 0),
        ("x1", "resolved", 3, 0),
        ("x1", "firing", 5, 5),
    ]
    assert [a.key for a in active_alerts(db)] == ["m:v2:drift:x1"]


def test_hysteresis_holds_an_alert_through_short_clear_spells(db: Database) -> None:
    ensure_schema(db)
    sequence = [True, False, True, False, False, True]
    transitions = []
    for t, active in enumerate(sequence):
        c = Condition(model="m", version=1, kind="drift", subject="x", active=active, clear_after=2)
        with db.transaction() as tx:
            transitions += apply_conditions(tx, [c], now_ms=t)
    assert [(a.state, a.timestamp_ms) for a in transitions] == [
        ("firing", 0),
        ("resolved", 4),
        ("firing", 5),
    ]


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, object]]] = []
    fail = False
    attempts = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Hook.attempts += 1
        if _Hook.fail:
            self.send_response(503)
        else:
            _Hook.received.append(json.loads(body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    _Hook.fail = False
    _Hook.attempts = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()
    thread.join()


def test_delivery_to_topic_and_webhook_with_retry(
    db: Database, event_log: EventLog, webhook: str
) -> None:
    ensure_schema(db)
    sink = WebhookSink(webhook, timeout_s=5)
    try:
        sinks: list[AlertSink] = [EventLogSink(event_log), sink]
        with db.transaction() as tx:
            apply_conditions(tx, [cond(True)], now_ms=1)
        _Hook.fail = True  # the webhook is down: the alert stays queued
        assert deliver_outbox(db, [sink]) == 0
        _Hook.fail = False
        with db.transaction() as tx:
            apply_conditions(tx, [cond(False)], now_ms=2)
        assert deliver_outbox(db, sinks) == 2
        assert deliver_outbox(db, sinks) == 0  # nothing left
    finally:
        sink.close()
    assert [(a["subject"], a["state"]) for a in _Hook.received] == [
        ("x1", "firing"),
        ("x1", "resolved"),
    ]
    got: list[Alert] = []
    sub = AlertSubscriber(event_log, got.append, group="ops", states=("firing", "resolved"))
    assert sub.poll() == 2
    assert [(a.key, a.state) for a in got] == [
        ("m:v2:drift:x1", "firing"),
        ("m:v2:drift:x1", "resolved"),
    ]


def test_a_failing_sink_keeps_order(db: Database) -> None:
    ensure_schema(db)
    got: list[str] = []
    calls = {"n": 0}

    def flaky(alert: Alert) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("down")
        got.append(alert.subject)

    with db.transaction() as tx:
        apply_conditions(tx, [cond(True, "a"), cond(True, "b"), cond(True, "c")], now_ms=1)
    assert deliver_outbox(db, [CallbackSink(flaky)]) == 1
    assert deliver_outbox(db, [CallbackSink(flaky)]) == 2
    assert got == ["a", "b", "c"]


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/alerts"  # nothing listens there any more


def _outbox_size(db: Database) -> int:
    with db.transaction() as tx:
        row = tx.fetchone("SELECT COUNT(*) FROM monitoring_alert_outbox")
    assert row is not None
    return int(row[0])


def test_a_down_webhook_holds_back_neither_the_topic_nor_other_sinks(
    db: Database, event_log: EventLog, webhook: str
) -> None:
    ensure_schema(db)
    now = [0.0]
    backoff = SinkBackoff(base_s=1.0, max_s=4.0, clock=lambda: now[0])
    failing, closed = WebhookSink(webhook, timeout_s=5), WebhookSink(_closed_port(), timeout_s=5)
    called: list[str] = []
    sinks: list[AlertSink] = [
        failing,  # first in the list: a failure of its own must not stop the ones after it
        closed,
        EventLogSink(event_log),
        CallbackSink(lambda a: called.append(f"{a.subject}:{a.state}")),
    ]
    topic: list[Alert] = []
    sub = AlertSubscriber(event_log, topic.append, group="retrain", states=("firing", "resolved"))
    _Hook.fail = True  # the webhook answers 503
    try:
        for t, subject in enumerate(["a", "b", "c"], start=1):
            with db.transaction() as tx:
                apply_conditions(tx, [cond(True, subject)], now_ms=t)
            assert deliver_outbox(db, sinks, backoff=backoff) == 0  # two sinks lack it
            # The topic (alert-triggered retraining reads it) and the callback have it now.
            assert sub.poll() == 1 and topic[-1].subject == subject
            assert called[-1] == f"{subject}:firing"
            now[0] += 0.5
        # The down webhook was tried once, then left alone during its backoff (1 s, 2 s).
        assert _Hook.attempts == 2 and backoff.failures[failing.name] == 2
        assert backoff.failures[closed.name] == 2
        assert _outbox_size(db) == 3

        _Hook.fail = False  # it comes back: after its delay it gets every alert, in order
        assert deliver_outbox(db, sinks, backoff=backoff) == 0  # still backing off
        assert _Hook.received == []
        now[0] += 2.0
        assert deliver_outbox(db, sinks, backoff=backoff) == 0  # the closed port still fails
        assert [a["subject"] for a in _Hook.received] == ["a", "b", "c"]
        assert failing.name not in backoff.failures
        assert sub.poll() == 0 and called == ["a:firing", "b:firing", "c:firing"]  # no repeats
        # Without the dead sink, every remaining alert has been taken by everyone: gone.
        assert deliver_outbox(db, [failing, sinks[2], sinks[3]], backoff=backoff) == 3
        assert _outbox_size(db) == 0
    finally:
        failing.close()
        closed.close()


def test_sink_backoff_doubles_to_its_cap_and_resets() -> None:
    now = [0.0]
    b = SinkBackoff(base_s=0.5, max_s=3.0, clock=lambda: now[0])
    assert [b.failed("w") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert not b.ready("w") and b.ready("other")
    now[0] = 3.0
    assert b.ready("w")
    b.succeeded("w")
    assert b.failed("w") == 0.5


def test_a_consumer_without_sinks_leaves_alerts_queued(db: Database, event_log: EventLog) -> None:
    from carrara.monitoring import MonitoringConsumer

    ensure_schema(db)
    with db.transaction() as tx:
        apply_conditions(tx, [cond(True)], now_ms=1)
    assert MonitoringConsumer(db, event_log).deliver() == 0  # e.g. the API's consumer
    got: list[Alert] = []
    assert MonitoringConsumer(db, event_log, sinks=[CallbackSink(got.append)]).deliver() == 1
    assert [a.subject for a in got] == ["x1"]


def test_a_restarted_monitor_restores_alerts_active_and_resumes_a_webhook(
    db: Database, event_log: EventLog, webhook: str
) -> None:
    from carrara.monitoring import MonitoringConsumer

    ensure_schema(db)
    _Hook.fail = True
    first_hook = WebhookSink(webhook, timeout_s=5)
    first = MonitoringConsumer(db, event_log, sinks=[EventLogSink(event_log), first_hook])
    with db.transaction() as tx:
        apply_conditions(tx, [cond(True, "x1"), cond(True, "x2")], now_ms=1)
    assert first.deliver() == 0
    first_hook.close()
    # The monitor restarts (new objects, new metrics registry); the webhook is back.
    _Hook.fail = False
    hook = WebhookSink(webhook, timeout_s=5)
    try:
        second = MonitoringConsumer(db, event_log, sinks=[EventLogSink(event_log), hook])
        gauge = second.metrics.registry.get_sample_value(
            "carrara_monitor_alerts_active", {"model": "m", "kind": "drift"}
        )
        assert gauge == 2  # from the stored state, before any new evaluation
        assert second.deliver() == 2
    finally:
        hook.close()
    assert sorted(a["subject"] for a in _Hook.received) == ["x1", "x2"]
    got: list[Alert] = []
    sub = AlertSubscriber(event_log, got.append, group="ops")
    assert sub.poll() == 2  # the topic got each alert once, before the restart


def test_a_held_alert_shows_the_latest_value_and_keeps_the_firing_one(db: Database) -> None:
    """AUC 0.6030 on 500 fired it; the metric kept being evaluated, 0.6108 on 3,000 now."""
    ensure_schema(db)
    transitions = []
    for t, (auc, n) in enumerate([(0.6030, 500), (0.6070, 1_500), (0.6108, 3_000)]):
        c = Condition(
            model="m",
            version=1,
            kind="performance",
            subject="auc",
            active=True,
            statistic="auc",
            value=auc,
            threshold=0.65,
            samples=n,
            message=f"auc {auc:.4f} on {n}",
        )
        with db.transaction() as tx:
            transitions += apply_conditions(tx, [c], now_ms=t)
    assert [a.state for a in transitions] == ["firing"]  # still raised once
    [held] = active_alerts(db)
    assert (held.value, held.samples, held.message) == (0.6030, 500, "auc 0.6030 on 500")
    assert (held.latest_value, held.latest_samples, held.latest_message, held.latest_ms) == (
        0.6108,
        3_000,
        "auc 0.6108 on 3000",
        2,
    )
    assert (held.statistic, held.threshold) == ("auc", 0.65)
