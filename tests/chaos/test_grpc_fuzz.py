"""gRPC fuzzing of the native front (``carrara serve``): random bytes, truncated and bit-flipped
protobuf, wrong KServe dtypes and shapes, NaN/Inf, 20 MB messages, unicode and path-like model
names, on Predict and on every GRPCInferenceService RPC (ModelStreamInfer included). The
gateway never crashes, answers every input with a deliberate status (never UNKNOWN or
INTERNAL) and is healthy afterwards. Inputs come from a seeded generator: a failure names the
seed and the input."""

from __future__ import annotations

import math
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2 as kserve

from carrara.gateway.grpc_client import predict_stub
from carrara.v1 import predict_pb2
from tests.chaos.models import MODEL, NAMESPACE, gateway_config, seed_redis, value
from tests.chaos.procs import GatewayProcess, PrivateRedis, grpc_healthy
from tests.chaos.record import FULL, CaseRecord, p99_ms

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.timeout(900 if FULL else 120),
]

SEED = int(os.environ.get("CARRARA_CHAOS_SEED", "20240607"))
SCALE = 10 if FULL else 1
PREDICT = "/carrara.v1.Predict/Predict"
KSERVE = "/inference.GRPCInferenceService/"
#: Every unary RPC of the KServe v2 / Triton GRPCInferenceService, and its request message.
KSERVE_UNARY = {
    name: getattr(kserve, f"{name}Request")
    for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
        "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
    )
}  # fmt: skip
#: Deliberate answers to bad input. UNIMPLEMENTED: the RPCs carrara does not support.
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"}
MAX_MESSAGE = 16 << 20  # the gateway's limit (GatewayServer.max_message_bytes)
PROBE_START, PROBE_END = 100, 2_000  # fresh entities (never asked for by the corpus)
RECOVERY_BOUND_S = 10.0
NAMES = [
    "", " ", "m ", "M", "m\x00", "m\x00../x", "../../etc/passwd", "/m", "m/1", "m/../m", "./m",
    "..", "%s%n%x", "{m}", "m;DROP TABLE models", "\\\\server\\share", "模型", "💥🔥", "é" * 300,
    "m" * 100_000, "\u202em", "\ufeffm", "m\r\nX-Header: 1",
]  # fmt: skip


def entity_bytes(*ids: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in ids)


def infer_request(
    model: str = MODEL, *, datatype: str = "BYTES", shape: list[int] | None = None
) -> kserve.ModelInferRequest:
    req = kserve.ModelInferRequest(model_name=model)
    req.inputs.add(name="entity_ids", datatype=datatype, shape=shape if shape is not None else [1])
    req.raw_input_contents.append(entity_bytes(b"e1"))
    return req


def valid_requests() -> dict[str, list[bytes]]:
    """Well-formed requests of every RPC (the seeds of truncation and bit flips)."""
    out: dict[str, list[bytes]] = {}
    for name, cls in KSERVE_UNARY.items():
        msgs = [cls()]
        fields = {f.name for f in cls.DESCRIPTOR.fields}
        if "name" in fields:
            msgs.append(cls(name=MODEL))
        if "model_name" in fields:
            msgs.append(cls(model_name=MODEL))
        out[name] = [m.SerializeToString() for m in msgs]
    infer = infer_request()
    with_override = infer_request()
    with_override.inputs.add(name="x", datatype="FP32", shape=[1])
    with_override.raw_input_contents.append(struct.pack("<f", 3.0))
    contents = kserve.ModelInferRequest(model_name=MODEL, id="req-1")
    inp = contents.inputs.add(name="entity_ids", datatype="BYTES", shape=[2])
    inp.contents.bytes_contents.extend([b"e1", b"e2"])
    out["ModelInfer"] += [r.SerializeToString() for r in (infer, with_override, contents)]
    out["Predict"] = [
        predict_pb2.PredictRequest(model=MODEL, entity_ids=["e1", "e2"]).SerializeToString(),
        predict_pb2.PredictRequest(
            model=MODEL,
            entity_ids=["e1"],
            overrides=[predict_pb2.FeatureOverride(name="x", values=[1.5])],
            request_id="fuzz",
        ).SerializeToString(),
    ]
    return out


