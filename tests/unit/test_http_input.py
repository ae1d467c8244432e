"""Bounded input in every HTTP API (``carrara.http``): bodies are limited while they are read
(chunked ones too) and before any token work, with 413 everywhere; control characters and
over-long path parameters, deep JSON and NUL in JSON strings are 400, never 500; an unexpected
error is a JSON 500 that keeps the connection.

The APIs run in-process (``httpx.ASGITransport``), which pulls a request body from the client
only when the app asks for the next chunk: ``Body.pulled`` is how much the server read.
"""

from __future__ import annotations

import gzip
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carrara.config import Settings
from carrara.core import (
    AssemblerSpec,
    FeatureRef,
    GroupSchema,
)
from carrara.errors import PayloadTooLargeError, ResourceExhaustedError
from carrara.gateway.http_front import create_app as gateway_app
from carrara.gateway.service import Gateway
from carrara.http import (
    MAX_JSON_DEPTH,
    InputGuard,
    check_json,
    decode_json,
    json_response,
    read_body,
    wrap,
)
from carrara.services import ControlPlane
from tests.asgi import call
from tests.servers import DictStore, scorer_engine, serve_app

TOKEN = "input-test-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
CHUNK = 4096
LIMIT = 64 * 1024  # every API's limit in the streaming tests (patched down from the real ones)
MAX_PULLED = LIMIT // CHUNK + 1  # the chunk that passes the limit is the last one read


class Body:
    """A chunked request body of ``n`` chunks that counts the chunks the server pulled."""

    def __init__(self, n: int, chunk: bytes = b" " * CHUNK) -> None:
        self.n, self.chunk, self.pulled = n, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.n):
            self.pulled += 1
            yield self.chunk


def deep(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def deep_raw(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


# -- the apps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    home = tmp_path_factory.mktemp("plane")
    cp = ControlPlane(Settings(home=str(home), online_store_url="memory://", api_token=TOKEN))
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starlette]:
    group = GroupSchema("user", 1, ("a", "b"))
    spec = AssemblerSpec(
        groups=(group,), features=(FeatureRef("user", "a"), FeatureRef("user", "b"))
    )
    engine = scorer_engine(
        tmp_path_factory.mktemp("m"),
        spec,
        np.eye(2, dtype=np.float32),
        [0.0, 0.0],
        store=DictStore.users(10),
        version=1,
        variant="v1",
        cache_capacity=100,
    )
    gw = Gateway(engine)
    try:
        yield gateway_app(gw)
    finally:
        gw.close()


def _app(name: str, plane: ControlPlane, gateway: Starlette) -> Any:
    return gateway if name == "gateway" else plane.app


def _assert_error(r: httpx.Response, path: str, code: str, fragment: str) -> None:
    """The error in the shape of the API that answered: Triton's ``{"error": message}`` under
    ``/v2``, else Carrara's ``{"error": code, "message"}`` (every other API)."""
    body = r.json()
    if path.startswith("/v2/"):
        assert isinstance(body["error"], str) and fragment in body["error"], body
    else:
        assert set(body) == {"error", "message"}, body
        assert body["error"] == code and fragment in body["message"], body


# -- the kernel ------------------------------------------------------------------------------


def _reader_app(limit: int, *, decode_content: bool = False) -> Starlette:
    async def echo(request: Request) -> Response:
        raw = await read_body(request, limit, decode_content=decode_content)
        return json_response({"size": len(raw)})

    return Starlette(routes=[Route("/echo", wrap(echo), methods=["POST"])])


def test_read_body_stops_at_the_first_chunk_past_the_limit() -> None:
    app = _reader_app(LIMIT)
    body = Body(1000)  # 4 MB offered, chunked (no Content-Length)
    r = call(app, "POST", "/echo", content=body)
    assert r.status_code == 413 and r.json()["error"] == "RESOURCE_EXHAUSTED"
    assert "over the limit of 65536 bytes" in r.json()["message"]
    assert body.pulled == MAX_PULLED
    exact = Body(LIMIT // CHUNK)
    r = call(app, "POST", "/echo", content=exact)
    assert r.status_code == 200 and r.json() == {"size": LIMIT}


def test_read_body_refuses_a_declared_length_without_reading() -> None:
    body = Body(1000)
    headers = {"content-length": str(1000 * CHUNK)}
    r = call(_reader_app(LIMIT), "POST", "/echo", content=body, headers=headers)
    assert r.status_code == 413 and "of 4096000 bytes is over the limit of 65536" in r.text
    assert body.pulled == 0


def test_read_body_limits_what_a_compressed_body_inflates_to() -> None:
    bomb = gzip.compress(b" " * (LIMIT * 50))
    assert len(bomb) < LIMIT
    app = _reader_app(LIMIT, decode_content=True)
    r = call(app, "POST", "/echo", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "(decompressed)" in r.json()["message"]
    small = gzip.compress(b"x" * 100)
    r = call(app, "POST", "/echo", content=small, headers={"content-encoding": "gzip"})
    assert r.json() == {"size": 100}


def test_payload_too_large_is_413_and_resource_exhausted() -> None:
    assert PayloadTooLargeError.http_status == 413
    assert PayloadTooLargeError.grpc_code == "RESOURCE_EXHAUSTED"
    assert issubclass(PayloadTooLargeError, ResourceExhaustedError)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, True),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), False),
        (deep_raw(MAX_JSON_DEPTH + 1), False),
        (b"[" * 100_000, False),  # truncated and deep: refused before msgspec recurses
        (b'["' + b"[" * 1000 + b'"]', True),  # brackets inside a string do not nest
        (b'["\\"' + b"[" * 1000 + b'"]', True),  # nor after an escaped quote
        (b'["\\\\", ' + b"[" * 100 + b"]" * 100 + b"]", False),  # an escaped backslash ends it
        (b"[" + b"[1, 2], " * 10_000 + b"[3]]", True),  # wide, not deep
        (b'{"name": "a\\u0000b"}', False),
        (b'{"name": "a\\u0001b"}', True),
    ],
)
def test_check_json(raw: bytes, ok: bool) -> None:
    if ok:
        check_json(raw)
    else:
        with pytest.raises(ValueError, match=r"nested over 64 levels|NUL"):
            check_json(raw)


