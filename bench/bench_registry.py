"""pytest-benchmark wrapper of bench.registry: register + promote on the real PostgreSQL."""

from __future__ import annotations

import importlib.util
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench import registry as bench
from carrara.registry import ModelRegistry

# tests/conftest.py is not in scope under bench/: take its postgres_url fixture (a fresh
# database per test, dropped afterwards) from there rather than re-typing it.
_spec = importlib.util.spec_from_file_location(
    "_carrara_tests_conftest", Path(__file__).resolve().parent.parent / "tests" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
postgres_url = _conftest.postgres_url


@pytest.fixture
def registry(postgres_url: str) -> Iterator[ModelRegistry]:
    with tempfile.TemporaryDirectory() as tmp, ModelRegistry.open(postgres_url, tmp) as reg:
        bench.setup(reg)
        yield reg


@pytest.mark.integration
def test_register_promote_postgresql(benchmark: BenchmarkFixture, registry: ModelRegistry) -> None:
    counter = itertools.count()
    benchmark(lambda: bench.register_and_promote(registry, next(counter)))
    rounds = next(counter)
    assert rounds >= 1
    production = registry.production_version("bench")
    assert production is not None and production.version == rounds
    assert [v.status for v in registry.list_versions("bench")].count("PRODUCTION") == 1


@pytest.mark.integration
def test_bench_script_reports_percentiles(postgres_url: str) -> None:
    results = bench.bench_register_promote(postgres_url, n=20, warmup=2)
    assert [r.name for r in results] == [
        "registry_register_postgresql",
        "registry_promote_postgresql",
        "registry_register+promote_postgresql",
    ]
    for r in results:
        assert 0 < r.median_ns <= r.p99_ns
