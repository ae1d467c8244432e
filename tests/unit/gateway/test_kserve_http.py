"""KServe v2 over HTTP/REST on the HTTP front: unmodified ``tritonclient.http`` gets the engine's
answers (JSON and binary tensors, overrides, versions, statistics), and bad requests answer
4xx with Triton's ``{"error": ...}`` body, never 500."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette

from carrara.core import (
    AssemblerSpec,
    FeatureRef,
    GroupSchema,
)
from carrara.errors import (
    CarraraError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from carrara.gateway.kserve_http import HEADER_LENGTH, MAX_BODY_BYTES, kserve_routes
from carrara.gateway.kserve_types import ModelInfo, ModelStatistics
from carrara.gateway.server import GatewayServer
from tests.servers import running_gateway, scorer_engine

# tritonclient's HTTP client needs the `http` extra (geventhttpclient).
triton = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

GROUP = GroupSchema("user", 1, ("a", "b"))
SPEC = AssemblerSpec(groups=(GROUP,), features=(FeatureRef("user", "a"), FeatureRef("user", "b")))
W = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)  # [2, 2]: two outputs
BIAS = [0.5, -0.5]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    engine = scorer_engine(tmp_path_factory.mktemp("m"), SPEC, W, BIAS)
    with running_gateway(engine) as srv:
        yield srv


@pytest.fixture
def client(server: GatewayServer) -> Iterator[Any]:
    c = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()
    # The client's __del__ closes it again and must run on this thread (gevent's hub is
    # per-thread): collect the cycles that hold it (tracebacks of expected errors) here, not
    # wherever the next collection happens to run.
    del c
    gc.collect()


@pytest.fixture
def http(server: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


def expected(i: int, a: float | None = None, b: float | None = None) -> list[float]:
    x = np.array([i if a is None else a, -i if b is None else b], np.float32)
    return [float(v) for v in x @ W + np.array(BIAS, np.float32)]


def ids_input(ids: list[str], binary: bool = True) -> Any:
    inp = triton.InferInput("entity_ids", [len(ids)], "BYTES")
    inp.set_data_from_numpy(np.array([s.encode() for s in ids], dtype=np.object_), binary)
    return inp


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


def infer_body(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"inputs": inputs, **extra}


def ids_json(ids: list[str], shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "name": "entity_ids",
        "datatype": "BYTES",
        "shape": shape if shape is not None else [len(ids)],
        "data": ids,
    }


def assert_error(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["error"], str) and fragment in body["error"], body


# -- tritonclient.http ---------------------------------------------------------------------


def test_health_metadata_and_config(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("scorer") and client.is_model_ready("scorer", "3")
    assert not client.is_model_ready("nope") and not client.is_model_ready("scorer", "9")
    meta = client.get_server_metadata()
    assert meta["name"] == "carrara" and "binary_tensor_data" in meta["extensions"]
    assert "statistics" in meta["extensions"]
    model = client.get_model_metadata("scorer")
    assert model == client.get_model_metadata("scorer", "3")
    assert (model["name"], model["versions"], model["platform"]) == ("scorer", ["3"], "carrara")
    assert model["inputs"] == [{"name": "entity_ids", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1, 2]}]
    config = client.get_model_config("scorer")
    assert (config["name"], config["max_batch_size"]) == ("scorer", 0)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("entity_ids", "TYPE_STRING", [-1])
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("predictions", "TYPE_FP32", [-1, 2])
    ]
    with pytest.raises(InferenceServerException, match="'nope' is not deployed"):
        client.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="no deployed version '9'"):
        client.get_model_config("scorer", "9")


@pytest.mark.parametrize("in_binary", [True, False])
@pytest.mark.parametrize("out_binary", [True, False])
def test_infer_binary_and_json(client: Any, in_binary: bool, out_binary: bool) -> None:
    ids = ["u1", "u42", "nobody", "u99"]
    result = client.infer(
        "scorer",
        [ids_input(ids, in_binary)],
        outputs=[triton.InferRequestedOutput("predictions", binary_data=out_binary)],
        request_id="req-1",
    )
    out = result.as_numpy("predictions")
    assert out.dtype == np.float32 and out.shape == (4, 2)
    want = [expected(1), expected(42), expected(0), expected(99)]  # unknown: defaults are 0
    np.testing.assert_allclose(out, want, rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-1" and response["model_version"] == "3"
    tensor = response["outputs"][0]
    assert ("binary_data_size" in tensor.get("parameters", {})) == out_binary
    assert ("data" in tensor) == (not out_binary)


def test_infer_defaults_and_versions(client: Any) -> None:
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    result = client.infer("scorer", [ids_input(["u7"])], model_version="3")
    np.testing.assert_allclose(result.as_numpy("predictions"), [expected(7)], rtol=1e-6)
    assert result.get_response()["model_version"] == "3"
    with pytest.raises(InferenceServerException, match="no deployed version '4'"):
        client.infer("scorer", [ids_input(["u7"])], model_version="4")


@pytest.mark.parametrize("binary", [True, False])
def test_override_inputs(client: Any, binary: bool) -> None:
    ids = ["u3", "u5", "u8"]
    per_entity = triton.InferInput("a", [3], "FP32")
    per_entity.set_data_from_numpy(np.array([0.0, 1.0, 2.0], np.float32), binary)
    out = client.infer("scorer", [ids_input(ids), per_entity]).as_numpy("predictions")
    np.testing.assert_allclose(
        out, [expected(3, a=0.0), expected(5, a=1.0), expected(8, a=2.0)], rtol=1e-6
    )
    broadcast = triton.InferInput("b", [1], "FP32")
    broadcast.set_data_from_numpy(np.array([10.0], np.float32), binary)
    out = client.infer("scorer", [ids_input(ids, binary=False), broadcast]).as_numpy("predictions")
    np.testing.assert_allclose(out, [expected(i, b=10.0) for i in (3, 5, 8)], rtol=1e-6)
    assert out[0].tolist() == pytest.approx([3.5, 19.5])


def test_tritonclient_errors(client: Any) -> None:
    with pytest.raises(InferenceServerException, match="not deployed") as err:
        client.infer("nope", [ids_input(["u1"])])
    assert err.value.status() == "404"
    bad = triton.InferInput("entity_ids", [2], "FP32")
    bad.set_data_from_numpy(np.zeros(2, np.float32))
    with pytest.raises(InferenceServerException, match="must be BYTES") as err:
        client.infer("scorer", [bad])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown output 'scores'"):
        client.infer("scorer", [ids_input(["u1"])], outputs=[triton.InferRequestedOutput("scores")])
    zz = triton.InferInput("zz", [1], "FP32")
    zz.set_data_from_numpy(np.ones(1, np.float32))
    with pytest.raises(InferenceServerException, match="unknown feature 'zz'"):
        client.infer("scorer", [ids_input(["u1"]), zz])


def test_compressed_requests(client: Any) -> None:
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "scorer", [ids_input(["u2", "u4"])], request_compression_algorithm=algorithm
        )
        np.testing.assert_allclose(
            result.as_numpy("predictions"), [expected(2), expected(4)], rtol=1e-6
        )


def test_inference_statistics(client: Any, server: GatewayServer) -> None:
    def scorer_stats() -> dict[str, Any]:
        stats = client.get_inference_statistics("scorer")["model_stats"]
        assert len(stats) == 1
        return stats[0]  # type: ignore[no-any-return]

    before = scorer_stats()
    for _ in range(3):
        client.infer("scorer", [ids_input(["u1", "u2"])])
    zz = triton.InferInput("zz", [1], "FP32")
    zz.set_data_from_numpy(np.ones(1, np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("scorer", [ids_input(["u1"]), zz])  # fails inside the gateway
    after = scorer_stats()
    assert (after["name"], after["version"]) == ("scorer", "3")
    success, fail = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3
    assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == 6  # entities
    assert after["execution_count"] - before["execution_count"] == 3
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["last_inference"] >= before["last_inference"] > 0
    # perf_analyzer reads these for every model it measures.
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert set(after["inference_stats"][key]) == {"count", "ns"}
    everything = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in everything] == ["scorer"]
    versioned = client.get_inference_statistics("scorer", "3")["model_stats"][0]
    assert versioned["version"] == "3"
    with pytest.raises(InferenceServerException, match="not deployed"):
        client.get_inference_statistics("nope")

    gateway = server.gateway
    stats = gateway.statistics("scorer")[0]
    assert stats.success_count == after["inference_stats"]["success"]["count"]
    with pytest.raises(NotFoundError, match="model 'nope' is not deployed"):
        gateway.statistics("nope")


def test_model_info(server: GatewayServer) -> None:
    info = server.gateway.model_info("scorer")
    assert info == ModelInfo(
        name="scorer", versions=["3"], platform="carrara", columns=["a", "b"], output_dim=2
    )
    with pytest.raises(NotFoundError, match="model 'nope' is not deployed"):
        server.gateway.model_info("nope")


# -- raw HTTP: protocol details and errors ---------------------------------------------------


def test_raw_json_and_binary_protocol(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2/models/scorer/ready").status_code == 200
    assert http.get("/v2/models/nope/ready").status_code == 400
    assert_error(http.get("/v2/models/nope"), 404, "model 'nope' is not deployed")
    assert_error(http.get("/v2/models/scorer/versions/9"), 404, "no deployed version '9'")
    assert_error(http.get("/v2/models/scorer/infer"), 404, "no KServe v2 endpoint GET")

    # Nested JSON data, shape [1, 3]; the id is echoed.
    r = http.post(
        "/v2/models/scorer/infer",
        json=infer_body([ids_json([["u1", "u2", "u3"]], [1, 3])], id="x-1"),  # type: ignore[list-item]
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "x-1" and body["model_name"] == "scorer"
    assert body["outputs"][0]["shape"] == [3, 2]
    assert body["outputs"][0]["data"] == pytest.approx([v for i in (1, 2, 3) for v in expected(i)])

    # Binary input and output by hand: JSON header, then the raw tensors.
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "entity_ids",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(bytes_tensor([b"u6", b"u9"]))},
                },
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4},
                },
            ],
            "outputs": [{"name": "predictions", "parameters": {"binary_data": True}}],
        }
    ).encode()
    raw = bytes_tensor([b"u6", b"u9"]) + np.float32(2.0).tobytes()
    r = http.post(
        "/v2/models/scorer/versions/3/infer",
        content=head + raw,
        headers={HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    split = int(r.headers[HEADER_LENGTH])
    meta = json.loads(r.content[:split])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    out = np.frombuffer(r.content[split:], "<f4").reshape(2, 2)
    np.testing.assert_allclose(out, [expected(6, a=2.0), expected(9, a=2.0)], rtol=1e-6)

    stats = http.get("/v2/models/stats").json()["model_stats"]
    assert stats[0]["name"] == "scorer" and stats[0]["version"] == "3"


def test_bad_requests_answer_4xx(http: httpx.Client) -> None:
    url = "/v2/models/scorer/infer"
    one = ids_json(["u1"])
    assert_error(http.post(url, content=b"{not json"), 400, "invalid inference request JSON")
    assert_error(http.post(url, content=b"\xff\xfe"), 400, "invalid inference request JSON")
    assert_error(http.post(url, json={"inputs": "x"}), 400, "invalid inference request JSON")
    assert_error(http.post(url, json={}), 400, "invalid inference request JSON")
    assert_error(http.post(url, content=b"[" * 100_000), 400, "invalid inference request")
    assert_error(
        http.post(url, json=infer_body([{**one, "datatype": "INT32", "data": [1]}])),
        400,
        "must be BYTES, got INT32",
    )
    assert_error(
        http.post(url, json=infer_body([ids_json(["u1", "u2", "u3"], [2])])),
        400,
        "has shape [2] but 3 elements",
    )
    assert_error(
        http.post(url, json=infer_body([ids_json(["u1"], [-1])])), 400, "negative dimensions"
    )
    assert_error(
        http.post(url, json=infer_body([ids_json(["u1"], [10**30])])),
        400,
        "out of range (more than 64 bits)",  # every API's JSON decoder refuses it
    )
    assert_error(
        http.post(url, json=infer_body([ids_json(["u1"], [1] * 17)])), 400, "over 16 dimensions"
    )
    assert_error(http.post(url, json=infer_body([{**one, "data": [1]}])), 400, "JSON strings")
    assert_error(http.post(url, json=infer_body([{**one, "data": "u1"}])), 400, "JSON array")
    assert_error(
        http.post(url, json=infer_body([{k: v for k, v in one.items() if k != "data"}])),
        400,
        "has no 'data'",
    )
    assert_error(http.post(url, json=infer_body([one, one])), 400, "more than once")
    assert_error(
        http.post(
            url, json=infer_body([{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}])
        ),
        400,
        "needs a BYTES input named 'entity_ids'",
    )
    fp32 = {"name": "a", "datatype": "FP32", "shape": [1]}
    assert_error(
        http.post(url, json=infer_body([one, {**fp32, "datatype": "FP64", "data": [1.0]}])),
        400,
        "must be FP32, got FP64",
    )
    assert_error(
        http.post(url, json=infer_body([one, {**fp32, "data": ["x"]}])), 400, "JSON numbers"
    )
    assert_error(
        http.post(url, json=infer_body([one, {**fp32, "data": [True]}])), 400, "JSON numbers"
    )
    assert_error(
        http.post(url, json=infer_body([one, {**fp32, "data": [1e39]}])), 400, "non-finite"
    )
    assert_error(
        http.post(url, json=infer_body([one, {**fp32, "shape": [2], "data": [1.0, 2.0]}])),
        400,
        "expected 1 or one per entity (1)",
    )
    assert_error(
        http.post(
            url,
            content=b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
        ),
        400,
        "invalid inference request JSON",
    )
    assert_error(
        http.post(url, json=infer_body([one], outputs=[{"name": "scores"}])),
        400,
        "unknown output 'scores'",
    )
    assert_error(
        http.post(
            url,
            json=infer_body(
                [one], outputs=[{"name": "predictions", "parameters": {"binary_data": 1}}]
            ),
        ),
        400,
        "must be a boolean",
    )
    assert_error(
        http.post(url, json=infer_body([one], parameters={"binary_data_output": "yes"})),
        400,
        "must be a boolean",
    )
    assert_error(
        http.post("/v2/models/nope/infer", json=infer_body([one])), 404, "'nope' is not deployed"
    )
    assert_error(
        http.post("/v2/models/scorer/versions/2/infer", json=infer_body([one])),
        404,
        "no deployed version '2'",
    )
    assert_error(
        http.post(url, content=b"{}", headers={"content-encoding": "br"}),
        400,
        "unsupported Content-Encoding 'br'",
    )
    assert_error(
        http.post(url, content=b"not gzip at all", headers={"content-encoding": "gzip"}),
        400,
        "invalid gzip request body",
    )
    truncated = gzip.compress(json.dumps(infer_body([one])).encode())[:-8]
    assert_error(
        http.post(url, content=truncated, headers={"content-encoding": "gzip"}),
        400,
        "truncated",
    )
    ok = http.post(
        url,
        content=zlib.compress(json.dumps(infer_body([one])).encode()),
        headers={"content-encoding": "deflate"},
    )
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == pytest.approx(expected(1))


def binary_request(
    http: httpx.Client, inputs: list[dict[str, Any]], raw: bytes, header: str | None = None
) -> httpx.Response:
    head = json.dumps({"inputs": inputs}).encode()
    return http.post(
        "/v2/models/scorer/infer",
        content=head + raw,
        headers={HEADER_LENGTH: header if header is not None else str(len(head))},
    )


def test_bad_binary_requests_answer_400(http: httpx.Client) -> None:
    def ids(size: int, shape: list[int] | None = None) -> dict[str, Any]:
        return {
            "name": "entity_ids",
            "datatype": "BYTES",
            "shape": shape or [1],
            "parameters": {"binary_data_size": size},
        }

    u1 = bytes_tensor([b"u1"])
    fp32 = {"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}
    nan = np.float32("nan").tobytes()
    assert_error(binary_request(http, [ids(len(u1)), fp32], u1 + nan), 400, "non-finite")
    inf = np.float32("inf").tobytes()
    assert_error(binary_request(http, [ids(len(u1)), fp32], u1 + inf), 400, "non-finite")
    assert_error(binary_request(http, [ids(len(u1)), fp32], u1 + b"\0\0"), 400, "past the end")
    assert_error(
        binary_request(http, [ids(len(u1)), {**fp32, "shape": [2]}], u1 + nan), 400, "4 bytes"
    )
    not_utf8 = bytes_tensor([b"\xff\xfe"])
    assert_error(binary_request(http, [ids(len(not_utf8))], not_utf8), 400, "UTF-8")
    assert_error(binary_request(http, [ids(3)], u1[:3]), 400, "length prefix cut off")
    assert_error(binary_request(http, [ids(len(u1) - 1)], u1[:-1]), 400, "element cut off")
    assert_error(binary_request(http, [ids(len(u1), [2])], u1), 400, "has shape [2] but 1 elements")
    assert_error(binary_request(http, [ids(len(u1))], u1 + b"xx"), 400, "2 bytes of binary")
    assert_error(binary_request(http, [ids(len(u1))], u1, header="999999"), 400, HEADER_LENGTH)
    assert_error(binary_request(http, [ids(len(u1))], u1, header="-1"), 400, HEADER_LENGTH)
    assert_error(
        http.post(
            "/v2/models/scorer/infer",
            json={"inputs": [ids(len(u1))]},
        ),
        400,
        f"no {HEADER_LENGTH} header",
    )
    assert_error(binary_request(http, [{**ids(len(u1)), "data": ["u1"]}], u1), 400, "both 'data'")
    assert_error(
        binary_request(http, [{**ids(len(u1)), "parameters": {"binary_data_size": "4"}}], u1),
        400,
        "non-negative integer",
    )


def test_body_limit(http: httpx.Client) -> None:
    url = "/v2/models/scorer/infer"
    big = b" " * (17 << 20)
    assert_error(http.post(url, content=big), 413, "over the limit")

    def chunks() -> Iterator[bytes]:  # no Content-Length: stopped while reading
        for _ in range(17):
            yield b" " * (1 << 20)

    assert_error(http.post(url, content=chunks()), 413, "over the limit")
    bomb = gzip.compress(b" " * (MAX_BODY_BYTES + 1))
    assert len(bomb) < 1 << 20
    assert_error(
        http.post(url, content=bomb, headers={"content-encoding": "gzip"}), 413, "decompressed"
    )
    # The connection and the server are still fine.
    ok = http.post(url, json=infer_body([ids_json(["u1"])]))
    assert ok.status_code == 200, ok.text


class RefusingTarget:
    """A gateway that is draining and refuses every request with ``error``."""

    ready = False
    draining = True

    def __init__(self, error: CarraraError) -> None:
        self.error = error

    async def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: dict[str, list[float]] | None = None,
        request_id: str | None = None,
    ) -> Any:
        raise self.error

    def model_info(self, name: str) -> ModelInfo:
        return ModelInfo(name=name, versions=["1"], columns=["a"], output_dim=1)

    def statistics(self, name: str | None = None) -> list[ModelStatistics]:
        return []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ResourceExhaustedError("gateway has 64 requests in flight (limit 64)"), 429),
        (UnavailableError("gateway is shutting down; retry on another replica"), 503),
    ],
)
def test_shed_and_draining(error: CarraraError, status: int) -> None:
    app = Starlette(routes=kserve_routes(RefusingTarget(error)))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            r = await http.post("/v2/models/m/infer", json=infer_body([ids_json(["u1"])]))
            assert r.status_code == status and r.json() == {"error": str(error)}
            assert (await http.get("/v2/health/live")).status_code == 200
            assert (await http.get("/v2/health/ready")).status_code == 400
            assert (await http.get("/v2/models/m/ready")).status_code == 400
            assert (await http.get("/v2/models/m/stats")).json() == {"model_stats": []}

    asyncio.run(scenario())
