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

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
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
