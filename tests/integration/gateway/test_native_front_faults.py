"""Faults and bad input at the native gRPC front, with a real (private) Redis read natively:
a hung Redis (SIGSTOP) degrades within the store deadline and never fails or sheds a request;
unknown and corrupt entities degrade alone; bad protobuf, bad KServe tensors and non-finite
overrides are INVALID_ARGUMENT with a message; streaming and the repository index work through
unmodified clients."""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.utils import InferenceServerException

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)
from carrara.feature_cache.online_store import open_online_store
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.embedded import serving_store
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.gateway.grpc_client import predict_stub
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.server import GatewayServer
from carrara.v1 import predict_pb2
from tests.servers import running_gateway

pytestmark = pytest.mark.integration

SPEC = AssemblerSpec(
    groups=(GroupSchema("u", 1, ("x", "y")),),
    features=(FeatureRef("u", "x", -5.0), FeatureRef("u", "y", 0.0)),
)
W = np.array([[2.0], [1.0]], np.float32)
STORE_DEADLINE_S = 0.02


def value(i: int) -> float:
    return 2.0 * i + 1.0 * (i % 3) + 1.0  # the model on entity i's stored row


@pytest.fixture
def served(
    request: pytest.FixtureRequest, private_redis: Any, tmp_path: Path
) -> Iterator[tuple[Any, GatewayServer, Any]]:
    """A gateway on a private Redis; the store deadline is the test's parameter (default
    200 ms: generous, so a loaded machine does not turn a read into a degraded answer)."""
    deadline_s = float(getattr(request, "param", 0.2))
    client = redis.Redis(port=private_redis.port)
    client.mset(
        {
            f"ns:u:1:e{i}": encode_feature_vector(f"e{i}", "u", 1, [float(i), float(i % 3)])
            for i in range(500)
        }
    )
    client.set("ns:u:1:corrupt", b"\xff\xfe not a protobuf")
    store = open_online_store(f"redis://127.0.0.1:{private_redis.port}/0?namespace=ns")
    native_store = serving_store(store)
    assert type(native_store).__name__ == "RedisStore"  # read natively, no Python per request
    engine = ServingEngine(
        native_store,
        cache=FeatureCache(capacity=100, ttl_seconds=60.0),
        store_deadline_s=deadline_s,
        max_in_flight=64,
    )
    engine.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(VariantSpec(name="v1", version=1, features=SPEC),),
        ),
        {"v1": OnnxBackend(write_linear_model(tmp_path / "m.onnx", W, 1.0))},
    )
    try:
        with running_gateway(engine) as server:
            try:
                yield private_redis, server, client
            finally:  # a stopped Redis resumes before the servers stop
                if private_redis.proc is not None and private_redis.proc.poll() is None:
                    os.kill(private_redis.proc.pid, signal.SIGCONT)
    finally:
        store.close()
        client.close()


@pytest.mark.parametrize("served", [STORE_DEADLINE_S], indirect=True)
def test_hung_redis_degrades_within_the_deadline_never_fails(
    served: tuple[Any, GatewayServer, Any],
) -> None:
    private_redis, server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = predict_stub(channel)
        warm = [f"e{i}" for i in range(20)]
        for e in warm:  # cached from now on
            r = call(predict_pb2.PredictRequest(model="m", entity_ids=[e]))
            assert not r.degraded
        assert private_redis.proc is not None
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # hung: accepts, never answers
        try:
            latencies: list[float] = []
            answers: list[tuple[str, bool, float]] = []

            def one(k: int) -> None:
                entity = warm[k % 20] if k % 2 == 0 else f"e{100 + k}"
                start = time.perf_counter()
                r = call(predict_pb2.PredictRequest(model="m", entity_ids=[entity]), timeout=5)
                latencies.append(time.perf_counter() - start)
                answers.append((entity, r.predictions[0].degraded, r.predictions[0].values[0]))

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(400)))  # raises on any RPC error
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert len(answers) == 400
        for entity, degraded, v in answers:
            i = int(entity[1:])
            if entity in warm:
                assert not degraded and v == pytest.approx(value(i))  # from the cache
            else:
                assert degraded and v == pytest.approx(2.0 * -5.0 + 1.0)  # defaults, flagged
        # Each store read is cut at the deadline, and after a failure the store is skipped
        # for a back-off window: no request waits much longer than the deadline.
        assert max(latencies) < STORE_DEADLINE_S + 0.5, max(latencies)
        assert float(np.median(latencies)) < 0.01
        # Redis is back: a new entity is read again, not degraded.
        deadline = time.monotonic() + 5
        while True:
            r = call(predict_pb2.PredictRequest(model="m", entity_ids=["e450"]))
            if not r.degraded or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not r.degraded and r.predictions[0].values[0] == pytest.approx(value(450))


