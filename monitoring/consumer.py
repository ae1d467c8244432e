"""The prediction-log consumer: reads ``predictions`` and ``labels`` with a consumer group,
keeps tumbling-window profiles per model version, judges drift when a window closes and
performance when labels join, and raises alerts.

Exactly-once effect over an at-least-once log: each batch is applied in one database
transaction that (1) skips request ids already in ``monitoring_predictions`` (that table is
the dedup set and the label-join side), (2) inserts the new ones, (3) adds the batch's counts
to the stored windows; events are acked only after the commit. A crash before the commit
loses nothing (the log redelivers); a crash after it re-reads events whose request ids are
already stored, which are skipped. Restart = a new consumer on the same database and group.

A window ``[start, start + window_ms)`` is judged once the version's newest prediction is
``allowed_lateness_ms`` past its end. A record arriving for an already judged window is still
added (nothing is lost) and the window is judged again; alerts follow the newest window only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import msgspec

from carrara.eventlog import Event, EventLog
from carrara.sql import Database, Transaction
from carrara.types import LabelRecord, PredictionRecord, Topic, decode_label, decode_prediction

from .alerts import Alert, AlertSink, Condition, SinkBackoff, apply_conditions, deliver_outbox
from .batch_sql import existing_ids, insert_returning, rows_matching
from .config import ModelMonitorConfig
from .drift import FeatureDrift, judge_feature, warm_up
from .metrics import MonitoringMetrics
from .performance import PerformanceResult, evaluate_performance, store_labels
from .profiles import ReferenceProfile, load_profile, prediction_value
from .schema import ensure_schema
from .store import model_config
from .windows import Binner, WindowState, merge_windows

__all__ = ["MonitoringConsumer", "PollResult"]

log = logging.getLogger(__name__)

_state_decoder = msgspec.msgpack.Decoder(WindowState)
_drift_encoder = msgspec.msgpack.Encoder()
_STATUS_LEVEL = {"ok": 0, "insufficient": 0, "warn": 1, "alert": 2}


class PollResult(msgspec.Struct, kw_only=True):
    """What one poll did."""

    predictions_read: int = 0
    predictions_new: int = 0
    duplicates: int = 0
    labels_read: int = 0
    labels_new: int = 0
    windows_judged: int = 0
    alerts: list[Alert] = []

    @property
    def idle(self) -> bool:
        return self.predictions_read == 0 and self.labels_read == 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MonitoringConsumer:
    """One member of a monitoring consumer group over one database and one event log."""

    def __init__(
        self,
        db: Database,
        event_log: EventLog,
        *,
        group: str = "monitoring",
        consumer: str = "monitor-1",
        default_config: ModelMonitorConfig | None = None,
        sinks: Sequence[AlertSink] = (),
        metrics: MonitoringMetrics | None = None,
        batch_size: int = 500,
        refresh_s: float = 30.0,
        sink_backoff: SinkBackoff | None = None,
    ) -> None:
        ensure_schema(db)
        warm_up()
        self.db = db
        self.log = event_log
        self.group = group
        self.consumer = consumer
        self.default_config = default_config or ModelMonitorConfig()
        self.sinks = list(sinks)
        #: When each failing sink is tried again (a down webhook waits alone).
        self.sink_backoff = sink_backoff or SinkBackoff()
        self.metrics = metrics or MonitoringMetrics()
        self.batch_size = batch_size
        self._refresh_s = refresh_s
        # (model, version) -> (profile or None, when looked up); model -> (config, when)
        self._profiles: dict[tuple[str, int], tuple[ReferenceProfile | None, float]] = {}
        self._binners: dict[tuple[str, int], Binner] = {}
        self._configs: dict[str, tuple[ModelMonitorConfig, float]] = {}
        self._drift_dirty: set[tuple[str, int]] = set()
        self._perf_dirty: set[tuple[str, int]] = set()
        self._last_sweep = time.monotonic()
        # A restarted monitor exports the alerts still firing, not an empty gauge.
        self._export_active_alerts(None)

    # -- lookups ------------------------------------------------------------------------------

    def config(self, model: str) -> ModelMonitorConfig:
        hit = self._configs.get(model)
        if hit is None or time.monotonic() - hit[1] > self._refresh_s:
            hit = (model_config(self.db, model, self.default_config), time.monotonic())
            self._configs[model] = hit
        return hit[0]

    def profile(self, model: str, version: int) -> ReferenceProfile | None:
        """The reference profile (cached once found; a missing one is looked up again on
        every call, one indexed read per batch, so a version profiled after its first
        predictions — by another process, e.g. through the API — is judged from the next
        batch on rather than counted as unprofiled)."""
        key = (model, version)
        hit = self._profiles.get(key)
        if hit is None or hit[0] is None:
            from carrara.errors import NotFoundError

            try:
                found: ReferenceProfile | None = load_profile(self.db, model, version)
            except NotFoundError:
                found = None
            hit = (found, time.monotonic())
            self._profiles[key] = hit
            self._binners.pop(key, None)
        return hit[0]

    def _binner(self, model: str, version: int) -> Binner | None:
        key = (model, version)
        binner = self._binners.get(key)
        if binner is None:
            profile = self.profile(model, version)
            if profile is None:
                return None
            binner = Binner(profile, self.config(model).window_ms)
            self._binners[key] = binner
        return binner

    # -- polling ------------------------------------------------------------------------------

    def poll(self, *, block_ms: int = 0, judge: bool = True) -> PollResult:
        """Read and apply one batch of predictions and one of labels, ack them, then judge
        closed windows and pending performance and deliver alerts."""
        result = PollResult()
        events = self.log.read(
            Topic.PREDICTIONS, self.group, self.consumer, count=self.batch_size, block_ms=block_ms
        )
        if events:
            self.handle_predictions(events, result)
            self.log.ack(Topic.PREDICTIONS, self.group, [e.id for e in events])
        labels = self.log.read(Topic.LABELS, self.group, self.consumer, count=self.batch_size)
        if labels:
            self.handle_labels(labels, result)
            self.log.ack(Topic.LABELS, self.group, [e.id for e in labels])
        if judge:
            result.alerts.extend(self.judge(result=result))
        return result

    def run(
        self,
        *,
        max_polls: int | None = None,
        duration_s: float | None = None,
        stop_when_idle: bool = False,
        block_ms: int = 100,
    ) -> PollResult:
        """Poll until a bound is reached; returns the totals."""
        total = PollResult()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        polls = 0
        while (max_polls is None or polls < max_polls) and (
            deadline is None or time.monotonic() < deadline
        ):
            r = self.poll(block_ms=block_ms)
            polls += 1
            for field in msgspec.structs.fields(PollResult):
                if field.name != "alerts":
                    name = field.name
                    setattr(total, name, getattr(total, name) + getattr(r, name))
            total.alerts.extend(r.alerts)
            if stop_when_idle and r.idle:
                break
        return total

    def handle_predictions(self, events: Sequence[Event], result: PollResult | None = None) -> int:
        """Apply a batch of prediction events (idempotently by request id; no ack).
        Returns how many were new."""
        result = result if result is not None else PollResult()
        records: dict[str, PredictionRecord] = {}
        decoded = 0
        for event in events:
            try:
                rec = decode_prediction(event.payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.metrics.malformed.labels(Topic.PREDICTIONS).inc()
                log.warning("skipping undecodable prediction event %s", event.id)
                continue
            decoded += 1
            records.setdefault(rec.request_id, rec)
        result.predictions_read += len(events)
        if not records:
            return 0
        # Profiles and configs are looked up before the write transaction opens (SQLite runs
        # one transaction per connection at a time).
        for model, version in {(r.model, r.version) for r in records.values()}:
            self._binner(model, version)
        with self.db.transaction() as tx:
            inserted = _insert_new(tx, list(records.values()))
            fresh = [r for rid, r in records.items() if rid in inserted]
            if fresh:
                labelled = existing_ids(tx, "monitoring_labels", [r.request_id for r in fresh])
                by_version: dict[tuple[str, int], list[PredictionRecord]] = {}
                for r in fresh:
                    by_version.setdefault((r.model, r.version), []).append(r)
                    if r.request_id in labelled:
                        self._perf_dirty.add((r.model, r.version))
                for (model, version), recs in by_version.items():
                    binner = self._binners.get((model, version))
                    if binner is None:
                        self.metrics.unprofiled.labels(model, str(version)).inc(len(recs))
                        continue
                    merge_windows(tx, model, version, binner.window_ms, binner.bin(recs))
                    _raise_watermark(tx, model, version, max(r.timestamp_ms for r in recs))
                    self._drift_dirty.add((model, version))
                    self.metrics.predictions.labels(model, str(version)).inc(len(recs))
        result.predictions_new += len(fresh)
        result.duplicates += decoded - len(fresh)
        for r in records.values():
            if r.request_id not in inserted:
                self.metrics.duplicates.labels(r.model, str(r.version)).inc()
        return len(fresh)

    def handle_labels(self, events: Sequence[Event], result: PollResult | None = None) -> int:
        """Store a batch of label events (a repeated label is ignored; no ack)."""
        result = result if result is not None else PollResult()
        labels: list[LabelRecord] = []
        for event in events:
            try:
                labels.append(decode_label(event.payload))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.metrics.malformed.labels(Topic.LABELS).inc()
                log.warning("skipping undecodable label event %s", event.id)
        result.labels_read += len(events)
        new = self.add_labels(labels)
        result.labels_new += new
        return new

    def add_labels(self, labels: Sequence[LabelRecord]) -> int:
        """Store labels (from the topic or the API) and mark their versions for evaluation."""
        if not labels:
            return 0
        with self.db.transaction() as tx:
            new = store_labels(tx, labels)
            ids = list({lb.request_id for lb in labels})
            for model, version in rows_matching(
                tx, "SELECT DISTINCT model, version FROM monitoring_predictions", ids
            ):
                self._perf_dirty.add((str(model), int(version)))
        for lb in new:
            self.metrics.labels.labels(lb.model).inc()
        return len(new)

    # -- judging ------------------------------------------------------------------------------

    def judge(self, *, flush: bool = False, result: PollResult | None = None) -> list[Alert]:
        """Judge the closed windows (all stored windows when ``flush``) and the pending
        performance evaluations, then deliver queued alerts. Returns the transitions."""
        result = result if result is not None else PollResult()
        alerts: list[Alert] = []
        targets = set(self._drift_dirty)
        if flush:
            with self.db.transaction() as tx:
                targets |= {
                    (str(m), int(v))
                    for m, v in tx.fetchall(
                        "SELECT DISTINCT model, version FROM monitoring_windows WHERE dirty = 1"
                    )
                }
        for model, version in sorted(targets):
            profile = self.profile(model, version)
            if profile is None:
                continue
            cfg = self.config(model)
            with self.db.transaction() as tx:
                judged, transitions, open_left = self._judge_windows(tx, profile, cfg, flush=flush)
                alerts.extend(transitions)
            result.windows_judged += judged
            if not open_left:
                self._drift_dirty.discard((model, version))
        if flush or time.monotonic() - self._last_sweep > self._refresh_s:
            # Labels may also come through the API (another process): sweep every version.
            self._last_sweep = time.monotonic()
            with self.db.transaction() as tx:
                self._perf_dirty |= {
                    (str(m), int(v))
                    for m, v in tx.fetchall("SELECT model, version FROM monitoring_watermarks")
                }
        for model, version in sorted(self._perf_dirty):
            alerts.extend(self._judge_performance(model, version))
        self._perf_dirty.clear()
        for alert in alerts:
            self.metrics.alerts_sent.labels(alert.model, alert.kind, alert.state).inc()
        if alerts:
            self._export_active_alerts({a.model for a in alerts})
        self.deliver()
        return alerts

    def deliver(self) -> int:
        """Drain the alert outbox to the sinks (each on its own, a failing one after its
        backoff); a consumer without sinks leaves the alerts queued for one that has them."""
        if not self.sinks:
            return 0
        return deliver_outbox(self.db, self.sinks, backoff=self.sink_backoff)

    def _judge_windows(
        self, tx: Transaction, profile: ReferenceProfile, cfg: ModelMonitorConfig, *, flush: bool
    ) -> tuple[int, list[Alert], bool]:
        model, version = profile.model, profile.version
        mark = tx.fetchone(
            "SELECT max_timestamp_ms, last_judged_start FROM monitoring_watermarks"
            " WHERE model = ? AND version = ?",
            (model, version),
        )
        if mark is None:
            return 0, [], False
        max_ts, last_judged = int(mark[0]), int(mark[1])
        rows = tx.fetchall(
            "SELECT window_start, window_ms, state FROM monitoring_windows"
            " WHERE model = ? AND version = ? AND dirty = 1 ORDER BY window_start",
            (model, version),
        )
        judged = 0
        open_left = False
        transitions: list[Alert] = []
        m = self.metrics
        for start, window_ms, blob in rows:
            start, window_ms = int(start), int(window_ms)
            if not flush and start + window_ms + cfg.allowed_lateness_ms > max_ts:
                open_left = True
                continue
            state = _state_decoder.decode(bytes(blob))
            results = [
                judge_feature(
                    f, _counts(state, f.name, f.n_bins), state.missing.get(f.name, 0), cfg.drift
                )
                for f in profile.checked()
            ]
            tx.executemany(
                "DELETE FROM monitoring_drift WHERE model = ? AND version = ?"
                " AND window_start = ? AND feature = ?",
                [(model, version, start, r.feature) for r in results],
            )
            tx.executemany(
                "INSERT INTO monitoring_drift (model, version, window_start, feature, result,"
                " status) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (model, version, start, r.feature, _drift_encoder.encode(r), r.status)
                    for r in results
                ],
            )
            tx.execute(
                "UPDATE monitoring_windows SET dirty = 0"
                " WHERE model = ? AND version = ? AND window_start = ?",
                (model, version, start),
            )
            judged += 1
            m.windows_judged.labels(model, str(version)).inc()
            if start < last_judged:
                continue  # a late record re-judged an old window: alerts follow the newest
            last_judged = start
            for r in results:
                labels = (model, str(version), r.feature)
                m.psi.labels(*labels).set(r.psi if r.psi is not None else 0.0)
                if r.ks_statistic is not None:
                    m.ks.labels(*labels).set(r.ks_statistic)
                if r.js is not None:
                    m.js.labels(*labels).set(r.js)
                m.drift_status.labels(*labels).set(_STATUS_LEVEL[r.status])
            transitions.extend(
                apply_conditions(tx, _drift_conditions(model, version, start, results, cfg))
            )
        if judged:
            tx.execute(
                "UPDATE monitoring_watermarks SET last_judged_start = ?"
                " WHERE model = ? AND version = ?",
                (last_judged, model, version),
            )
        return judged, transitions, open_left

    def _judge_performance(self, model: str, version: int) -> list[Alert]:
        profile = self.profile(model, version)
        baseline = profile.baseline if profile is not None else {}
        cfg = self.config(model)
        with self.db.transaction() as tx:
            perf = evaluate_performance(
                tx, model, version, baseline, cfg.performance, window_ms=cfg.window_ms
            )
            self._export_performance(perf)
            if not perf.judged:
                return []
            conditions = [
                Condition(
                    model=model,
                    version=version,
                    kind="performance",
                    subject=c.metric,
                    active=c.degraded,
                    statistic=c.metric,
                    value=c.value,
                    samples=perf.n,
                    threshold=(
                        None
                        if c.baseline is None or c.allowed is None
                        else c.baseline - c.allowed
                        if c.metric == "auc"
                        else c.baseline + c.allowed
                    ),
                    message=(
                        f"{model} v{version}: {c.metric} {c.value:.4f} on {perf.n} labelled"
                        f" predictions vs baseline {c.baseline} (margin {c.allowed})"
                    ),
                )
                for c in perf.checks
                if c.baseline is not None and c.allowed is not None
            ]
            return apply_conditions(tx, conditions)

    def _export_active_alerts(self, models: set[str] | None) -> None:
        """Set the ``alerts_active`` gauge of ``models`` (None: every model with an alert
        row) from the stored alert state."""
        with self.db.transaction() as tx:
            if models is None:
                models = {
                    str(r[0]) for r in tx.fetchall("SELECT DISTINCT model FROM monitoring_alerts")
                }
            for model in sorted(models):
                counts = dict.fromkeys(("drift", "performance"), 0)
                for kind, n in tx.fetchall(
                    "SELECT kind, COUNT(*) FROM monitoring_alerts WHERE model = ? AND active = 1"
                    " GROUP BY kind",
                    (model,),
                ):
                    counts[str(kind)] = int(n)
                for kind, n in counts.items():
                    self.metrics.alerts_active.labels(model, kind).set(n)

    def _export_performance(self, perf: PerformanceResult) -> None:
        v = str(perf.version)
        self.metrics.labelled.labels(perf.model, v).set(perf.n)
        for c in perf.checks:
            if c.value == c.value:
                self.metrics.performance.labels(perf.model, v, c.metric).set(c.value)

    def evaluate_performance_now(self, model: str, version: int) -> list[Alert]:
        """Judge a version's performance immediately (e.g. after the label API was used)."""
        alerts = self._judge_performance(model, version)
        if alerts:
            self._export_active_alerts({model})
        self.deliver()
        return alerts


