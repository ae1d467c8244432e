"""pytest-benchmark wrappers of bench.features (run once under --benchmark-disable).

The 1M x 10M point-in-time join runs only from the script (``python -m bench.features
--full``); here the join is small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench import features
from carrara.feature_cache import FeatureService


@pytest.fixture(scope="module")
def redis_url() -> str:
    """The test Redis (tests/conftest.py is not in scope under bench/)."""
    import redis

    url = os.environ.get("CARRARA_TEST_REDIS", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {url}: {exc}")
        pytest.skip(f"Redis is not reachable at {url} ({exc}); start scripts/start-services.sh")
    finally:
        client.close()
    return url


@pytest.fixture(scope="module")
def embedded() -> Iterator[FeatureService]:
    with features.online_service(None) as svc:
        yield svc


@pytest.mark.parametrize("n", [1, 100, 1000])
def test_online_read_embedded(
    benchmark: BenchmarkFixture, embedded: FeatureService, n: int
) -> None:
    ids = [f"u{i}" for i in range(n)]
    result = benchmark(embedded.get_online, "stats", ids)
    assert result.values.shape == (n, features.N_FEATURES) and bool(result.found.all())


@pytest.mark.integration
@pytest.mark.parametrize("n", [1, 100, 1000])
def test_online_read_redis(benchmark: BenchmarkFixture, redis_url: str, n: int) -> None:
    with features.online_service(redis_url) as svc:
        ids = [f"u{i}" for i in range(n)]
        result = benchmark(svc.get_online, "stats", ids)
        assert result.values.shape == (n, features.N_FEATURES) and bool(result.found.all())


def test_pit_join_small(benchmark: BenchmarkFixture) -> None:
    result = benchmark.pedantic(
        features.bench_pit, args=(5_000, 50_000), kwargs={"repeats": 1}, rounds=1
    )
    assert result.median_ns > 0


@pytest.mark.integration
def test_features_benchmark_script_runs(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "features.json"
    assert features.main(["--quick", "--redis", redis_url, "--json", str(out)]) == 0
    results = msgspec.json.decode(out.read_bytes())
    names = [r["name"] for r in results]
    assert "online_read_redis_1000x32" in names and "bare_mget_redis_1000" in names
    assert "http_get_online_redis_100x32" in names
    assert "pit_join_10k_labels_x_100k_rows" in names
    assert all(r["p99_ns"] >= r["median_ns"] > 0 for r in results)
