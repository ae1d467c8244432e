"""pytest-benchmark tests of the core's hot operations through the Python binding, and an end
to end run of the native benchmarks (``python -m bench.core``).

The normal test run executes each once under ``--benchmark-disable``: they stay quick and check
their results, so a broken hot path fails here and not only in a benchmark table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench import core
from carrara.core import (
    Assembler,
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    FeatureVector,
    GroupSchema,
    Router,
    RoutingPolicy,
    Variant,
    decode_feature_vector,
    encode_feature_vector,
    stable_hash,
)

GROUPS = tuple(
    GroupSchema(name, 3, tuple(f"{name}_f{i}" for i in range(32)))
    for name in ("user_profile", "user_activity", "user_risk")
)
SPEC = AssemblerSpec(
    groups=GROUPS,
    features=tuple(FeatureRef(g.name, f, default=-1.0) for g in GROUPS for f in g.features),
)
ENTITIES = 1_000


def values_for(group: int, entity: int) -> np.ndarray:
    """Distinct, exactly representable float32 values per (group, entity, feature)."""
    return (np.arange(32, dtype=np.float32) + 100.0 * group + 0.25 * entity).astype(np.float32)


def entity_id(i: int) -> str:
    return f"user-{100_000 + i}"


def test_cache_get_hit(benchmark: BenchmarkFixture) -> None:
    cache = FeatureCache(capacity=2 * ENTITIES, ttl_seconds=3600.0, shards=16)
    keys = [f"user_profile:3:{entity_id(i)}" for i in range(ENTITIES)]
    for i, key in enumerate(keys):
        cache.put(key, FeatureVector(entity_id(i), "user_profile", 3, values_for(0, i)))
    assert len(cache) == ENTITIES

    got = benchmark(cache.get, keys[417])
    assert got is not None
    assert got.entity_id == entity_id(417)
    np.testing.assert_array_equal(got.values, values_for(0, 417))
    assert cache.get("user_profile:3:nobody") is None


def test_decode_32(benchmark: BenchmarkFixture) -> None:
    missing = np.zeros(32, dtype=bool)
    missing[[5, 31]] = True
    data = encode_feature_vector(
        "user-123456", "user_profile", 3, values_for(0, 7), missing, event_timestamp_us=17
    )

    got = benchmark(decode_feature_vector, data)
    assert (got.entity_id, got.group, got.group_version) == ("user-123456", "user_profile", 3)
    assert got.event_timestamp_us == 17
    np.testing.assert_array_equal(got.values, values_for(0, 7))
    np.testing.assert_array_equal(got.missing, missing)


def test_assemble_cached_96(benchmark: BenchmarkFixture) -> None:
    assembler = Assembler(SPEC)
    assert assembler.dim == 96
    cache = FeatureCache(capacity=10 * ENTITIES, ttl_seconds=3600.0, shards=16)
    ids = [entity_id(i) for i in range(ENTITIES)]
    plan = assembler.plan(cache, ids)
    assert len(plan.missing_keys) == 3 * ENTITIES
    assert plan.missing_keys[0] == f"user_profile:3:{ids[0]}"
    values = {
        assembler.key(g, ids[i]): encode_feature_vector(ids[i], GROUPS[g].name, 3, values_for(g, i))
        for g in range(3)
        for i in range(ENTITIES)
    }
    assembler.fill(plan, [values[k] for k in plan.missing_keys], cache)

    def plan_and_assemble(entity: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        p = assembler.plan(cache, [entity])
        out, mask = assembler.assemble_plan(p)
        return out, mask, p.missing_keys

    out, mask, missing_keys = benchmark(plan_and_assemble, ids[42])
    assert missing_keys == []  # the full cached path: three hits
    assert out.shape == (1, 96)
    assert out.dtype == np.float32
    expected = np.concatenate([values_for(g, 42) for g in range(3)])
    np.testing.assert_array_equal(out[0], expected)
    assert not mask.any()


def test_route(benchmark: BenchmarkFixture) -> None:
    policy = RoutingPolicy(
        variants=(Variant("ranker-v7", 8000), Variant("ranker-v8-canary", 2000, canary=True)),
        salt="exp-7",
    )
    router = Router(policy)

    variant = benchmark(router.route, "user-123456")
    # Pinned with the C++ golden (core/tests/router_test.cpp): bucket 8073 is past the canary's
    # [0, 2000), so the stable variant (index 0) answers.
    assert stable_hash("exp-7", "user-123456") == 0x7FDFEF7FC3912339
    assert router.bucket("user-123456") == 8073
    assert variant == 0
    assert router.route("user-123457") == 0  # bucket 8278


def test_core_benchmark_script_runs(tmp_path: Path) -> None:
    out = tmp_path / "core.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.core", "--quick", "--json", str(out)],
        cwd=core.ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    by_name = {r["name"]: r for r in results}
    assert set(core.TARGETS_NS) <= set(by_name)
    for name in core.TARGETS_NS:
        r = by_name[name]
        assert set(r) == {"name", "median_ns", "p99_ns"}
        assert 0 < r["median_ns"] <= r["p99_ns"]
    assert "BM_CacheHit" in proc.stdout  # the table


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([3.0], 99, 3.0), ([1.0, 2.0, 3.0], 50, 2.0), ([float(i) for i in range(1, 201)], 99, 198.0)],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert core.percentile(values, q) == expected


def test_summarize_uses_the_repetitions() -> None:
    def row(name: str, run_type: str, real_time: float, unit: str = "ns") -> dict[str, object]:
        return {
            "name": name,
            "run_name": "BM_X",
            "run_type": run_type,
            "real_time": real_time,
            "time_unit": unit,
        }

    report = {
        "benchmarks": [
            row("BM_X", "iteration", 10.0),
            row("BM_X", "iteration", 0.03, "us"),
            row("BM_X", "iteration", 20.0),
            row("BM_X_median", "aggregate", 999.0),
        ]
    }
    assert core.summarize(report) == [
        {"name": "BM_X", "median_ns": 20.0, "p99_ns": 30.0, "cpu_median_ns": 20.0}
    ]