def _drift_conditions(
    model: str, version: int, start: int, results: list[FeatureDrift], cfg: ModelMonitorConfig
) -> list[Condition]:
    out = []
    for r in results:
        if r.status == "insufficient":
            continue  # too few rows says nothing: keep the condition as it was
        out.append(
            Condition(
                model=model,
                version=version,
                kind="drift",
                subject=r.feature,
                active=r.status == "alert",
                # The statistic that fired it, beside its own threshold (PSI while none did).
                statistic=r.alert_statistic or "PSI",
                value=r.alert_value if r.alert_statistic else r.psi,
                threshold=r.alert_threshold if r.alert_statistic else cfg.drift.psi_alert,
                samples=r.n,
                message=f"{model} v{version} {r.feature}: " + ("; ".join(r.reasons) or "stable"),
                window_start=start,
                clear_after=cfg.clear_after_windows,
            )
        )
    return out


def _counts(state: WindowState, name: str, n_bins: int) -> list[int]:
    """A feature's window histogram; empty when absent or binned on other edges (a profile
    replaced under a running consumer: profiles are meant to be immutable per version)."""
    counts = state.counts.get(name)
    return counts if counts is not None and len(counts) == n_bins else [0] * n_bins


def _finite(x: float) -> float:
    return x if x == x else 0.0


