"""pytest-benchmark wrapper of bench.monitoring (small; runs once under --benchmark-disable)."""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from bench import monitoring


def test_consumer_throughput(benchmark: BenchmarkFixture) -> None:
    result = benchmark.pedantic(
        monitoring.run,
        kwargs={"predictions": 4_000, "features": 6, "batch_size": 500, "per_window": 1_000},
        rounds=1,
        iterations=1,
    )
    assert result.predictions == 4_000
    assert result.windows_judged == 3  # the fourth window is still open
    assert result.predictions_per_s > 0 and result.bin_only_per_s > result.predictions_per_s
