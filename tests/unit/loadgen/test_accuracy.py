"""The harness's own acceptance test: against a loopback server whose latency distribution is
known, the reported percentiles are within 5 % of the truth — also when the server stalls,
where a closed-loop client (coordinated omission) under-reports by an order of magnitude.

Delays are tens to hundreds of milliseconds so that scheduler noise on a busy 2-core machine
(a millisecond or two) stays well inside the 5 % being tested.
"""

from __future__ import annotations

import numpy as np
import pytest

from carrara.loadgen.runner import StagePlan, run_stage
from carrara.loadgen.selftest import DelayServer, MixtureDelay
from carrara.loadgen.targets import TargetSpec

QS = (0.5, 0.9, 0.99)


def _spec(port: int) -> TargetSpec:
    return TargetSpec(kind="http", address=f"127.0.0.1:{port}", timeout_s=3.0)


def _reported(result_latency: object) -> list[float]:
    return [getattr(result_latency, f) for f in ("p50_ms", "p90_ms", "p99_ms")]


def test_percentiles_of_a_known_distribution_within_5_percent() -> None:
    delay = MixtureDelay([(0.95, 100.0, 200.0), (0.05, 400.0, 600.0)])
    with DelayServer(delay) as server:
        result = run_stage(
            _spec(server.port),
            StagePlan(rate=200, arrivals="poisson", duration_s=2.5, warmup_s=0.3, seed=7),
        )
    assert result.errors == {} and result.latency.count > 400
    truth = delay.percentiles_ms(QS)  # 152.6, 194.7, 560 ms
    for q, got, want in zip(QS, _reported(result.latency), truth, strict=True):
        assert got == pytest.approx(want, rel=0.05), f"p{q * 100:g}: {got:.1f} vs {want:.1f}"
    assert result.latency.max_ms <= 600 * 1.05


def _stall_truth(base_ms: float, stall_ms: float, rate: float, window_s: float) -> list[float]:
    """Latency of each request of an evenly spaced open-loop stream when the server stops for
    ``stall_ms`` at t=0 (its position in the window does not change the distribution)."""
    t = (np.arange(int(rate * window_s)) / rate - window_s / 3) * 1e3  # ms, stall at 0
    lat = np.full_like(t, base_ms)
    due_in_stall = (t >= -base_ms) & (t < 0)  # response timer fires during the stall
    lat[due_in_stall] = stall_ms - t[due_in_stall]
    arrived_in_stall = (t >= 0) & (t <= stall_ms)  # read only when the stall ends
    lat[arrived_in_stall] = stall_ms + base_ms - t[arrived_in_stall]
    return [float(v) for v in np.percentile(lat, [q * 100 for q in QS], method="higher")]


def test_open_loop_sees_a_stall_that_closed_loop_hides() -> None:
    base, stall, rate, window = 80.0, 500.0, 200.0, 2.5
    delay = MixtureDelay([(1.0, base, base)])
    with DelayServer(delay, stall_after_s=1.3, stall_s=stall / 1e3) as server:
        open_loop = run_stage(
            _spec(server.port),
            StagePlan(rate=rate, arrivals="constant", duration_s=window, warmup_s=0.3),
        )
        actual_stall = server.stall_ms
        assert actual_stall is not None and actual_stall >= stall
        backlog = server.backlog_ms(int(rate * actual_stall / 1e3))
    # The truth for the stall the server really had (~[80, 413, 568] ms for exactly 500 ms),
    # up to the time it then took to read the ~100 requests queued meanwhile (~10 ms, more on a
    # busy 2-core machine): the report must lie in that band, give or take 5 %.
    truth = _stall_truth(base, actual_stall, rate, window)
    upper = _stall_truth(base, actual_stall + backlog, rate, window)
    assert open_loop.errors == {}
    for q, got, low, high in zip(QS, _reported(open_loop.latency), truth, upper, strict=True):
        assert 0.95 * low <= got <= 1.05 * high, f"p{q * 100:g}: {got:.1f} vs {low:.1f}-{high:.1f}"
    assert 0.95 * (actual_stall + base) <= open_loop.latency.max_ms
    assert open_loop.latency.max_ms <= 1.05 * (actual_stall + backlog + base)

    # The same server and stall, measured the naive way: 4 clients each waiting for its answer.
    with DelayServer(delay, stall_after_s=1.3, stall_s=stall / 1e3) as server:
        closed = run_stage(
            _spec(server.port),
            StagePlan(mode="closed", concurrency=4, duration_s=window, warmup_s=0.3),
        )
        closed_stall = server.stall_ms
    assert closed_stall is not None
    assert closed.latency.max_ms >= 0.95 * closed_stall  # it saw the stall...
    assert closed.latency.p90_ms < 0.25 * truth[1]  # ...but its percentiles hide it


def test_generator_overhead_is_reported() -> None:
    """A null target measures the generator alone: it keeps up and says what it costs."""
    result = run_stage(TargetSpec(kind="null"), StagePlan(rate=1000, duration_s=0.5, warmup_s=0.1))
    assert result.errors == {}
    assert result.achieved_rate == pytest.approx(1000, rel=0.1)
    assert 0 < result.generator_cpu_us_per_request < 1000