def _insert_new(tx: Transaction, records: list[PredictionRecord]) -> set[str]:
    """Insert predictions whose request id is new; returns those request ids. One
    ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` makes the check and the insert one atomic
    step, so two consumers racing on a redelivered event cannot both count it (on PostgreSQL
    the second blocks on the key until the first commits, then skips it)."""
    rows = [
        (r.request_id, r.model, r.version, _finite(prediction_value(r.prediction)), r.timestamp_ms)
        for r in records
    ]
    sql = (
        "INSERT INTO monitoring_predictions (request_id, model, version, score, timestamp_ms)"
        " {source} ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
    )
    return insert_returning(tx, sql, rows, ("text", "text", "integer", "float8", "bigint"))


def _raise_watermark(tx: Transaction, model: str, version: int, ts: int) -> None:
    row = tx.fetchone(
        "SELECT max_timestamp_ms FROM monitoring_watermarks WHERE model = ? AND version = ?",
        (model, version),
    )
    if row is None:
        tx.execute(
            "INSERT INTO monitoring_watermarks (model, version, max_timestamp_ms,"
            " last_judged_start) VALUES (?, ?, ?, ?)",
            (model, version, ts, -1),
        )
    elif ts > int(row[0]):
        tx.execute(
            "UPDATE monitoring_watermarks SET max_timestamp_ms = ? WHERE model = ? AND version = ?",
            (ts, model, version),
        )
