"""Monitoring: prediction-log consumer, drift and performance checks, alerts, metrics.

At registration (the registry's hook, same database as the registry)::

    profile = build_profile(train_frame, model_outputs, model="churn", version=3,
                            baseline={"auc": 0.91}, categorical=["country"])
    store_profile(db, profile)

In the monitoring process (``carrara monitor run``)::

    consumer = MonitoringConsumer(db, event_log, sinks=[EventLogSink(event_log),
                                                        WebhookSink(url)])
    consumer.run(duration_s=60)

Labels: on the ``labels`` topic, or :func:`submit_labels`. Per-model thresholds:
:func:`configure_model`. Report: ``carrara monitor report MODEL --out report.html``. Retrain
on degradation: :func:`retrain_on_degradation`.
"""

from .alerts import (
    Alert,
    AlertSubscriber,
    CallbackSink,
    EventLogSink,
    WebhookSink,
    active_alerts,
    decode_alert,
    retrain_on_degradation,
)
from .config import DriftThresholds, Margin, ModelMonitorConfig, PerformanceConfig
from .consumer import MonitoringConsumer, PollResult
from .drift import FeatureDrift
from .metrics import MonitoringMetrics
from .performance import submit_labels
from .profiles import PREDICTION, ReferenceProfile, build_profile, load_profile, store_profile
from .schema import upgrade
from .store import configure_model

__all__ = [
    "PREDICTION",
    "Alert",
    "AlertSubscriber",
    "CallbackSink",
    "DriftThresholds",
    "EventLogSink",
    "FeatureDrift",
    "Margin",
    "ModelMonitorConfig",
    "MonitoringConsumer",
    "MonitoringMetrics",
    "PerformanceConfig",
    "PollResult",
    "ReferenceProfile",
    "WebhookSink",
    "active_alerts",
    "build_profile",
    "configure_model",
    "decode_alert",
    "load_profile",
    "retrain_on_degradation",
    "store_profile",
    "submit_labels",
    "upgrade",
]
