"""Prometheus metrics of one gateway, read from the native engine's counters at scrape time
(its own registry, so several gateways can share a process). Nothing is recorded per request
in Python: the engine counts in C++."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from carrara.core import FeatureCache

__all__ = ["GatewayMetrics"]


class _EngineCollector(Collector):
    def __init__(self, engine: Any, cache: FeatureCache | None) -> None:
        self.engine = engine
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics()
        bounds: list[float] = m["buckets"]
        latency = HistogramMetricFamily(
            "carrara_predict_latency_seconds",
            "Server-side predict latency per model, version and variant",
            labels=["model", "version", "variant"],
        )
        predictions = CounterMetricFamily(
            "carrara_predictions", "Entities predicted", labels=["model", "version", "variant"]
        )
        variant_errors = CounterMetricFamily(
            "carrara_variant_errors",
            "Times a variant failed to answer (backend error or timeout, open breaker); a "
            "fallback may have answered for it",
            labels=["model", "version", "variant"],
        )
        variant_degraded = CounterMetricFamily(
            "carrara_variant_degraded",
            "Entities a variant answered degraded (defaults, store down, or as the fallback)",
            labels=["model", "version", "variant"],
        )
        for row in m["variants"]:
            model, variant, version, requests, entities, total_s, buckets, errors, degraded = row
            labels = [model, str(version), variant]
            if requests:  # a variant that only failed has no latency or predictions yet
                cumulative: list[tuple[str, float]] = []
                running = 0
                for bound, count in zip([*map(str, bounds), "+Inf"], buckets, strict=True):
                    running += count
                    cumulative.append((bound, float(running)))
                latency.add_metric(labels, cumulative, total_s)
                predictions.add_metric(labels, float(entities))
            variant_errors.add_metric(labels, float(errors))
            variant_degraded.add_metric(labels, float(degraded))
        yield latency
        yield predictions
        yield variant_errors
        yield variant_degraded
        errors = CounterMetricFamily(
            "carrara_predict_errors",
            "Failed predict calls by status code",
            labels=["model", "code"],
        )
        for model, code, count in m["errors"]:
            errors.add_metric([model, code], float(count))
        yield errors
        yield CounterMetricFamily(
            "carrara_predict_shed", "Requests refused at the in-flight limit", value=m["shed"]
        )
        degraded = CounterMetricFamily(
            "carrara_predict_degraded",
            "Entities served degraded (defaults, store down, or fallback)",
            labels=["model"],
        )
        for model, count in m["degraded"]:
            degraded.add_metric([model], float(count))
        yield degraded
        yield CounterMetricFamily(
            "carrara_online_store_errors",
            "Online-store reads that failed or passed their deadline (served degraded)",
            value=m["store_errors"],
        )
        yield CounterMetricFamily(
            "carrara_prediction_log_dropped",
            "Prediction records dropped because the log queue was at its byte bound",
            value=m["log_dropped"],
        )
        yield GaugeMetricFamily(
            "carrara_prediction_log_queued_bytes",
            "Bytes of prediction records waiting for the event log",
            value=m["log_queued_bytes"],
        )
        yield GaugeMetricFamily(
            "carrara_predict_in_flight",
            "Requests admitted and not yet answered",
            value=m["in_flight"],
        )
        yield GaugeMetricFamily(
            "carrara_predict_in_flight_limit",
            "Requests admitted at once before RESOURCE_EXHAUSTED (max_in_flight)",
            value=m["max_in_flight"],
        )
        if self.cache is not None:
            s = self.cache.stats()
            total = s["hits"] + s["misses"]
            yield GaugeMetricFamily(
                "carrara_feature_cache_hit_ratio",
                "Feature cache hits / lookups",
                value=s["hits"] / total if total else 0.0,
            )
            yield GaugeMetricFamily(
                "carrara_feature_cache_entries", "Feature cache entries", value=float(s["size"])
            )


class _FollowerCollector(Collector):
    def __init__(self, follower: Any) -> None:
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        s = self.follower.status()
        yield GaugeMetricFamily(
            "carrara_deployments_stale_seconds",
            "Seconds since the gateway last read the deployments topic",
            value=s.stale_s,
        )
        yield GaugeMetricFamily(
            "carrara_deployments_connected",
            "1 when the last read of the deployments topic succeeded",
            value=1.0 if s.connected else 0.0,
        )
        yield CounterMetricFamily(
            "carrara_deployments_applied", "Deployments loaded and switched to", value=s.applied
        )
        yield CounterMetricFamily(
            "carrara_deployments_failed",
            "Deployments refused by this gateway (bad artifact, load failure)",
            value=s.failed,
        )
        available = GaugeMetricFamily(
            "carrara_model_available",
            "1 when the model is served, 0 when its deployment could not be loaded",
            labels=["model"],
        )
        for model, m in sorted(s.models.items()):
            available.add_metric([model], 1.0 if m.state == "serving" else 0.0)
        yield available


class GatewayMetrics:
    def __init__(
        self, engine: Any, cache: FeatureCache | None = None, *, follower: Any = None
    ) -> None:
        """``engine`` is the native engine (``ServingEngine.native``); ``follower`` the
        registry deployment follower, if any."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, cache))
        if follower is not None:
            self.registry.register(_FollowerCollector(follower))

    def render(self) -> bytes:
        return generate_latest(self.registry)