def method_path(name: str) -> str:
    return PREDICT if name == "Predict" else KSERVE + name


def wrong_dtypes_and_shapes(rng: random.Random) -> Iterator[bytes]:
    """ModelInfer requests whose tensors lie about their type, shape or size."""
    dtypes = ["FP32", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "FP16", "BF16", "",
              "bytes", "BYTES\x00", "STRING", "X" * 1000]  # fmt: skip
    shapes = [[], [0], [-1], [-5], [2], [1, 1], [1, 1, 1], [2**31], [2**62], [2**63 - 1],
              [1] * 64, [0, 5]]  # fmt: skip
    for dt in dtypes:
        yield infer_request(datatype=dt).SerializeToString()
    for shape in shapes:
        yield infer_request(shape=shape).SerializeToString()
    # raw contents that disagree with the shape / length prefixes
    raws = [b"", b"\x01", struct.pack("<I", 2**32 - 1) + b"e1", struct.pack("<I", 0),
            entity_bytes(b"e1") + b"\x00", entity_bytes(b"e1", b"e2"), b"\xff" * 7]  # fmt: skip
    for raw in raws:
        req = kserve.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="entity_ids", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(raw)
        yield req.SerializeToString()
    # no input / two entity inputs / inputs without raw contents / raw contents without inputs
    yield kserve.ModelInferRequest(model_name=MODEL).SerializeToString()
    req = infer_request()
    req.inputs.add(name="entity_ids", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(entity_bytes(b"e2"))
    yield req.SerializeToString()
    req = infer_request()
    del req.raw_input_contents[:]
    yield req.SerializeToString()
    req = kserve.ModelInferRequest(model_name=MODEL)
    req.raw_input_contents.append(entity_bytes(b"e1"))
    yield req.SerializeToString()
    # both raw and typed contents
    req = infer_request()
    req.inputs[0].contents.bytes_contents.append(b"e3")
    yield req.SerializeToString()
    # overrides with the wrong type, size, name or shape
    one = struct.pack("<f", 1.0)
    overrides = [
        ("FP32", b"\x00\x00\x80", [1]), ("FP32", b"\x00" * 8, [1]),
        ("FP64", struct.pack("<d", 1.0), [1]), ("INT64", struct.pack("<q", 1), [1]),
        ("BYTES", entity_bytes(b"1.0"), [1]), ("FP32", one, [2]), ("FP32", one, [1, 1, 1]),
        ("FP32", one, [-1]), ("FP32", b"", [0]),
    ]  # fmt: skip
    for dt, raw, shape in overrides:
        for name in ["x", "u.x", "nope", "entity_ids", "", "../x"]:
            req = infer_request()
            req.inputs.add(name=name, datatype=dt, shape=shape)
            req.raw_input_contents.append(raw)
            yield req.SerializeToString()
    # requested outputs and parameters nobody asked for
    req = infer_request()
    req.outputs.add(name="nope")
    req.outputs.add(name="predictions").parameters["classification"].int64_param = 3
    yield req.SerializeToString()
    req = infer_request()
    req.parameters["binary_data_output"].bool_param = True
    req.parameters["sequence_id"].string_param = "\x00" * 100
    req.inputs[0].parameters["shared_memory_region"].string_param = "/dev/shm/../../etc/passwd"
    yield req.SerializeToString()
    # random combinations
    for _ in range(60 * SCALE):
        req = kserve.ModelInferRequest(
            model_name=rng.choice([MODEL, "", "nope", rng.choice(NAMES)])
        )
        for _ in range(rng.randint(0, 4)):
            req.inputs.add(
                name=rng.choice(["entity_ids", "x", "y", "u.y", "?"]),
                datatype=rng.choice(dtypes),
                shape=[rng.choice([-1, 0, 1, 2, 3, 2**40]) for _ in range(rng.randint(0, 3))],
            )
        for _ in range(rng.randint(0, 4)):
            req.raw_input_contents.append(rng.randbytes(rng.choice([0, 1, 4, 6, 12, 100])))
        yield req.SerializeToString()


def non_finite() -> Iterator[tuple[str, bytes]]:
    for bad in (math.nan, math.inf, -math.inf):
        yield (
            "Predict",
            predict_pb2.PredictRequest(
                model=MODEL,
                entity_ids=["e1"],
                overrides=[predict_pb2.FeatureOverride(name="x", values=[bad])],
            ).SerializeToString(),
        )
        yield (
            "Predict",
            predict_pb2.PredictRequest(
                model=MODEL,
                entity_ids=["e1", "e2"],
                overrides=[predict_pb2.FeatureOverride(name="u.y", values=[1.0, bad])],
            ).SerializeToString(),
        )
        req = infer_request()
        req.inputs.add(name="x", datatype="FP32", shape=[1])
        req.raw_input_contents.append(struct.pack("<f", bad))
        yield "ModelInfer", req.SerializeToString()
        typed = kserve.ModelInferRequest(model_name=MODEL)
        inp = typed.inputs.add(name="entity_ids", datatype="BYTES", shape=[1])
        inp.contents.bytes_contents.append(b"e1")
        x = typed.inputs.add(name="x", datatype="FP32", shape=[1])
        x.contents.fp32_contents.append(bad)
        yield "ModelInfer", typed.SerializeToString()


def huge() -> Iterator[tuple[str, bytes]]:
    """Messages past the gateway's 16 MB limit (~20 MB), and big ones just under it."""
    big = 20 << 20
    yield (
        "Predict",
        predict_pb2.PredictRequest(model=MODEL, entity_ids=["e" * big]).SerializeToString(),
    )
    yield (
        "Predict",
        predict_pb2.PredictRequest(
            model=MODEL, entity_ids=[f"e{i}" for i in range(2_500_000)]
        ).SerializeToString(),
    )
    req = infer_request()
    req.raw_input_contents[0] = entity_bytes(b"e" * big)
    yield "ModelInfer", req.SerializeToString()
    yield "ServerLive", os.urandom(big)
    yield "ModelMetadata", kserve.ModelMetadataRequest(name="m" * big).SerializeToString()
    # under the message limit: a 12 MB entity id (past the 1 KiB id bound), 100,000
    # entities (past the per-request bound)
    yield (
        "Predict",
        predict_pb2.PredictRequest(model=MODEL, entity_ids=["e" * (12 << 20)]).SerializeToString(),
    )
    yield (
        "Predict",
        predict_pb2.PredictRequest(
            model=MODEL, entity_ids=[f"e{i}" for i in range(100_000)]
        ).SerializeToString(),
    )
    req = infer_request(shape=[100_000])
    req.raw_input_contents[0] = entity_bytes(*[b"e%d" % i for i in range(100_000)])
    yield "ModelInfer", req.SerializeToString()


def model_names() -> Iterator[tuple[str, bytes]]:
    for name in NAMES:
        for rpc in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"):
            yield rpc, KSERVE_UNARY[rpc](name=name).SerializeToString()
        yield (
            "RepositoryModelLoad",
            kserve.RepositoryModelLoadRequest(model_name=name).SerializeToString(),
        )
        yield "ModelInfer", infer_request(model=name).SerializeToString()
        yield (
            "Predict",
            predict_pb2.PredictRequest(model=name, entity_ids=["e1"]).SerializeToString(),
        )
        yield (
            "Predict",
            predict_pb2.PredictRequest(model=MODEL, entity_ids=[name]).SerializeToString(),
        )


def corpus(rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
    """(category, rpc, payload) for every unary input."""
    valid = valid_requests()
    rpcs = [*KSERVE_UNARY, "Predict"]
    for _ in range(20 * SCALE):
        for rpc in rpcs:
            n = rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 256, 4096, 65536])
            yield "random bytes", rpc, rng.randbytes(n)
    for rpc, payloads in valid.items():
        for payload in payloads:
            yield "valid", rpc, payload
            for _ in range(5 * SCALE):
                if len(payload) > 1:
                    yield "truncated protobuf", rpc, payload[: rng.randrange(1, len(payload))]
                flipped = bytearray(payload or b"\x00")
                for _ in range(rng.randint(1, 4)):
                    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
                yield "bit-flipped protobuf", rpc, bytes(flipped)
    for payload in wrong_dtypes_and_shapes(rng):
        yield "wrong dtype/shape", "ModelInfer", payload
    for rpc, payload in non_finite():
        yield "NaN/Inf", rpc, payload
    for rpc, payload in model_names():
        yield "unicode/path-like names", rpc, payload
    for rpc, payload in huge():
        yield "20 MB messages", rpc, payload


