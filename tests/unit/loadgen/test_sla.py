"""SLO parsing and the verdict."""

from __future__ import annotations

import pytest

from carrara.errors import InvalidArgumentError
from carrara.loadgen.histogram import LatencySummary
from carrara.loadgen.runner import ramp_rates
from carrara.loadgen.sla import evaluate, parse_duration_ms, parse_slo

LAT = LatencySummary(
    count=1000, mean_ms=0.8, p50_ms=0.7, p90_ms=1.1, p99_ms=1.9, p999_ms=4.0, max_ms=9.0
)


def test_parse() -> None:
    slo = parse_slo(["p99=2ms,p50=500us", "p99.9=0.01s", "errors=0.5%"])
    assert slo.latency_ms == {"p99": 2.0, "p50": 0.5, "p99.9": 10.0}
    assert slo.max_error_rate == pytest.approx(0.005)
    assert parse_duration_ms("250ns") == pytest.approx(0.00025)


@pytest.mark.parametrize("bad", ["p99", "p98=2ms", "p99=2", "p99=fast"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_slo([bad])


def test_verdict() -> None:
    ok = evaluate(
        parse_slo(["p99=2ms"]), LAT, requests=1000, failed=1, offered_rate=2000, achieved_rate=1999
    )
    assert ok.passed and ok.describe() == "PASS"
    slow = evaluate(
        parse_slo(["p99=1ms"]), LAT, requests=1000, failed=0, offered_rate=2000, achieved_rate=2000
    )
    assert not slow.passed and "p99 ms" in slow.describe()
    shed = evaluate(
        parse_slo(["p99=2ms"]), LAT, requests=1000, failed=50, offered_rate=2000, achieved_rate=1900
    )
    failed = {c.name for c in shed.checks if not c.passed}
    assert failed == {"error rate", "achieved/offered"}


def test_ramp_rates() -> None:
    assert ramp_rates("500:2000:500") == [500, 1000, 1500, 2000]
    assert ramp_rates("100:800:x2") == [100, 200, 400, 800]
    with pytest.raises(InvalidArgumentError):
        ramp_rates("100:800")
