"""The consumer on the production backends: PostgreSQL for state, Redis Streams for the log.
Same guarantees as the embedded tests: shift alerted for the shifted feature only, restart
without loss or double counting, degradation only once labels arrive."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest

from carrara.errors import FailedPreconditionError, NotFoundError
from carrara.eventlog import EventLog, RedisEventLog, open_event_log
from carrara.monitoring import (
    Alert,
    CallbackSink,
    ModelMonitorConfig,
    MonitoringConsumer,
    active_alerts,
    submit_labels,
    upgrade,
)
from carrara.monitoring.alerts import (
    Condition,
    acknowledge_alert,
    apply_conditions,
    firing_alerts,
)
from carrara.monitoring.performance import roc_auc
from carrara.monitoring.profiles import load_profile
from carrara.monitoring.store import windows_of
from carrara.monitoring.traffic import SyntheticModel, phased_records, publish, register_synthetic
from carrara.monitoring.views import distribution_view, drift_view, model_list, performance_view
from carrara.monitoring.windows import Binner
from carrara.sql import Database, connect
from carrara.types import Topic

pytestmark = pytest.mark.integration

MODEL = "fraud"
WINDOW_MS = 60_000
CONFIG = ModelMonitorConfig(window_ms=WINDOW_MS, allowed_lateness_ms=0)


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Database]:
    assert upgrade(postgres_url) == [
        "0001_monitoring",
        "0002_alert_clear_streak",
        "0003_alert_deliveries",
        "0004_alert_acknowledgement",
    ]
    db = connect(postgres_url)
    yield db
    db.close()


def redis_log(redis_url: str, namespace: str) -> EventLog:
    return open_event_log(f"{redis_url}?prefix={namespace}&visibility_timeout_ms=300")


@pytest.fixture
def rlog(redis_url: str, redis_namespace: str) -> Iterator[EventLog]:
    log = redis_log(redis_url, redis_namespace)
    yield log
    log.close()


def records(
    sm: SyntheticModel, phases: list[tuple[int, dict[str, float]]], per_window: int, seed: int = 7
) -> list:  # type: ignore[type-arg]
    return phased_records(
        sm, phases, model=MODEL, window_ms=WINDOW_MS, per_window=per_window, seed=seed
    )


def test_shift_on_postgres_and_redis(pg: Database, rlog: EventLog) -> None:
    sm = SyntheticModel(seed=21)
    register_synthetic(pg, sm, model=MODEL, config=CONFIG)
    publish(rlog, records(sm, [(5, {}), (5, {"x3": 0.5}), (3, {})], per_window=1_000))
    seen: list[Alert] = []
    consumer = MonitoringConsumer(pg, rlog, sinks=[CallbackSink(seen.append)])
    consumer.run(stop_when_idle=True, block_ms=0)
    features = [(a.subject, a.state, a.window_start) for a in seen if a.subject != "__prediction__"]
    assert features == [("x3", "firing", 5 * WINDOW_MS), ("x3", "resolved", 10 * WINDOW_MS)]


def test_restart_on_postgres_and_redis(
    postgres_url: str, pg: Database, redis_url: str, redis_namespace: str
) -> None:
    sm = SyntheticModel(seed=22)
    register_synthetic(pg, sm, model=MODEL, config=CONFIG)
    log = redis_log(redis_url, redis_namespace)
    recs = records(sm, [(4, {})], per_window=1_000, seed=5)
    publish(log, recs)
    publish(log, recs[:250])  # retried appends
    first = MonitoringConsumer(pg, log, consumer="a", batch_size=300)
    first.poll()
    first.handle_predictions(log.read(Topic.PREDICTIONS, "monitoring", "a", count=300))  # no ack
    log.read(Topic.PREDICTIONS, "monitoring", "a", count=300)  # lost before the commit
    log.close()

    db = connect(postgres_url)
    log = redis_log(redis_url, redis_namespace)
    assert isinstance(log, RedisEventLog)
    second = MonitoringConsumer(db, log, consumer="b", batch_size=300)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        second.run(stop_when_idle=True, block_ms=0)
        if log.pending_count(Topic.PREDICTIONS, "monitoring") == 0 and second.poll().idle:
            break
        time.sleep(0.1)
    expected = Binner(load_profile(db, MODEL, 1), WINDOW_MS).bin(recs)
    stored = {start: state for start, _, state in windows_of(db, MODEL, 1)}
    assert sorted(stored) == sorted(expected)
    for start, state in expected.items():
        assert (stored[start].n, stored[start].counts) == (state.n, state.counts)
    with db.transaction() as tx:
        assert tx.fetchone("SELECT COUNT(*) FROM monitoring_predictions") == (4_000,)
    db.close()
    log.close()


def test_label_delay_on_postgres_and_redis(pg: Database, rlog: EventLog) -> None:
    sm = SyntheticModel(seed=23)
    register_synthetic(pg, sm, model=MODEL, config=CONFIG)
    rng = np.random.default_rng(3)
    cols = sm.sample(2_000, rng)
    recs = sm.records(MODEL, 1, cols, start_ms=0, interval_ms=100, prefix="d")
    publish(rlog, recs)
    seen: list[Alert] = []
    consumer = MonitoringConsumer(pg, rlog, sinks=[CallbackSink(seen.append)])
    consumer.run(stop_when_idle=True, block_ms=0)
    consumer.judge(flush=True)
    assert [a for a in seen if a.kind == "performance"] == []
    labels = sm.label_records(recs, sm.labels(sm.predict(cols), rng, flip=0.4), timestamp_ms=1)
    publish(rlog, labels)
    consumer.run(stop_when_idle=True, block_ms=0)
    assert [(a.subject, a.state) for a in seen if a.kind == "performance"] == [("auc", "firing")]
    assert [a.key for a in active_alerts(pg, MODEL)] == [f"{MODEL}:v1:performance:auc"]


def test_read_views_and_acknowledgement_on_postgres(pg: Database, rlog: EventLog) -> None:
    """The JSON read views and alert acknowledgement on PostgreSQL: drift of the shifted
    feature, distributions, performance per window and the acknowledgement's lifecycle."""
    sm = SyntheticModel(seed=24)
    baseline = register_synthetic(pg, sm, model=MODEL, config=CONFIG)
    recs = records(sm, [(2, {}), (2, {"x3": 1.0})], per_window=500)
    publish(rlog, recs)
    p = np.array([r.prediction[0] for r in recs])
    y = sm.labels(p, np.random.default_rng(2))
    submit_labels(pg, sm.label_records(recs, y, timestamp_ms=1))
    consumer = MonitoringConsumer(pg, rlog)
    consumer.run(stop_when_idle=True, block_ms=0)
    consumer.judge(flush=True)

    key = f"{MODEL}:v1:drift:x3"
    [summary] = model_list(pg).models
    assert (summary.model, summary.versions) == (MODEL, [1])
    assert summary.active_alerts == len(active_alerts(pg, MODEL)) >= 1
    drift = drift_view(pg, MODEL)
    assert [w.window_start for w in drift.windows] == [k * WINDOW_MS for k in range(4)]
    newest = drift.windows[-1].features["x3"]
    assert newest.status == "alert" and (newest.psi or 0) > drift.thresholds.psi_alert
    assert [w.window_start for w in drift_view(pg, MODEL, 1, last=3).windows] == [
        k * WINDOW_MS for k in range(1, 4)
    ]
    dist = {f.feature: f for f in distribution_view(pg, MODEL).features}
    assert sum(dist["x3"].current) == pytest.approx(1.0) == sum(dist["x3"].reference)
    gap = max(abs(c - r) for c, r in zip(dist["x3"].current, dist["x3"].reference, strict=True))
    assert gap > 0.1
    [auc] = performance_view(pg, MODEL).metrics
    assert auc.baseline == pytest.approx(baseline) and len(auc.windows) == 4
    first = [i for i, r in enumerate(recs) if r.timestamp_ms < WINDOW_MS]
    assert auc.windows[0].n == len(first) == 500
    assert auc.windows[0].value == pytest.approx(roc_auc(y[first], p[first]))

    acked = acknowledge_alert(pg, key, "dana", "on it")
    assert [
        (a.acknowledged_by, a.ack_comment) for a in firing_alerts(pg, MODEL) if a.key == key
    ] == [("dana", "on it")]
    assert acked.acknowledged_at_ms is not None
    condition = Condition(model=MODEL, version=1, kind="drift", subject="x3", active=False)
    with pg.transaction() as tx:
        apply_conditions(tx, [condition])
    with pytest.raises(FailedPreconditionError, match="not firing"):
        acknowledge_alert(pg, key, "dana")
    with pg.transaction() as tx:
        apply_conditions(tx, [msgspec.structs.replace(condition, active=True)])
    [again] = [a for a in firing_alerts(pg, MODEL) if a.key == key]
    assert (again.acknowledged_by, again.acknowledged_at_ms, again.ack_comment) == (None, None, "")
    with pytest.raises(NotFoundError):
        acknowledge_alert(pg, f"{MODEL}:v1:drift:nope", "dana")