def streams(rng: random.Random) -> Iterator[list[bytes]]:
    """ModelStreamInfer sessions mixing good requests, garbage and bad tensors."""
    good = infer_request().SerializeToString()
    bad = list(wrong_dtypes_and_shapes(random.Random(rng.random())))
    for _ in range(5 * SCALE):
        session = []
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            if kind < 0.3:
                session.append(good)
            elif kind < 0.6:
                session.append(rng.randbytes(rng.choice([0, 1, 7, 100, 5000])))
            elif kind < 0.8:
                session.append(rng.choice(bad))
            else:
                session.append(good[: rng.randrange(1, len(good))])
        yield session


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    seed_redis(redis.port, PROBE_END)
    try:
        config = gateway_config(tmp_path, online_store_url=f"{redis.url}?namespace={NAMESPACE}")
        g = GatewayProcess(tmp_path, config=config).start()
        try:
            yield g
        finally:
            g.close()
    finally:
        redis.close()


def test_grpc_fuzz(gateway: GatewayProcess, chaos_record: Callable[..., CaseRecord]) -> None:
    rec = chaos_record(
        "grpc_fuzz",
        title="gRPC fuzzing of the native front",
        asserted=(
            "Seeded fuzz inputs (seed in the notes) against `carrara serve`: random bytes, "
            "truncated and bit-flipped protobuf of valid requests, wrong KServe dtypes, shapes, "
            "sizes and input names, NaN/Inf overrides, ~20 MB messages (past the 16 MB limit) "
            "and big ones under it, unicode, control-character and path-like model and entity "
            "names — on Predict and every GRPCInferenceService RPC, plus ModelStreamInfer "
            "sessions mixing good and bad messages. Asserted: the process never dies; every "
            "call ends with a deliberate status (OK, INVALID_ARGUMENT, NOT_FOUND, "
            "RESOURCE_EXHAUSTED, or UNIMPLEMENTED for the RPCs carrara does not offer) — never "
            "UNKNOWN, INTERNAL or a dropped connection (`failed` counts any other status); "
            "streams survive bad messages; no big message degrades another client's answer "
            "(entity ids over 1 KiB are refused before the store read); the gateway is SERVING "
            "and answers correctly after, "
            f"reading the store again within {RECOVERY_BOUND_S:g} s (recovery)."
        ),
    )
    rng = random.Random(SEED)
    rec.rss_before_mb = gateway.rss_mb()
    by_code: Counter[str] = Counter()
    by_category: Counter[str] = Counter()
    bad: list[str] = []
    latencies: list[float] = []
    options = [("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]  # fmt: skip
    with grpc.insecure_channel(gateway.target, options=options) as channel:
        predict = predict_stub(channel)
        fresh = iter(range(PROBE_START, PROBE_END))

        def probe_degraded() -> bool:
            """Whether another client's request for a never-cached entity is degraded now."""
            r = predict(predict_pb2.PredictRequest(model=MODEL, entity_ids=[f"e{next(fresh)}"]))
            return bool(r.degraded)

        collateral: list[str] = []
        callables: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        for category, rpc, payload in corpus(rng):
            if rpc not in callables:
                callables[rpc] = channel.unary_unary(
                    method_path(rpc),
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
            start = time.monotonic()
            try:
                callables[rpc](payload, timeout=60 if len(payload) > (1 << 20) else 10)
                code = "OK"
                details = ""
            except grpc.RpcError as exc:
                code = exc.code().name
                details = exc.details() or ""
            latencies.append(time.monotonic() - start)
            by_code[code] += 1
            by_category[category] += 1
            if code not in ALLOWED:
                bad.append(f"{category} {rpc} {payload[:60]!r}... -> {code}: {details[:200]}")
                if not gateway.alive():
                    break
            if len(payload) > MAX_MESSAGE and code != "RESOURCE_EXHAUSTED":
                bad.append(f"{category} {rpc}: {len(payload)} bytes answered {code}")
            if category == "20 MB messages" and probe_degraded():
                collateral.append(f"{rpc} of {len(payload) / 2**20:.1f} MB ({code})")
        stream = channel.stream_stream(
            KSERVE + "ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=kserve.ModelStreamInferResponse.FromString,
        )
        stream_messages = 0
        for session in streams(rng):
            start = time.monotonic()
            try:
                replies = list(stream(iter(session), timeout=30))
                code = "OK"
                if len(replies) != len(session):
                    bad.append(f"stream: {len(session)} requests, {len(replies)} replies")
            except grpc.RpcError as exc:
                code = exc.code().name
                if code not in ALLOWED:
                    bad.append(f"stream -> {code}: {exc.details()}")
            latencies.append(time.monotonic() - start)
            stream_messages += len(session)
            by_code[code] += 1
            by_category["ModelStreamInfer sessions"] += 1
        rec.rss_after_mb = gateway.rss_mb() if gateway.alive() else None
        alive = gateway.alive()
        healthy = grpc_healthy(gateway.target)
        # Recovery: until another client's fresh entity is read from the store again.
        fuzz_end = time.monotonic()
        while probe_degraded() and time.monotonic() - fuzz_end < RECOVERY_BOUND_S:
            time.sleep(0.02)
        rec.recovery_s = round(time.monotonic() - fuzz_end, 3)
        check = predict(predict_pb2.PredictRequest(model=MODEL, entity_ids=["e5"]), timeout=10)
    rec.sent = sum(by_code.values())
    rec.failed = sum(n for code, n in by_code.items() if code not in ALLOWED)
    rec.answered = rec.sent - rec.failed
    rec.p99_ms = p99_ms(latencies)
    rec.extra.update(
        seed=SEED,
        codes=dict(by_code),
        categories=dict(by_category),
        stream_messages=stream_messages,
        crashes=0 if alive else 1,
        problems=bad[:20],
        collateral_degraded_after=collateral,
    )
    rec.note(
        f"seed {SEED}: {rec.sent} calls ({stream_messages} messages in "
        f"{by_category['ModelStreamInfer sessions']} streams); statuses "
        + ", ".join(f"{c} {n}" for c, n in sorted(by_code.items()))
        + f"; crashes: {0 if alive else 1}."
    )
    assert alive, gateway.log()
    assert bad == [], bad[:20]
    # A huge entity id is refused before the store read (ids are capped at 1 KiB), so no
    # request degrades another client's answers.
    assert collateral == [], collateral
    assert healthy
    assert rec.recovery_s < RECOVERY_BOUND_S
    assert check.predictions[0].values[0] == pytest.approx(value(5))
    assert not check.degraded
