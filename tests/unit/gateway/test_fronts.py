"""The gRPC (Carrara Predict, KServe v2 through the real tritonclient, health) and HTTP fronts
give the same answers as the engine, and map errors to the right status codes."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
)
from carrara.gateway.backends import BackendInfo, OnnxBackend
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.gateway.grpc_client import predict_stub
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.server import GatewayServer, ServerThread
from carrara.gateway.service import Gateway
from carrara.v1 import predict_pb2
from tests.servers import DictStore, running_gateway, scorer_engine

GROUP = GroupSchema("user", 1, ("a", "b"))
SPEC = AssemblerSpec(groups=(GROUP,), features=(FeatureRef("user", "a"), FeatureRef("user", "b")))
W = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], np.float32)[:2]  # [2, 2]: two outputs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    engine = scorer_engine(tmp_path_factory.mktemp("m"), SPEC, W, [0.5, -0.5])
    with running_gateway(engine) as srv:
        yield srv


def expected(i: int) -> list[float]:
    x = np.array([i, -i], np.float32)
    return (x @ W + np.array([0.5, -0.5], np.float32)).tolist()


def test_carrara_predict_over_grpc(server: GatewayServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = predict_stub(channel)
        r = call(
            predict_pb2.PredictRequest(
                model="scorer", entity_ids=["u3", "u7", "nobody"], request_id="q1"
            )
        )
        assert (r.model, r.model_version, r.variant, r.request_id) == ("scorer", 3, "v3", "q1")
        assert [p.entity_id for p in r.predictions] == ["u3", "u7", "nobody"]
        assert list(r.predictions[0].values) == pytest.approx(expected(3))
        assert list(r.predictions[1].values) == pytest.approx(expected(7))
        assert list(r.predictions[2].values) == pytest.approx(expected(0))  # defaults are 0
        r = call(
            predict_pb2.PredictRequest(
                model="scorer",
                entity_ids=["u3"],
                overrides=[predict_pb2.FeatureOverride(name="b", values=[10.0])],
            )
        )
        assert list(r.predictions[0].values) == pytest.approx([3.5, 19.5])
        with pytest.raises(grpc.RpcError) as err:
            call(predict_pb2.PredictRequest(model="nope", entity_ids=["u1"]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "not deployed" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            call(predict_pb2.PredictRequest(model="scorer"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health(server: GatewayServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_unmodified_tritonclient(server: GatewayServer) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("scorer") and not client.is_model_ready("nope")
        assert client.get_server_metadata().name == "carrara"
        meta = client.get_model_metadata("scorer")
        assert meta.versions == ["3"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("entity_ids", "BYTES", [-1])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("predictions", "FP32", [-1, 2])
        ]
        config = client.get_model_config("scorer").config
        assert config.name == "scorer" and config.output[0].name == "predictions"

        ids = np.array([b"u1", b"u42", b"u99"], dtype=np.object_)
        inp = triton.InferInput("entity_ids", [3], "BYTES")
        inp.set_data_from_numpy(ids)
        result = client.infer("scorer", [inp], outputs=[triton.InferRequestedOutput("predictions")])
        out = result.as_numpy("predictions")
        assert out.shape == (3, 2)
        np.testing.assert_allclose(out, [expected(1), expected(42), expected(99)], rtol=1e-6)

        # Feature override as an extra FP32 input, per entity.
        override = triton.InferInput("a", [3], "FP32")
        override.set_data_from_numpy(np.array([0.0, 0.0, 1.0], np.float32))
        out = client.infer("scorer", [inp, override]).as_numpy("predictions")
        assert out[2].tolist() == pytest.approx([1.5, -198.5])

        with pytest.raises(InferenceServerException, match="not deployed"):
            client.infer("nope", [inp])
        bad = triton.InferInput("entity_ids", [2], "FP32")
        bad.set_data_from_numpy(np.zeros(2, np.float32))
        with pytest.raises(InferenceServerException, match="must be BYTES"):
            client.infer("scorer", [bad])
        stats = client.get_inference_statistics("scorer").model_stats[0]
        assert stats.inference_stats.success.count >= 2
        assert stats.inference_stats.fail.count >= 1
    finally:
        client.close()


def test_http_front(server: GatewayServer) -> None:
    base = f"http://127.0.0.1:{server.http_port}"
    with httpx.Client(base_url=base) as http:
        r = http.post("/predict/scorer", json={"entity_ids": ["u5"], "request_id": "h1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "h1" and body["degraded"] is False
        assert body["predictions"][0]["values"] == pytest.approx(expected(5))
        assert body["predictions"][0]["model_version"] == 3
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["models"] == ["scorer"]
        r = http.post("/predict/nope", json={"entity_ids": ["u5"]})
        assert r.status_code == 404 and "not deployed" in r.json()["message"]
        r = http.post("/predict/scorer", json={"entity_ids": "u5"})
        assert r.status_code == 400 and "invalid predict request" in r.json()["message"]
        r = http.post("/predict/scorer", content=b"{not json")
        assert r.status_code == 400
        r = http.post("/predict/scorer", json={"entity_ids": ["u1"], "overrides": {"zz": 1}})
        assert r.status_code == 400 and "unknown feature 'zz'" in r.text
        metrics = http.get("/metrics").text
        assert (
            'carrara_predict_latency_seconds_count{model="scorer",variant="v3",version="3"}'
            in metrics
        )
        assert 'carrara_predict_errors_total{code="NOT_FOUND",model="nope"}' in metrics
        assert "carrara_feature_cache_hit_ratio" in metrics


def test_split_over_100k_entities_through_the_gateway(tmp_path: Path) -> None:
    """90/10 over 100k entities lands within a chi-squared bound; an entity keeps its variant."""
    from scipy import stats

    path = write_linear_model(tmp_path / "m.onnx", W, [0.5, -0.5])
    engine = ServingEngine(DictStore.users(100), cache=FeatureCache(capacity=1_000))
    engine.deploy(
        ModelDeployment(
            model="ab",
            policy=RoutingPolicy(
                variants=(Variant("control", 9_000), Variant("treatment", 1_000)), salt="ab-7"
            ),
            variants=(
                VariantSpec(name="control", version=1, features=SPEC),
                VariantSpec(name="treatment", version=2, features=SPEC),
            ),
        ),
        {"control": OnnxBackend(path), "treatment": OnnxBackend(path)},
    )
    ids = [f"user-{i}" for i in range(100_000)]
    variants: list[str] = []
    for start in range(0, len(ids), 1_000):
        variants += engine.predict("ab", ids[start : start + 1_000]).variants
    counts = [variants.count("control"), variants.count("treatment")]
    assert stats.chisquare(counts, [90_000, 10_000]).pvalue > 0.001, counts
    again = engine.predict("ab", ids[:1_000][::-1]).variants
    assert again == variants[:1_000][::-1]
    engine.close()


class BlockingBackend:
    """A remote-like backend that holds each call until released."""

    runs_in_process = False

    def __init__(self, inner: OnnxBackend) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.armed = False  # the deploy's warm-up call passes straight through

    @property
    def info(self) -> BackendInfo:
        return self.inner.info

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        if self.armed:
            self.entered.release()
            self.release.wait(10)
        return self.inner.infer(x)

    def close(self) -> None:
        self.inner.close()


def slow_engine(tmp_path: Path, *, max_in_flight: int) -> tuple[ServingEngine, BlockingBackend]:
    """An engine serving model "slow" whose backend holds each call until released."""
    path = write_linear_model(tmp_path / "m.onnx", W, [0.5, -0.5])
    backend = BlockingBackend(OnnxBackend(path))
    engine = ServingEngine(DictStore.users(100), max_in_flight=max_in_flight)
    engine.deploy(
        ModelDeployment(
            model="slow",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(VariantSpec(name="v1", version=1, features=SPEC, timeout_s=10.0),),
        ),
        {"v1": backend},
    )
    backend.armed = True  # after the deploy's warm-up call
    return engine, backend


def test_shedding_and_graceful_drain(tmp_path: Path) -> None:
    engine, backend = slow_engine(tmp_path, max_in_flight=2)
    gateway = Gateway(engine)
    thread = ServerThread(lambda: GatewayServer(gateway, grace_s=10.0))
    srv = thread.start()
    base = f"http://127.0.0.1:{srv.http_port}"
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        with httpx.Client(base_url=base, timeout=20) as http:
            held = [
                pool.submit(http.post, "/predict/slow", json={"entity_ids": [f"u{i}"]})
                for i in range(2)
            ]
            assert backend.entered.acquire(timeout=5) and backend.entered.acquire(timeout=5)
            shed = http.post("/predict/slow", json={"entity_ids": ["u9"]})
            assert shed.status_code == 429 and "in-flight limit" in shed.text
            with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
                call = predict_stub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    call(predict_pb2.PredictRequest(model="slow", entity_ids=["u9"]))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Graceful stop while two requests are in flight: both still get their answer.
            stopping = pool.submit(thread.stop)
            time.sleep(0.3)
            assert not stopping.done()
            backend.release.set()
            responses = [f.result(timeout=10) for f in held]
            assert [r.status_code for r in responses] == [200, 200]
            assert responses[0].json()["predictions"][0]["values"] == pytest.approx(expected(0))
            stopping.result(timeout=20)
    finally:
        backend.release.set()
        pool.shutdown()
        gateway.close()


def test_gateway_admission_sheds_before_queueing(tmp_path: Path) -> None:
    """Requests past the gateway's in-flight bound are refused at once, not queued for the pool."""
    import asyncio

    from carrara.errors import ResourceExhaustedError

    engine, backend = slow_engine(tmp_path, max_in_flight=2)
    gateway = Gateway(engine)

    async def scenario() -> tuple[int, float]:
        held = [asyncio.create_task(gateway.predict("slow", [f"u{i}"])) for i in range(2)]
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        with pytest.raises(ResourceExhaustedError, match=r"in-flight limit \(2\)"):
            await gateway.predict("slow", ["u9"])
        refused_in = time.perf_counter() - start
        backend.release.set()
        done = await asyncio.gather(*held)
        return len(done), refused_in

    try:
        count, refused_in = asyncio.run(scenario())
    finally:
        backend.release.set()
        gateway.close()
    assert count == 2 and refused_in < 0.05
    assert "carrara_predict_shed_total 1.0" in gateway.metrics.render().decode()
