"""pytest wrappers of the load-harness scenarios (``bench.gateway_sla``), run tiny and once.

They keep the scenarios from rotting: every gateway cell of BENCHMARKS.md (embedded / gRPC / HTTP,
cache hit / miss, batch 1 / 100) and its baseline peer runs a few hundred requests, and the
baseline is checked to do the same work as Carrara (same predictions from the same features).
Latency figures from these runs are not judged: the tiny settings are for coverage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from bench import gateway_sla
from bench.baselines.fastapi_service import BaselinePredictor
from bench.gateway import GROUPS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """The bench features in the real Redis (its own namespace, removed afterwards)."""
    import os

    url = os.environ.get("CARRARA_TEST_REDIS", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable ({exc})")
        pytest.skip(f"Redis is not reachable ({exc}); start it with scripts/start-services.sh")
    finally:
        client.close()
    namespace = f"carrara-test-{uuid.uuid4().hex[:12]}"
    gateway_sla.seed_redis(url, namespace)
    try:
        yield url, namespace, gateway_sla.write_model(tmp_path_factory.mktemp("model"))
    finally:
        gateway_sla.clear_redis(url, namespace)


def test_gateway_sla_scenarios_run(seeded: tuple[str, str, Path]) -> None:
    url, _, _ = seeded
    report = gateway_sla.run(url, settings=gateway_sla.TINY)
    cells = {(r.system, r.front, r.cache, r.batch) for r in report.rows}
    for cache in gateway_sla.CACHES:
        for batch in gateway_sla.BATCHES:
            for front in gateway_sla.FRONTS:
                assert ("carrara", front, cache, batch) in cells
            assert ("baseline", "embedded", cache, batch) in cells
            assert ("baseline", "http", cache, batch) in cells
    for row in report.rows:
        assert row.errors == {}, row
        assert row.p99_ms >= row.p50_ms > 0 and row.saturation_qps > 0
    table = gateway_sla.format_markdown(report)
    assert table.count("python -m bench.gateway_sla --rate 200 --repeat 1 --only") == 12
    assert report.generator_ceiling["achieved_rate"] > 0


def test_only_selects_cells(seeded: tuple[str, str, Path]) -> None:
    url, _, _ = seeded
    report = gateway_sla.run(url, settings=gateway_sla.TINY, only=["embedded:hit:1"])
    assert [(r.system, r.front) for r in report.rows] == [
        ("carrara", "embedded"),
        ("baseline", "embedded"),
    ]


def test_baseline_predicts_what_carrara_predicts(seeded: tuple[str, str, Path]) -> None:
    url, namespace, model = seeded
    ids = [f"e{i}" for i in (0, 1, 17, 999)]
    embedded: Any = gateway_sla.build_embedded(url, namespace, model, "miss")
    client = redis.Redis.from_url(url)
    try:
        carrara = embedded.predict(gateway_sla.MODEL, ids).outputs
        baseline = BaselinePredictor(
            namespace, [(g.name, g.version, len(g.features)) for g in GROUPS], str(model)
        ).predict_sync(client, ids)
    finally:
        embedded.close()
        client.close()
    np.testing.assert_allclose(baseline, carrara, rtol=1e-5)


def test_baseline_service_answers_over_http(seeded: tuple[str, str, Path]) -> None:
    import httpx

    url, namespace, model = seeded
    groups = ",".join(f"{g.name}:{g.version}:{len(g.features)}" for g in GROUPS)
    cmd = ["bench.baselines.fastapi_service", "--redis-url", url, "--namespace", namespace,
           "--model", str(model), "--groups", groups]  # fmt: skip
    with gateway_sla.child(cmd) as ports:
        r = httpx.post(
            f"http://127.0.0.1:{ports['http_port']}/predict/bench",
            json={"entity_ids": ["e1", "e2"]},
            timeout=10,
        )
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    assert [p["entity_id"] for p in predictions] == ["e1", "e2"]
    assert all(0 < p["values"][0] < 1 for p in predictions)
