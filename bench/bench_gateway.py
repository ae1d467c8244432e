"""pytest-benchmark wrappers of bench.gateway (run once under --benchmark-disable in CI)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench import gateway
from carrara.gateway.engine import ServingEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[ServingEngine]:
    with gateway.engine() as e:
        yield e


def test_embedded_predict_cached(benchmark: BenchmarkFixture, engine: ServingEngine) -> None:
    result = benchmark(engine.predict, "bench", ["e1"])
    assert result.outputs.shape == (1, 1)
    assert 0.0 < float(result.outputs[0, 0]) < 1.0  # a sigmoid score


def test_embedded_predict_batch_100(benchmark: BenchmarkFixture, engine: ServingEngine) -> None:
    ids = [f"e{i}" for i in range(100)]
    result = benchmark(engine.predict, "bench", ids)
    assert result.outputs.shape == (100, 1)
    assert set(result.variants) == {"v1", "v2"}


def test_gateway_benchmark_script_runs() -> None:
    results = gateway.run(requests=50)
    names = [r["name"] for r in results]
    assert names == [
        "embedded_predict_1_entity_cached",
        "embedded_predict_100_entities_cached",
        "grpc_predict_1_entity_cached",
        "http_predict_1_entity_cached",
    ]
    assert all(
        float(r["median_ns"]) > 0 and float(r["p99_ns"]) >= float(r["median_ns"]) for r in results
    )