def test_decode_json_never_raises_recursion_error() -> None:
    with pytest.raises(ValueError, match="invalid request body"):
        decode_json(b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(ValueError, match="needs a JSON body"):
        decode_json(b"  ")
    with pytest.raises(ValueError, match="not valid JSON"):
        decode_json(b"{nope")
    assert decode_json(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}


# -- body limits in every API ----------------------------------------------------------------

#: (API, method, path, auth, what patches the API's limit down to LIMIT)
LIMITED = [
    ("registry", "POST", "/models/m/versions", True, "registry"),
    ("features", "POST", "/features/groups/trips/get-online", False, "carrara.feature_cache.api"),
    (
        "feature admin",
        "POST",
        "/features/groups/trips/ingest",
        True,
        "carrara.feature_cache.api_admin",
    ),
    (
        "feature admin (dry run)",
        "POST",
        "/features/apply?dry_run=1",
        False,
        "carrara.feature_cache.api_admin:MAX_SPEC_BYTES",
    ),
    ("monitoring", "PUT", "/monitoring/models/m/config", True, "carrara.monitoring.api"),
    ("training", "POST", "/training-jobs", True, "carrara.training.api"),
    ("gateway", "POST", "/predict/scorer", False, "carrara.gateway.http_front"),
    ("gateway", "POST", "/v2/models/scorer/infer", False, "carrara.gateway.kserve_http"),
]


def _patch_limit(monkeypatch: pytest.MonkeyPatch, plane: ControlPlane, target: str) -> None:
    if target == "registry":
        # (the app's State keeps attributes in a dict: setattr's undo would delete them)
        monkeypatch.setitem(plane.app.state._state, "max_body_bytes", LIMIT)
        return
    module, _, name = target.partition(":")
    monkeypatch.setattr(f"{module}.{name or 'MAX_BODY_BYTES'}", LIMIT)


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize(("api", "method", "path", "auth", "limit"), LIMITED)
def test_every_api_answers_413_while_reading(
    plane: ControlPlane,
    gateway: Starlette,
    monkeypatch: pytest.MonkeyPatch,
    api: str,
    method: str,
    path: str,
    auth: bool,
    limit: str,
    declared: bool,
) -> None:
    _patch_limit(monkeypatch, plane, limit)
    body = Body(1000)  # 4 MB offered
    headers = dict(ADMIN) if auth else {}
    if declared:
        headers["content-length"] = str(1000 * CHUNK)
    r = call(_app(api, plane, gateway), method, path, content=body, headers=headers)
    assert r.status_code == 413, (api, r.text)
    _assert_error(r, path, "RESOURCE_EXHAUSTED", "over the limit")
    assert body.pulled == (0 if declared else MAX_PULLED), api


#: Writes that need a token: refused before a byte of the body is read.
WRITES = [
    ("POST", "/models"),
    ("POST", "/models/m/versions"),
    ("PATCH", "/models/m"),
    ("POST", "/models/m/versions/1/deploy"),
    ("POST", "/features/apply"),
    ("POST", "/features/groups/trips/ingest"),
    ("POST", "/features/training-set"),
    ("PUT", "/monitoring/models/m/config"),
    ("PUT", "/monitoring/models/m/versions/1/reference"),
    ("POST", "/training-jobs"),
    ("POST", "/training-triggers"),
]


@pytest.mark.parametrize(
    "authorization", [None, "Bearer not-a-token", "Basic abc"], ids=["none", "unknown", "basic"]
)
@pytest.mark.parametrize(("method", "path"), WRITES)
def test_writes_without_a_valid_token_read_no_body(
    plane: ControlPlane, method: str, path: str, authorization: str | None
) -> None:
    for declared in (False, True):
        body = Body(2000)  # 8 MB offered: no write route may read it without a token
        headers = {"authorization": authorization} if authorization else {}
        if declared:
            headers["content-length"] = str(2000 * CHUNK)
        r = call(plane.app, method, path, content=body, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "UNAUTHENTICATED"
        assert body.pulled == 0, (method, path, declared)


def test_registry_checks_the_role_before_reading(plane: ControlPlane) -> None:
    reader = plane.registry.tokens.create("input-reader", ["reader"])
    body = Body(2000)
    r = call(
        plane.app, "POST", "/models", content=body, headers={"authorization": f"Bearer {reader}"}
    )
    assert r.status_code == 403 and "publisher" in r.json()["message"]
    assert body.pulled == 0


# -- path parameters, deep JSON, huge names --------------------------------------------------


def _routes_with_params(app: Starlette) -> list[tuple[str, str, dict[str, str]]]:
    """(method, path template, {param: convertor name}) of every route with path params."""
    out = []
    for route in app.routes:
        convertors = getattr(route, "param_convertors", {})
        if not convertors:
            continue
        kinds = {
            name: type(conv).__name__.removesuffix("Convertor").lower()
            for name, conv in convertors.items()
        }
        for method in sorted(set(getattr(route, "methods", None) or {"GET"}) - {"HEAD"}):
            out.append((method, route.path, kinds))  # type: ignore[attr-defined]
    return out


def _fill(template: str, kinds: dict[str, str], text: str) -> str:
    path = template
    for name, kind in kinds.items():
        value = "1" if kind == "integer" else text
        path = path.replace("{" + name + ":" + ("int" if kind == "integer" else kind) + "}", value)
        path = path.replace("{" + name + "}", value)
    return path


BAD_SEGMENTS = {
    "nul": "a%00b",
    "newline": "a%0Ab",
    "escape": "a%1Bb",
    "delete": "a%7Fb",
    "long": "a" * 300,
}


@pytest.mark.parametrize("bad", sorted(BAD_SEGMENTS))
def test_every_path_parameter_refuses_control_characters_and_huge_names(
    plane: ControlPlane, gateway: Starlette, bad: str
) -> None:
    checked = 0
    for api, app in (("control plane", plane.app), ("gateway", gateway)):
        for method, template, kinds in _routes_with_params(app):
            if "path" in kinds.values() or all(k == "integer" for k in kinds.values()):
                continue
            path = _fill(template, kinds, BAD_SEGMENTS[bad])
            r = call(app, method, path, headers=ADMIN, content=b"{}")
            assert r.status_code == 400, (api, method, path, r.status_code, r.text)
            _assert_error(r, path, "INVALID_ARGUMENT", "path")
            checked += 1
    assert checked >= 30  # registry, features, monitoring, training, gateway, KServe


def test_routes_mounted_without_the_guard_still_check_path_params(plane: ControlPlane) -> None:
    from carrara.monitoring.api import create_routes

    bare = Starlette(routes=create_routes(plane.db, plane.events))
    r = call(bare, "GET", "/monitoring/models/a%00b/report")
    assert r.status_code == 400 and "control character" in r.json()["message"]
    r = call(bare, "GET", "/monitoring/models/" + "m" * 300 + "/report")
    assert r.status_code == 400 and "over 256 characters" in r.json()["message"]


@pytest.mark.parametrize(
    "path",
    ["/models/m/versions?status=%00", "/monitoring/alerts?model=a%0Ab", "/training-jobs?state=%00"],
)
def test_control_characters_in_the_query_are_400(plane: ControlPlane, path: str) -> None:
    r = call(plane.app, "GET", path)
    assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT"


def test_integer_path_parameters_past_int64_are_400(plane: ControlPlane) -> None:
    r = call(plane.app, "GET", "/models/m/versions/" + "9" * 30)
    assert r.status_code == 400 and "out of range" in r.json()["message"]


SPEC: dict[str, Any] = {
    "model_name": "m",
    "dataset": {
        "features": ["trips:x"],
        "label_source": "l.parquet",
        "label_column": "y",
        "entity_column": "id",
    },
    "model": {"estimator": "ridge"},
}
_ONNX = msgspec.json.encode(b"\x08\x07fake-onnx-model").decode()


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 10, 5_000, 100_000])
@pytest.mark.parametrize(
    ("api", "method", "path", "body"),
    [
        (
            "registry",
            "POST",
            "/models/m/versions",
            lambda d: {"framework": "sklearn", "serving_artifact": _ONNX[1:-1], "serving_spec": d},
        ),
        ("registry", "POST", "/models", lambda d: {"name": "deep", "gates": d}),
        ("feature admin", "POST", "/features/groups/trips/ingest", lambda d: [{"x": d}]),
        ("monitoring", "PUT", "/monitoring/models/m/config", lambda d: {"window": d}),
        (
            "training",
            "POST",
            "/training-jobs",
            lambda d: {"spec": {**SPEC, "model": {"estimator": "ridge", "params": {"p": d}}}},
        ),
        ("gateway", "POST", "/predict/scorer", lambda d: {"entity_ids": ["u1"], "overrides": d}),
        (
            "gateway",
            "POST",
            "/v2/models/scorer/infer",
            lambda d: {
                "inputs": [
                    {"name": "entity_ids", "shape": [1], "datatype": "BYTES", "data": ["u1"]}
                ],
                "parameters": {"p": d},
            },
        ),
    ],
)
def test_deep_json_is_400(
    plane: ControlPlane,
    gateway: Starlette,
    api: str,
    method: str,
    path: str,
    body: Any,
    levels: int,
) -> None:
    marker = b'"__DEEP__"'
    raw = msgspec.json.encode(body("__DEEP__"))
    raw = raw.replace(marker, deep_raw(levels))
    headers = {**ADMIN, "content-type": "application/json"}
    r = call(_app(api, plane, gateway), method, path, content=raw, headers=headers)
    assert r.status_code == 400, (api, path, r.text[:300])
    _assert_error(r, path, "INVALID_ARGUMENT", "nested over 64 levels deep")


