"""The consumer end to end on the durable local event log: drift on generated traffic, no
false alarms on a long stable run, delayed labels, and restarts that neither lose nor
double-count a prediction."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from carrara.eventlog import EventLog, LocalEventLog, open_event_log
from carrara.monitoring import (
    Alert,
    CallbackSink,
    EventLogSink,
    ModelMonitorConfig,
    MonitoringConsumer,
    active_alerts,
    configure_model,
    retrain_on_degradation,
    submit_labels,
)
from carrara.monitoring.profiles import load_profile
from carrara.monitoring.store import drift_history, performance_history, windows_of
from carrara.monitoring.traffic import SyntheticModel
from carrara.monitoring.windows import Binner, WindowState
from carrara.sql import Database, connect
from carrara.types import Topic

from .helpers import MODEL, WINDOW_MS, publish, register, traffic


def drain(consumer: MonitoringConsumer) -> None:
    consumer.run(stop_when_idle=True, block_ms=0)


def drift_alerts(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.kind == "drift"]


def test_shifted_feature_alerts_and_the_others_do_not(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=1)
    register(db, sm)
    # 12 stable windows, 10 with x1 shifted by 0.5 sd, 6 stable again; 1,000 rows per window.
    records = traffic(sm, [(12, {}), (10, {"x1": 0.5}), (6, {})], per_window=1_000)
    publish(event_log, records)
    seen: list[Alert] = []
    consumer = MonitoringConsumer(db, event_log, sinks=[CallbackSink(seen.append)])
    drain(consumer)
    features = [a for a in drift_alerts(seen) if a.subject != "__prediction__"]
    # Exactly one alert for x1, raised on the first shifted window, held (not repeated) while
    # the shift lasts, resolved on the first window after it.
    assert [(a.subject, a.state, a.window_start) for a in features] == [
        ("x1", "firing", 12 * WINDOW_MS),
        ("x1", "resolved", 22 * WINDOW_MS),
    ]
    assert features[0].started_ms == features[1].started_ms
    history = drift_history(db, MODEL, 1)
    assert len({s for s, _ in history}) == 27  # the last window is still open
    x1 = {s: r for s, r in history if r.feature == "x1"}
    assert all(x1[s * WINDOW_MS].status == "alert" for s in range(12, 22))
    assert all(x1[s * WINDOW_MS].psi < 0.1 for s in range(12))  # type: ignore[operator]
    assert active_alerts(db, MODEL) == []


def test_long_stable_run_raises_no_alert(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=2)
    register(db, sm)
    # 40 windows x 6 checked columns = 240 checks at full test power (1,000 rows each).
    publish(event_log, traffic(sm, [(40, {})], per_window=1_000, seed=11))
    seen: list[Alert] = []
    consumer = MonitoringConsumer(db, event_log, sinks=[CallbackSink(seen.append)])
    drain(consumer)
    consumer.judge(flush=True)
    history = drift_history(db, MODEL, 1)
    assert len(history) == 40 * 6  # 4 numeric + 1 categorical + the prediction
    assert seen == []
    statuses = Counter(r.status for _, r in history)
    assert statuses["alert"] == 0 and statuses["ok"] > 0.9 * len(history)


def test_categorical_shift_alerts(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=3)
    register(db, sm)
    rng = np.random.default_rng(5)
    stable = sm.sample(2_000, rng)
    moved = sm.sample(2_000, rng, segment_p=np.array([0.1, 0.1, 0.2, 0.3, 0.3]))
    recs = sm.records(MODEL, 1, stable, start_ms=0, interval_ms=60, prefix="a")
    recs += sm.records(MODEL, 1, moved, start_ms=2 * WINDOW_MS, interval_ms=60, prefix="b")
    publish(event_log, recs)
    seen: list[Alert] = []
    consumer = MonitoringConsumer(db, event_log, sinks=[CallbackSink(seen.append)])
    drain(consumer)
    consumer.judge(flush=True)
    segment = [a for a in seen if a.subject == "segment"]
    assert [(a.state, a.window_start) for a in segment] == [("firing", 2 * WINDOW_MS)]
    assert all(a.subject in ("segment", "__prediction__") for a in seen)


def _counts_by_window(db: Database, records: list) -> dict[int, WindowState]:  # type: ignore[type-arg]
    binner = Binner(load_profile(db, MODEL, 1), WINDOW_MS)
    return binner.bin(records)


def test_restart_neither_loses_nor_double_counts(tmp_path: object) -> None:
    db_url = f"sqlite:///{tmp_path}/registry.db"
    log_url = f"local:///{tmp_path}/events.db?visibility_timeout_ms=300"
    sm = SyntheticModel(seed=4)
    db = connect(db_url)
    log = open_event_log(log_url)
    register(db, sm)
    records = traffic(sm, [(5, {})], per_window=1_000, seed=3)
    publish(log, records)
    publish(log, records[1_000:1_300])  # the gateway retried: same request ids again
    first = MonitoringConsumer(db, log, consumer="a", batch_size=400)
    first.poll()
    first.poll()
    # Crash after the commit, before the ack: these events come back and must be skipped.
    batch = log.read(Topic.PREDICTIONS, "monitoring", "a", count=400)
    first.handle_predictions(batch)
    # Crash before the commit: read, never applied, never acked.
    log.read(Topic.PREDICTIONS, "monitoring", "a", count=400)
    db.close()
    log.close()

    db = connect(db_url)
    log = open_event_log(log_url)
    assert isinstance(log, LocalEventLog)
    second = MonitoringConsumer(db, log, consumer="b", batch_size=400)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        drain(second)
        if log.pending_count(Topic.PREDICTIONS, "monitoring") == 0 and second.poll().idle:
            break
        time.sleep(0.1)
    second.judge(flush=True)

    expected = _counts_by_window(db, records)
    stored = {start: state for start, _, state in windows_of(db, MODEL, 1)}
    assert sorted(stored) == sorted(expected) == [i * WINDOW_MS for i in range(5)]
    for start, state in expected.items():
        assert stored[start].n == state.n == 1_000
        assert stored[start].counts == state.counts
        assert stored[start].missing == state.missing
    with db.transaction() as tx:
        assert tx.fetchone("SELECT COUNT(*) FROM monitoring_predictions") == (5_000,)
    dupes = second.metrics.registry.get_sample_value(
        "carrara_monitor_duplicates_total", {"model": MODEL, "version": "1"}
    )
    assert dupes is not None and dupes >= 300 + 400  # the retries + the committed, unacked batch
    db.close()
    log.close()


def test_degradation_appears_once_labels_arrive_not_before(
    db: Database, event_log: EventLog
) -> None:
    sm = SyntheticModel(seed=5)
    baseline = register(db, sm)
    rng = np.random.default_rng(9)
    cols = sm.sample(3_000, rng)
    records = sm.records(MODEL, 1, cols, start_ms=0, interval_ms=100, prefix="p")
    publish(event_log, records)
    seen: list[Alert] = []
    consumer = MonitoringConsumer(
        db, event_log, sinks=[CallbackSink(seen.append), EventLogSink(event_log)]
    )
    drain(consumer)
    consumer.judge(flush=True)
    # Hours later the outcomes arrive: the world changed, a third of them flipped.
    assert [a for a in seen if a.kind == "performance"] == []
    labels = sm.label_records(
        records, sm.labels(sm.predict(cols), rng, flip=0.35), timestamp_ms=10 * 3_600_000
    )
    publish(event_log, labels[:100])  # too few to judge (min_labels 200)
    drain(consumer)
    assert [a for a in seen if a.kind == "performance"] == []
    publish(event_log, labels[100:])
    publish(event_log, labels[:500])  # a redelivered label changes nothing
    drain(consumer)
    perf = [a for a in seen if a.kind == "performance"]
    assert [(a.subject, a.state) for a in perf] == [("auc", "firing")]
    assert perf[0].value is not None and perf[0].value < baseline - 0.05
    assert [a.key for a in active_alerts(db, MODEL)] == [f"{MODEL}:v1:performance:auc"]
    assert performance_history(db, MODEL, 1)  # per-window metric for the report
    # The training trigger subscribes to the alerts topic and hears the degradation once.
    calls: list[tuple[str, int]] = []
    trigger = retrain_on_degradation(event_log, lambda m, v, a: calls.append((m, v)))
    assert trigger.poll() == 1 and calls == [(MODEL, 1)]
    assert trigger.poll() == 0


def test_good_labels_through_the_api_raise_nothing(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=6)
    register(db, sm)
    rng = np.random.default_rng(10)
    cols = sm.sample(2_000, rng)
    records = sm.records(MODEL, 1, cols, start_ms=0, interval_ms=100, prefix="q")
    labels = sm.label_records(records, sm.labels(sm.predict(cols), rng), timestamp_ms=1)
    # Labels may even arrive before the predictions are consumed.
    assert submit_labels(db, labels) == 2_000
    assert submit_labels(db, labels[:10]) == 0
    publish(event_log, records)
    consumer = MonitoringConsumer(db, event_log)
    drain(consumer)
    consumer.judge(flush=True)
    assert consumer.evaluate_performance_now(MODEL, 1) == []
    value = consumer.metrics.registry.get_sample_value(
        "carrara_monitor_performance", {"model": MODEL, "version": "1", "metric": "auc"}
    )
    assert value is not None and value > 0.6
    assert active_alerts(db, MODEL) == []


def test_unprofiled_and_malformed_events_are_skipped(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=7)
    register(db, sm)
    records = traffic(sm, [(1, {})], per_window=100, version=9)  # no profile for v9
    publish(event_log, records)
    event_log.append(Topic.PREDICTIONS, b"\x00not msgpack")
    consumer = MonitoringConsumer(db, event_log)
    result = consumer.run(stop_when_idle=True, block_ms=0)
    assert result.predictions_new == 100
    reg = consumer.metrics.registry
    assert (
        reg.get_sample_value("carrara_monitor_unprofiled_total", {"model": MODEL, "version": "9"})
        == 100
    )
    assert reg.get_sample_value("carrara_monitor_malformed_total", {"topic": "predictions"}) == 1
    assert windows_of(db, MODEL, 9) == []


def test_prometheus_exposition(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=8)
    register(db, sm)
    publish(event_log, traffic(sm, [(3, {"x0": 1.0})], per_window=300))
    consumer = MonitoringConsumer(db, event_log)
    drain(consumer)
    text = consumer.metrics.exposition().decode()
    assert 'carrara_monitor_predictions_total{model="churn",version="1"} 900.0' in text
    assert 'carrara_monitor_drift_psi{feature="x0",model="churn",version="1"}' in text
    assert 'carrara_monitor_drift_status{feature="x0",model="churn",version="1"} 2.0' in text
    assert 'carrara_monitor_alerts_active{kind="drift",model="churn"}' in text


@pytest.mark.parametrize("window_ms", [30_000, 120_000])
def test_window_length_is_configurable(db: Database, event_log: EventLog, window_ms: int) -> None:
    sm = SyntheticModel(seed=9)
    register(db, sm)
    configure_model(db, MODEL, ModelMonitorConfig(window_ms=window_ms, allowed_lateness_ms=0))
    publish(event_log, traffic(sm, [(4, {})], per_window=100))  # 4 minutes of traffic
    drain(MonitoringConsumer(db, event_log))
    starts = [s for s, w, _ in windows_of(db, MODEL, 1)]
    assert starts == list(range(0, 4 * WINDOW_MS, window_ms))


def test_late_record_is_added_to_its_judged_window(db: Database, event_log: EventLog) -> None:
    sm = SyntheticModel(seed=14)
    register(db, sm)
    records = traffic(sm, [(3, {})], per_window=300)
    publish(event_log, records)
    consumer = MonitoringConsumer(db, event_log)
    drain(consumer)
    judged = {s for s, _ in drift_history(db, MODEL, 1)}
    assert judged == {0, WINDOW_MS}  # the third window is still open
    late = traffic(sm, [(1, {})], per_window=300, prefix="late", seed=99)[:1]
    publish(event_log, late)  # made in window 0, arriving after it was judged
    drain(consumer)
    stored = {s: w for s, _, w in windows_of(db, MODEL, 1)}
    assert stored[0].n == 301
    rejudged = {r.feature: r for s, r in drift_history(db, MODEL, 1) if s == 0}
    assert rejudged["x0"].n == 301


def test_two_consumers_of_one_group_share_the_work(db: Database, event_log: EventLog) -> None:
    import threading

    sm = SyntheticModel(seed=15)
    register(db, sm)
    records = traffic(sm, [(4, {})], per_window=1_000)
    publish(event_log, records)
    publish(event_log, records[:500])
    consumers = [
        MonitoringConsumer(db, event_log, consumer=f"c{i}", batch_size=200) for i in range(2)
    ]
    threads = [threading.Thread(target=drain, args=(c,)) for c in consumers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stored = {s: w.n for s, _, w in windows_of(db, MODEL, 1)}
    assert stored == {i * WINDOW_MS: 1_000 for i in range(4)}
    done = [
        c.metrics.registry.get_sample_value(
            "carrara_monitor_predictions_total", {"model": MODEL, "version": "1"}
        )
        or 0
        for c in consumers
    ]
    assert sum(done) == 4_000 and all(d > 0 for d in done)


def test_purge_drops_old_state(db: Database, event_log: EventLog) -> None:
    from carrara.monitoring.store import purge_before

    sm = SyntheticModel(seed=16)
    register(db, sm)
    publish(event_log, traffic(sm, [(4, {})], per_window=250))
    drain(MonitoringConsumer(db, event_log))
    assert purge_before(db, 2 * WINDOW_MS) == 500
    assert [s for s, _, _ in windows_of(db, MODEL, 1)] == [2 * WINDOW_MS, 3 * WINDOW_MS]
    assert {s for s, _ in drift_history(db, MODEL, 1)} == {2 * WINDOW_MS}
