"""Fault tests with a real Redis (a private redis-server on a free port, so stopping it touches
nothing else): serving continues degraded while Redis is down and recovers when it returns."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from carrara.core import (
    AssemblerSpec,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)
from carrara.feature_cache.online_store import RedisOnlineStore
from carrara.gateway import Embedded, ModelDeployment, VariantSpec
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.onnx_models import write_linear_model

pytestmark = pytest.mark.integration

SPEC = AssemblerSpec(groups=(GroupSchema("u", 1, ("x",)),), features=(FeatureRef("u", "x", -5.0),))


def populate(port: int) -> None:
    client = redis.Redis(port=port)
    client.mset(
        {f"ns:u:1:e{i}": encode_feature_vector(f"e{i}", "u", 1, [float(i)]) for i in range(300)}
    )
    client.close()


def test_redis_down_mid_load_degrades_then_recovers(private_redis: Any, tmp_path: Path) -> None:
    populate(private_redis.port)
    # Fail fast: redis-py's default retries back off for seconds, and the serving path has
    # its own answer to a dead store (cache, defaults, degraded flag).
    client = redis.Redis(
        port=private_redis.port,
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    store = RedisOnlineStore(client, namespace="ns")
    model = write_linear_model(tmp_path / "m.onnx", [2.0], 1.0)
    # A small cache with a short TTL, so most requests need Redis.
    emb = Embedded(store, cache_capacity=50, cache_ttl_seconds=0.05)
    emb.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(VariantSpec(name="v1", version=1, features=SPEC),),
        ),
        {"v1": OnnxBackend(model)},
    )
    phase = ["before"]
    results: dict[str, list[tuple[bool, float, int]]] = {"before": [], "down": [], "after": []}
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            k = i % 300
            try:
                r = emb.predict("m", [f"e{k}"])
                results[phase[0]].append((r.degraded[0], float(r.outputs[0, 0]), k))
            except BaseException as exc:
                errors.append(exc)
            i += 1
            time.sleep(0.001)

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.3)
    phase[0] = "down"
    private_redis.kill()
    time.sleep(0.6)
    private_redis.start()
    populate(private_redis.port)
    phase[0] = "after"
    time.sleep(0.4)
    stop.set()
    worker.join()
    emb.close()
    store.close()

    assert not errors, errors[:3]
    before, down, after = results["before"], results["down"], results["after"]
    assert before and down and after
    assert not any(d for d, _, _ in before)
    assert all(v == pytest.approx(2 * k + 1) for _, v, k in before)
    degraded = [(v, k) for d, v, k in down if d]
    assert len(degraded) > 0.5 * len(down)  # most need Redis; a few still hit the cache
    assert all(v == pytest.approx(2 * -5.0 + 1) for v, _ in degraded)  # defaults when degraded
    tail = after[len(after) // 2 :]  # reconnected by then
    assert tail and not any(d for d, _, _ in tail)
    assert all(v == pytest.approx(2 * k + 1) for _, v, k in tail)
    assert np.isfinite([v for _, v, _ in after]).all()
