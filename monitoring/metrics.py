"""Prometheus metrics of one monitoring consumer (its own registry, so several consumers and
tests can share a process). Served by ``carrara monitor run --metrics-port``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["MonitoringMetrics"]


class MonitoringMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        mv = ["model", "version"]
        self.predictions = Counter(
            "carrara_monitor_predictions",
            "Predictions profiled (each counted once)",
            mv,
            registry=r,
        )
        self.duplicates = Counter(
            "carrara_monitor_duplicates",
            "Redelivered predictions skipped by request id",
            mv,
            registry=r,
        )
        self.unprofiled = Counter(
            "carrara_monitor_unprofiled",
            "Predictions of versions without a reference profile (stored for labels only)",
            mv,
            registry=r,
        )
        self.malformed = Counter(
            "carrara_monitor_malformed", "Events that did not decode", ["topic"], registry=r
        )
        self.labels = Counter("carrara_monitor_labels", "New labels stored", ["model"], registry=r)
        self.windows_judged = Counter(
            "carrara_monitor_windows_judged", "Windows whose drift was computed", mv, registry=r
        )
        self.psi = Gauge(
            "carrara_monitor_drift_psi",
            "PSI of the last judged window",
            [*mv, "feature"],
            registry=r,
        )
        self.ks = Gauge(
            "carrara_monitor_drift_ks_statistic",
            "KS statistic of the last judged window (numeric features)",
            [*mv, "feature"],
            registry=r,
        )
        self.js = Gauge(
            "carrara_monitor_drift_js_distance",
            "Jensen-Shannon distance of the last judged window (categorical features)",
            [*mv, "feature"],
            registry=r,
        )
        self.drift_status = Gauge(
            "carrara_monitor_drift_status",
            "0 ok/insufficient, 1 warn, 2 alert, for the last judged window",
            [*mv, "feature"],
            registry=r,
        )
        self.performance = Gauge(
            "carrara_monitor_performance",
            "Rolling metric on labelled predictions",
            [*mv, "metric"],
            registry=r,
        )
        self.labelled = Gauge(
            "carrara_monitor_labelled_predictions",
            "Labelled predictions in the rolling window",
            mv,
            registry=r,
        )
        self.alerts_active = Gauge(
            "carrara_monitor_alerts_active",
            "Conditions firing now",
            ["model", "kind"],
            registry=r,
        )
        self.alerts_sent = Counter(
            "carrara_monitor_alert_transitions",
            "Alerts raised or resolved",
            ["model", "kind", "state"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