@pytest.mark.parametrize(
    ("method", "path", "body", "fragment"),
    [
        ("POST", "/models", {"name": "a" * 300}, "invalid model name"),
        ("POST", "/models", {"name": "ok-name", "description": "a\u0000b"}, "NUL"),
        ("GET", "/models/" + "a" * 300, None, "over 256 characters"),
        (
            "POST",
            "/training-triggers",
            {"name": "t" * 300, "kind": "manual", "spec": SPEC},
            "trigger name",
        ),
        (
            "POST",
            "/features/apply",
            {"entities": [{"name": "e" * 300, "join_key": "id"}], "groups": []},
            "",
        ),
    ],
)
def test_huge_names_and_nul_in_bodies_are_400(
    plane: ControlPlane, method: str, path: str, body: Any, fragment: str
) -> None:
    r = call(plane.app, method, path, json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["message"]


# -- errors keep the connection --------------------------------------------------------------


@contextmanager
def _serve(app: Any) -> Iterator[int]:
    with serve_app(app, log_level="critical") as base:
        yield int(base.rsplit(":", 1)[1])


def _exchange(conn: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one request on ``conn`` and read one response (Content-Length framed)."""
    conn.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        rest += chunk
    return int(head.split(b" ")[1]), rest[:length]


def test_4xx_and_unexpected_errors_keep_the_connection(tmp_path: Path) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def ok(request: Request) -> Response:
        return json_response({"status": "ok"})

    app = Starlette(
        routes=[Route("/boom", boom), Route("/ok", ok), Route("/items/{name}", ok)],
        middleware=[Middleware(InputGuard)],
    )
    get = b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n"
    with _serve(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        status, body = _exchange(conn, get % b"/items/a%00b")
        assert status == 400 and msgspec.json.decode(body)["error"] == "INVALID_ARGUMENT"
        status, body = _exchange(conn, get % b"/ok")
        assert status == 200
        status, body = _exchange(conn, get % b"/boom")
        assert status == 500 and msgspec.json.decode(body)["error"] == "INTERNAL"
        assert b"a bug" not in body  # details go to the log, not to the caller
        status, body = _exchange(conn, get % b"/ok")
        assert status == 200 and msgspec.json.decode(body) == {"status": "ok"}


def test_a_declared_oversized_upload_is_refused_from_its_headers(plane: ControlPlane) -> None:
    """413 on a declared Content-Length over the limit: answered before any body is sent."""
    with _serve(plane.app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        size = 1 << 30
        head = (
            b"POST /features/groups/trips/get-online HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % size
        )
        status, body = _exchange(c, head)  # no body sent at all: refused from the header
        assert status == 413 and msgspec.json.decode(body)["error"] == "RESOURCE_EXHAUSTED"


# -- what the fuzz suite found (tests/chaos/test_fuzz_http.py) --------------------------------

DEFINITIONS = {
    "entities": [{"name": "rider", "join_key": "rider_id"}],
    "groups": [{"name": "trips", "entity": "rider", "features": [{"name": "a"}], "ttl_days": 0}],
}
ROW = {"rider_id": "r1", "event_timestamp": 1_700_000_000_000_000, "a": 1.0}


@pytest.fixture(scope="module")
def trips(plane: ControlPlane) -> str:
    r = call(plane.app, "POST", "/features/apply", json=DEFINITIONS, headers=ADMIN)
    assert r.status_code == 200, r.text
    return "trips"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/features/groups/trips/ingest", [{**ROW, "a": 2**64}]),
        ("POST", "/features/groups/trips/ingest", [{**ROW, "event_timestamp": -(2**63) - 1}]),
        ("POST", "/features/groups/trips/publish", [{**ROW, "a": 2**64}]),
        ("PUT", "/monitoring/models/m/config", {"window_ms": 2**64}),
        ("POST", "/training-jobs", {"spec": {**SPEC, "seed": 2**63}}),
        ("POST", "/models/m/versions/1/evaluations", {"dataset": "d", "metrics": {"a": 10**30}}),
    ],
)
def test_integers_past_int64_in_json_are_400(
    plane: ControlPlane, trips: str, method: str, path: str, body: Any
) -> None:
    r = call(plane.app, method, path, json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert "out of range (more than 64 bits)" in r.json()["message"]


def test_int64_bounds_themselves_are_accepted() -> None:
    assert decode_json(b"[9223372036854775807, -9223372036854775808, 1e30]") == [
        2**63 - 1,
        -(2**63),
        1e30,
    ]
    assert decode_json(b'{"id": "12345678901234567890123"}') == {"id": "12345678901234567890123"}


@pytest.mark.parametrize("value", [[], {}, [[[]]], {"x": 1}])
@pytest.mark.parametrize("route", ["ingest", "write-offline"])
def test_rows_arrow_cannot_convert_are_400(
    plane: ControlPlane, trips: str, route: str, value: Any
) -> None:
    rows = [{**ROW, "rider_id": value}]
    r = call(plane.app, "POST", f"/features/groups/{trips}/{route}", json=rows, headers=ADMIN)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "path",
    [
        "/features/groups/trips/definition?version=" + "9" * 30,
        "/monitoring/models/m/report?version=" + "9" * 30,
        "/training-jobs/x/logs?after=" + "9" * 30,
    ],
)
def test_integer_query_parameters_past_int64_are_400(
    plane: ControlPlane, trips: str, path: str
) -> None:
    r = call(plane.app, "GET", path)
    assert r.status_code == 400 and "out of range" in r.json()["message"], r.text


@pytest.mark.parametrize("overlap", ["1e308", "-1e308", "1e12"])
def test_materialize_overlap_must_be_finite_and_sane(
    plane: ControlPlane, trips: str, overlap: str
) -> None:
    body = b'{"group": "trips", "overlap_s": ' + overlap.encode() + b"}"
    headers = {**ADMIN, "content-type": "application/json"}
    r = call(plane.app, "POST", "/features/materialize", content=body, headers=headers)
    assert r.status_code == 400 and "overlap_s" in r.json()["message"], r.text
