"""Prometheus metrics of one gateway (its own registry, so several gateways can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from carrara.core import FeatureCache

__all__ = ["GatewayMetrics"]

# Sub-millisecond resolution where the gateway lives, up to a second for slow backends.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GatewayMetrics:
    def __init__(self, cache: FeatureCache | None = None) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "carrara_predict_latency_seconds",
            "Server-side predict latency per model, version and variant",
            ["model", "version", "variant"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "carrara_predictions",
            "Entities predicted",
            ["model", "version", "variant"],
            registry=self.registry,
        )
        self.errors = Counter(
            "carrara_predict_errors",
            "Failed predict calls by status code",
            ["model", "code"],
            registry=self.registry,
        )
        self.shed = Counter(
            "carrara_predict_shed",
            "Requests refused at the in-flight limit",
            registry=self.registry,
        )
        self.degraded = Counter(
            "carrara_predict_degraded",
            "Entities served degraded (defaults or fallback)",
            ["model"],
            registry=self.registry,
        )
        if cache is not None:
            ratio = Gauge(
                "carrara_feature_cache_hit_ratio",
                "Feature cache hits / lookups",
                registry=self.registry,
            )

            def hit_ratio() -> float:
                s = cache.stats()
                total = s["hits"] + s["misses"]
                return s["hits"] / total if total else 0.0

            ratio.set_function(hit_ratio)
            size = Gauge(
                "carrara_feature_cache_entries", "Feature cache entries", registry=self.registry
            )
            size.set_function(lambda: float(len(cache)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