def test_unknown_and_corrupt_entities_degrade_alone(
    served: tuple[Any, GatewayServer, Any],
) -> None:
    _, server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = predict_stub(channel)
        warm = call(predict_pb2.PredictRequest(model="m", entity_ids=["e8"]))
        assert not warm.degraded
        r = call(predict_pb2.PredictRequest(model="m", entity_ids=["e7", "nobody", "corrupt"]))
        assert [p.degraded for p in r.predictions] == [False, True, True]
        assert r.degraded
        assert r.predictions[0].values[0] == pytest.approx(value(7))
        assert r.predictions[1].values[0] == pytest.approx(-9.0)
        assert r.predictions[2].values[0] == pytest.approx(-9.0)


def _raw_call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError:
    call = channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as err:
        call(payload, timeout=5)
    return err.value


def test_bad_input_is_invalid_argument(
    served: tuple[Any, GatewayServer, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    _, server, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        # An entity id that is not UTF-8 (field 2 of PredictRequest): refused, and not logged
        # per request (a client must not be able to flood the gateway's log).
        for _ in range(3):
            err = _raw_call(channel, "/carrara.v1.Predict/Predict", b"\x0a\x01m\x12\x01\xff")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" not in capfd.readouterr().err
        for method in (
            "/carrara.v1.Predict/Predict",
            "/inference.GRPCInferenceService/ModelInfer",
        ):
            err = _raw_call(channel, method, b"\xff\xff\xff\xff garbage")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid" in (err.details() or ""), err.details()
        call = predict_stub(channel)
        for bad in (float("nan"), float("inf")):
            with pytest.raises(grpc.RpcError) as e:
                call(
                    predict_pb2.PredictRequest(
                        model="m",
                        entity_ids=["e1"],
                        overrides=[predict_pb2.FeatureOverride(name="x", values=[bad])],
                    )
                )
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "non-finite" in (e.value.details() or "")

        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=kserve.ModelInferRequest.SerializeToString,
            response_deserializer=kserve.ModelInferResponse.FromString,
        )

        def request(raw: bytes, shape: list[int]) -> kserve.ModelInferRequest:
            req = kserve.ModelInferRequest(model_name="m")
            req.inputs.add(name="entity_ids", datatype="BYTES", shape=shape)
            req.raw_input_contents.append(raw)
            return req

        cases = {
            "truncated": request(struct.pack("<I", 10) + b"e1", [1]),
            "count": request(struct.pack("<I", 2) + b"e1", [3]),
            "utf8": request(struct.pack("<I", 2) + b"\xff\xfe", [1]),
        }
        for name, req in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                infer(req, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        # An FP32 override of the wrong byte size.
        req = request(struct.pack("<I", 2) + b"e1", [1])
        req.inputs.add(name="x", datatype="FP32", shape=[1])
        req.raw_input_contents.append(b"\x00\x00\x80")
        with pytest.raises(grpc.RpcError) as e:
            infer(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # NaN through KServe too.
        req = request(struct.pack("<I", 2) + b"e1", [1])
        req.inputs.add(name="x", datatype="FP32", shape=[1])
        req.raw_input_contents.append(struct.pack("<f", float("nan")))
        with pytest.raises(grpc.RpcError) as e:
            infer(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "non-finite" in (e.value.details() or "")


def test_streaming_and_repository_index(served: tuple[Any, GatewayServer, Any]) -> None:
    _, server, _ = served
    client = triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        index = client.get_model_repository_index()
        assert [(m.name, m.state) for m in index.models] == [("m", "READY")]
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(5):
            inp = triton.InferInput("entity_ids", [1], "BYTES")
            inp.set_data_from_numpy(np.array([f"e{i}".encode()], dtype=np.object_))
            client.async_stream_infer("m", [inp], request_id=str(i))
        bad = triton.InferInput("entity_ids", [1], "FP32")
        bad.set_data_from_numpy(np.zeros(1, np.float32))
        client.async_stream_infer("m", [bad], request_id="bad")
        inp = triton.InferInput("entity_ids", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"e9"], dtype=np.object_))
        client.async_stream_infer("m", [inp], request_id="9")  # the stream survives the error
        got: dict[str, float] = {}
        errors: list[str] = []
        for _ in range(7):
            result, error = results.get(timeout=10)
            if error is not None:
                assert isinstance(error, InferenceServerException)
                errors.append(str(error))
            else:
                got[result.get_response().id] = float(result.as_numpy("predictions")[0, 0])
        assert got == {str(i): pytest.approx(value(i)) for i in [0, 1, 2, 3, 4, 9]}
        assert len(errors) == 1 and "must be BYTES" in errors[0]
    finally:
        client.stop_stream()
        client.close()
