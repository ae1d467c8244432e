"""SLOs given on the command line (``--slo p99=2ms --slo errors=0.1%``) and the verdict.

A run passes when every latency percentile is within its limit, the error rate (shed requests
included: a shed request is a failed one to its caller) is within budget, and the achieved
rate of successful responses reaches the offered rate (within ``min_rate_ratio``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from carrara.errors import InvalidArgumentError
from carrara.loadgen.histogram import LatencySummary

__all__ = ["SLO", "Check", "Verdict", "evaluate", "parse_duration_ms", "parse_slo"]

_PERCENTILES = {
    "p50": "p50_ms",
    "p90": "p90_ms",
    "p99": "p99_ms",
    "p99.9": "p999_ms",
    "p999": "p999_ms",
    "max": "max_ms",
    "mean": "mean_ms",
}
_UNITS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}


class SLO(msgspec.Struct, frozen=True, kw_only=True):
    """Latency limits in ms by percentile name, an error budget and a throughput floor."""

    latency_ms: dict[str, float] = msgspec.field(default_factory=dict)
    max_error_rate: float = 0.001
    min_rate_ratio: float = 0.99

    def describe(self) -> str:
        parts = [f"{k}<={v:g}ms" for k, v in self.latency_ms.items()]
        parts.append(f"errors<={self.max_error_rate:.3%}")
        return ", ".join(parts)


class Check(msgspec.Struct, frozen=True):
    """One condition: ``actual <= limit`` (op ``"<="``) or ``actual >= limit`` (``">="``)."""

    name: str
    op: str
    limit: float
    actual: float
    passed: bool


class Verdict(msgspec.Struct, frozen=True):
    passed: bool
    checks: list[Check]

    def describe(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        if not failed:
            return "PASS"
        return "FAIL: " + "; ".join(
            f"{c.name} {c.actual:.4g} (needs {c.op} {c.limit:.4g})" for c in failed
        )


def parse_duration_ms(text: str) -> float:
    """``2ms`` / ``250us`` / ``0.5s`` / ``100ns`` -> milliseconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ns|us|µs|ms|s)\s*", text)
    if not m:
        raise InvalidArgumentError(f"{text!r} is not a duration like 2ms, 250us or 0.5s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_slo(items: Iterable[str]) -> SLO:
    """Parse ``p99=2ms``, ``p99.9=10ms``, ``errors=0.1%`` (comma-separated or repeated)."""
    latency: dict[str, float] = {}
    errors = 0.001
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep:
                raise InvalidArgumentError(f"SLO {part!r} is not NAME=VALUE (e.g. p99=2ms)")
            if key in ("errors", "error_rate"):
                value = value.strip()
                errors = float(value[:-1]) / 100 if value.endswith("%") else float(value)
            elif key in _PERCENTILES:
                latency[key] = parse_duration_ms(value)
            else:
                known = ", ".join([*_PERCENTILES, "errors"])
                raise InvalidArgumentError(f"unknown SLO {key!r}; known: {known}")
    return SLO(latency_ms=latency, max_error_rate=errors)


def evaluate(
    slo: SLO,
    latency: LatencySummary,
    *,
    requests: int,
    failed: int,
    offered_rate: float | None,
    achieved_rate: float,
) -> Verdict:
    checks = [
        Check(
            f"{name} ms",
            "<=",
            limit,
            getattr(latency, _PERCENTILES[name]),
            getattr(latency, _PERCENTILES[name]) <= limit,
        )
        for name, limit in slo.latency_ms.items()
    ]
    rate = failed / requests if requests else 1.0
    checks.append(Check("error rate", "<=", slo.max_error_rate, rate, rate <= slo.max_error_rate))
    if offered_rate:
        ratio = achieved_rate / offered_rate
        checks.append(
            Check("achieved/offered", ">=", slo.min_rate_ratio, ratio, ratio >= slo.min_rate_ratio)
        )
    return Verdict(passed=all(c.passed for c in checks), checks=checks)
