"""The harness's protocol clients against the real gateway on the real Redis: Carrara Predict
and KServe v2 over gRPC, and HTTP, all get OK answers; errors are counted by their code."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from carrara.core import (
    AssemblerSpec,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)
from carrara.feature_cache.online_store import RedisOnlineStore
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.embedded import Embedded
from carrara.gateway.engine import ModelDeployment, VariantSpec
from carrara.gateway.onnx_models import write_linear_model
from carrara.loadgen import EntitySpec, StagePlan, TargetSpec, run_stage
from tests.servers import running_gateway

pytestmark = pytest.mark.integration

GROUP = GroupSchema("g", 1, tuple(f"f{i}" for i in range(8)))
PLAN = StagePlan(rate=100, arrivals="constant", duration_s=0.5, warmup_s=0.1)


@pytest.fixture
def gateway_ports(redis_url: str, redis_namespace: str, tmp_path: Path) -> Iterator[dict[str, int]]:
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)
    for i in range(100):
        values = rng.normal(size=8).astype(np.float32)
        client.set(f"{redis_namespace}:g:1:e{i}", encode_feature_vector(f"e{i}", "g", 1, values))
    embedded = Embedded(RedisOnlineStore(client, namespace=redis_namespace))
    spec = AssemblerSpec(
        groups=(GROUP,), features=tuple(FeatureRef("g", f) for f in GROUP.features)
    )
    model = write_linear_model(tmp_path / "m.onnx", np.ones(8, dtype=np.float32))
    embedded.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(VariantSpec(name="v1", version=1, features=spec),),
        ),
        {"v1": OnnxBackend(model)},
    )
    try:
        with running_gateway(embedded.engine) as server:
            yield {"grpc": server.grpc_port, "kserve": server.grpc_port, "http": server.http_port}
    finally:
        embedded.close()
        client.close()


@pytest.mark.parametrize("kind", ["grpc", "kserve", "http"])
def test_every_protocol_gets_answers(kind: str, gateway_ports: dict[str, int]) -> None:
    spec = TargetSpec(
        kind=kind,  # type: ignore[arg-type]
        address=f"127.0.0.1:{gateway_ports[kind]}",
        model="m",
        batch=3,
        entities=EntitySpec(distribution="zipf", count=100),
    )
    result = run_stage(spec, PLAN)
    assert result.errors == {}
    assert result.ok == result.requests == pytest.approx(50, abs=2)
    assert 0 < result.latency.p50_ms < 1000


@pytest.mark.parametrize("kind", ["grpc", "kserve", "http"])
def test_errors_are_counted_by_code(kind: str, gateway_ports: dict[str, int]) -> None:
    spec = TargetSpec(
        kind=kind,  # type: ignore[arg-type]
        address=f"127.0.0.1:{gateway_ports[kind]}",
        model="no-such-model",
    )
    result = run_stage(spec, PLAN)
    code = "HTTP_404" if kind == "http" else "NOT_FOUND"
    assert result.ok == 0 and result.errors == {code: result.requests}
    assert result.verdict is None


def test_unreachable_http_target_fails_to_start() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        run_stage(TargetSpec(kind="http", address=f"127.0.0.1:{port}", timeout_s=1.0), PLAN)
