"""What every part's HTTP API shares: the endpoint table that mounts its routes and produces its
OpenAPI document, the error body, JSON responses, the handler wrapper that maps
:class:`CarraraError` to its status, the bearer/role guard, and bounded input.

Every error is ``{"error": <gRPC code name>, "message": ...}`` with the error's
``http_status``, so one client (``carrara.Client``) reads errors from every part the same way;
Starlette's own 404/405 answer that shape too (:func:`http_error`).

One table per API: each part lists its :class:`Endpoint` s (method, path, types, status, role,
handler); :func:`build_routes` mounts them behind :func:`wrap` and, for endpoints with a role,
behind the token check (before any of the body is read); :func:`openapi_spec` documents the
same table, so a route cannot be served without being documented.

Bounded input, the same in every API (registry, features, feature admin, monitoring, training,
the control plane, the gateway's HTTP front and KServe REST):

- :func:`read_body` is the one body reader: a declared ``Content-Length`` over the limit is
  refused before reading, and a chunked body is counted while it streams and refused as soon as
  it passes the limit, always with 413 (:class:`~carrara.errors.PayloadTooLargeError`).
  Routes that need a token check it before reading.
- :func:`decode_json` is the one JSON decoder: malformed JSON, wrong types, nesting deeper than
  :data:`MAX_JSON_DEPTH`, ``\\u0000`` in strings and integers outside int64 answer 400, never a
  ``RecursionError`` or an overflow further down.
- :class:`InputGuard` (middleware of every app) answers 400 for control characters in the path
  or query and for path segments over :data:`MAX_PATH_PARAM_CHARS`, and turns an unexpected
  exception into a JSON 500 instead of a dropped connection; :func:`wrap` checks the path
  parameters of routes mounted in apps without the guard.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import unquote

import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carrara.auth import Authenticator, Principal, bearer_token, require_role
from carrara.errors import (
    CarraraError,
    InternalError,
    InvalidArgumentError,
    PayloadTooLargeError,
)

__all__ = [
    "JSON",
    "MAX_JSON_DEPTH",
    "MAX_PATH_PARAM_CHARS",
    "Endpoint",
    "ErrorBody",
    "ErrorRenderer",
    "Handler",
    "Health",
    "InputGuard",
    "api_app",
    "build_routes",
    "check_int64",
    "check_json",
    "check_path_params",
    "decode_json",
    "decode_msgpack",
    "error_response",
    "http_error",
    "json_response",
    "openapi_spec",
    "principal_of",
    "read_body",
    "with_document",
    "wrap",
]

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
#: Renders an error for a request path in an app's own error shape.
ErrorRenderer = Callable[[str, CarraraError], Response]

#: Deepest JSON nesting any API accepts (objects and arrays together).
MAX_JSON_DEPTH = 64
#: Longest path segment (hence path parameter) any API accepts, in characters.
MAX_PATH_PARAM_CHARS = 256

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
#: bytes.translate table: digits to "0", everything else to "x" (a fast scan for long numbers).
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))
_LONG_DIGITS = b"0" * 19  # the shortest run of digits that can be outside int64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error response: the gRPC-style code and a message saying how to fix it."""

    error: str
    message: str


class Health(msgspec.Struct, frozen=True):
    """What ``/healthz`` and ``/readyz`` answer."""

    status: str


_ENCODER = msgspec.json.Encoder()


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_ENCODER.encode(value), status_code=status, media_type="application/json")


def error_response(exc: CarraraError) -> Response:
    return json_response(ErrorBody(exc.grpc_code, str(exc)), exc.http_status)


def wrap(handler: Handler) -> Handler:
    """``handler`` with every CarraraError answered as its status (never a traceback), after
    :func:`check_path_params`."""

    async def run(request: Request) -> Response:
        try:
            check_path_params(request.path_params)
            return await handler(request)
        except CarraraError as exc:
            return error_response(exc)

    run.__name__ = handler.__name__
    return run


# -- bounded input ------------------------------------------------------------------------------


async def read_body(
    request: Request, limit: int, *, hint: str = "", decode_content: bool = False
) -> bytes:
    """The request body, at most ``limit`` bytes, else :class:`PayloadTooLargeError` (413).

    A declared ``Content-Length`` over ``limit`` is refused before reading anything; otherwise
    (chunked transfer included) the bytes are counted as they arrive and reading stops at the
    first chunk past ``limit``, so a client never makes the server hold more than ``limit``.
    ``decode_content`` accepts gzip / deflate bodies (``Content-Encoding``), limited on the wire
    and after decompression. ``hint`` ends the 413 message (what to do instead)."""
    suffix = f"; {hint}" if hint else ""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"request body of {int(declared)} bytes is over the limit of {limit}{suffix}"
        )
    inflater: Any = None
    encoding = ""
    if decode_content:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            inflater = zlib.decompressobj(zlib.MAX_WBITS)  # zlib-wrapped, as HTTP clients send
        elif encoding not in ("", "identity"):
            raise InvalidArgumentError(
                f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or identity"
            )
    chunks: list[bytes] = []
    wire = size = 0
    try:
        async for chunk in request.stream():
            wire += len(chunk)
            if inflater is not None and chunk:
                try:
                    chunk = inflater.decompress(chunk, limit - size + 1)
                except zlib.error as exc:
                    raise InvalidArgumentError(f"invalid {encoding} request body: {exc}") from None
            size += len(chunk)
            if size > limit or wire > limit:
                raise PayloadTooLargeError(
                    f"request body is over the limit of {limit} bytes"
                    + (" (decompressed)" if inflater is not None else "")
                    + suffix
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidArgumentError("client disconnected while sending the body") from None
    if inflater is not None and (not inflater.eof or inflater.unused_data):
        raise InvalidArgumentError(f"{encoding} request body is truncated or has trailing data")
    return b"".join(chunks)


_QUOTE, _OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT = b'"[]{}'
_WINDOW = 1 << 20


def _json_depth(raw: bytes, limit: int) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings do not
    count), stopping once it passes ``limit``. Vectorised over 1 MiB windows: a few ms per MB."""
    # Escapes first: a doubled backslash is one backslash, backslash-quote a quote in a string.
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = np.frombuffer(text, np.uint8)
    depth = deepest = 0
    in_string = 0  # parity of the quotes seen so far
    for start in range(0, len(data), _WINDOW):
        part = data[start : start + _WINDOW]
        opens = (part == _OPEN_ARRAY) | (part == _OPEN_OBJECT)
        closes = (part == _CLOSE_ARRAY) | (part == _CLOSE_OBJECT)
        quotes = part == _QUOTE
        where = np.flatnonzero(opens | closes | quotes)
        if where.size == 0:
            continue
        quote = quotes[where]
        inside = ((np.cumsum(quote) + in_string) & 1).astype(bool)
        step = opens[where].astype(np.int64) - closes[where]
        step[inside | quote] = 0
        levels = depth + np.cumsum(step)
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        in_string = (in_string + int(quote.sum())) & 1
        if deepest > limit:
            break
    return deepest


def check_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH, what: str = "request body") -> None:
    """InvalidArgumentError (400) for JSON nested deeper than ``max_depth``, with a NUL
    character (``\\u0000``, which no store keeps) in a string, or with an integer outside
    int64 (no column, Arrow array or timestamp holds one). Costs a few byte scans (~4 ms/MB);
    the exact checks run only when a scan finds many brackets or a 19-digit run."""
    if raw.count(b"[") + raw.count(b"{") > max_depth and _json_depth(raw, max_depth) > max_depth:
        raise InvalidArgumentError(f"invalid {what}: nested over {max_depth} levels deep")
    if b"\\u0000" in raw:
        raise InvalidArgumentError(f"invalid {what}: a string has a NUL character (\\u0000)")
    if _LONG_DIGITS in raw.translate(_DIGITS):  # ~4 ms/MB; a closer look only on a hit
        _check_ints(raw, what)


def _check_ints(raw: bytes, what: str) -> None:
    """InvalidArgumentError if a JSON integer in ``raw`` is outside int64 (what every column,
    Arrow array and timestamp holds); malformed JSON is left to the decoder to report."""
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            check_int64(item, f"a number in the {what}")
        elif type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)


def check_int64(value: int, what: str) -> int:
    """``value`` if it fits in a signed 64-bit integer, else InvalidArgumentError (400)."""
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidArgumentError(f"{what} is out of range (more than 64 bits)")
    return value


def decode_json(
    raw: bytes,
    kind: Any = Any,
    *,
    what: str = "request body",
    hint: str = "",
    optional: bool = False,
) -> Any:
    """``raw`` decoded as ``kind`` (a type or a ``msgspec.json.Decoder``); every way it can be
    wrong is an InvalidArgumentError (400) naming ``what``: empty (unless ``optional``: then
    ``kind`` from ``{}``), not JSON, the wrong shape, too deep, NUL in a string, an integer
    outside int64 (:func:`check_json`)."""
    if not raw.strip():
        if optional:
            return msgspec.convert({}, kind)
        raise InvalidArgumentError(f"invalid {what}: empty; this call needs a JSON body")
    check_json(raw, what=what)
    suffix = f"; {hint}" if hint else ""
    try:
        if isinstance(kind, msgspec.json.Decoder):
            return kind.decode(raw)
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidArgumentError(f"invalid {what}: {exc}{suffix}") from None
    except msgspec.DecodeError as exc:
        raise InvalidArgumentError(f"invalid {what}: not valid JSON: {exc}{suffix}") from None
    except RecursionError:
        raise InvalidArgumentError(f"invalid {what}: nested too deeply") from None


def decode_msgpack(raw: bytes, kind: Any, *, what: str = "request body", hint: str = "") -> Any:
    """:func:`decode_json` for msgpack bodies (400 for anything malformed or too deep)."""
    suffix = f"; {hint}" if hint else ""
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidArgumentError(f"invalid {what}: {exc}{suffix}") from None
    except RecursionError:
        raise InvalidArgumentError(f"invalid {what}: nested too deeply") from None


def _text_problem(what: str, value: str) -> str | None:
    if _CONTROL.search(value):
        return f"{what} has a control character (such as NUL); send printable text"
    return None


def check_path_params(params: Mapping[str, Any]) -> None:
    """InvalidArgumentError (400) for a path parameter with a control character or over
    :data:`MAX_PATH_PARAM_CHARS` characters (no name in Carrara is that long), and for an
    integer one no database column holds (over 2**63 - 1)."""
    for name, value in params.items():
        if isinstance(value, int):
            check_int64(value, f"path parameter {name!r}")
        if not isinstance(value, str):
            continue
        if len(value) > MAX_PATH_PARAM_CHARS:
            raise InvalidArgumentError(
                f"path parameter {name!r} is over {MAX_PATH_PARAM_CHARS} characters"
            )
        problem = _text_problem(f"path parameter {name!r}", value)
        if problem is not None:
            raise InvalidArgumentError(problem)


def _target_problem(scope: Scope) -> str | None:
    path: str = scope.get("path", "")
    for segment in path.split("/"):
        if len(segment) > MAX_PATH_PARAM_CHARS:
            return f"a path segment is over {MAX_PATH_PARAM_CHARS} characters"
    problem = _text_problem("the path", path)
    if problem is None:
        query = scope.get("query_string", b"").decode("latin-1")
        problem = _text_problem("the query string", unquote(query.replace("+", " ")))
    return problem


def _default_render(path: str, exc: CarraraError) -> Response:
    return error_response(exc)


class InputGuard:
    """ASGI middleware of every Carrara app (``Middleware(InputGuard, render=...)``):

    - 400 for a control character (NUL, newline, ...) in the path or the query string and for a
      path segment over :data:`MAX_PATH_PARAM_CHARS` characters, before any route runs;
    - an exception that escapes a route answers a JSON 500 (``INTERNAL``, logged) rather than
      Starlette's plain-text 500 followed by a dropped connection, so keep-alive goes on.

    ``render`` gives the error body in the app's shape (default: :func:`error_response`)."""

    def __init__(self, app: ASGIApp, render: ErrorRenderer = _default_render) -> None:
        self.app = app
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        problem = _target_problem(scope)
        if problem is not None:
            await self.render(path, InvalidArgumentError(problem))(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            log.exception("unexpected error answering %s %r", scope.get("method"), path)
            error = InternalError("internal error; the server log has the details")
            await self.render(path, error)(scope, receive, send)


# -- one endpoint table: routes, the bearer/role guard, the OpenAPI document ---------------------

#: The content type of every JSON body and response.
JSON = "application/json"
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


class Endpoint(msgspec.Struct, frozen=True):
    """One route of an API: what its OpenAPI document says and the handler that answers it.

    ``path`` is Starlette's, convertors included (``{version_id:int}``); ``response`` and
    ``body`` are msgspec types (``response=None``: no content; ``body=None``: no body);
    ``role``: the bearer token's role a call needs (when the API has an authenticator);
    ``consumes`` / ``produces``: content types of the body / the response (non-JSON ones, such
    as Arrow streams, msgpack or an artifact's bytes, are documented as binary); ``action``
    names the call in 401/403 messages (default: the summary); ``open_if`` exempts requests
    from the role (a dry run); ``errors``: error statuses worth listing besides those every
    body (400, 413) and every role (401, 403) brings."""

    method: Method
    path: str
    summary: str
    response: Any
    handler: Handler
    body: Any = None
    status: int = 200
    role: str | None = None
    query: tuple[str, ...] = ()
    consumes: tuple[str, ...] = (JSON,)
    produces: str = JSON
    action: str = ""
    open_if: Callable[[Request], bool] | None = None
    errors: tuple[int, ...] = ()


def principal_of(request: Request) -> Principal | None:
    """The caller :func:`build_routes` authenticated (None on open routes and open APIs)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal


def _guarded(endpoint: Endpoint, auth: Authenticator | None) -> Handler:
    role, handler, open_if = endpoint.role, endpoint.handler, endpoint.open_if
    if role is None or auth is None:
        return handler
    action = endpoint.action or f"'{endpoint.summary}'"
    resolve = auth

    async def guard(request: Request) -> Response:
        if open_if is None or not open_if(request):
            token = bearer_token(request.headers.get("authorization", ""))
            # The authenticator may look the token up in a database: off the event loop.
            who = None if token is None else await run_in_threadpool(resolve, token)
            request.state.principal = require_role(who, role, action)
        return await handler(request)

    guard.__name__ = handler.__name__
    return guard


def build_routes(endpoints: Sequence[Endpoint], auth: Authenticator | None = None) -> list[Route]:
    """Starlette routes of ``endpoints``, each handler behind :func:`wrap`. With ``auth``, an
    endpoint with a role checks the bearer token before any of the body is read (a caller
    without the role never makes the server read a large body) and leaves the principal on
    ``request.state`` (:func:`principal_of`); without ``auth`` the API is open."""
    return [Route(e.path, wrap(_guarded(e, auth)), methods=[e.method]) for e in endpoints]


_PARAM = re.compile(r"\{(\w+)(?::(\w+))?\}")
_PARAM_TYPES = {"int": "integer", "float": "number"}


def _content(types: Sequence[str], schema: dict[str, Any]) -> dict[str, Any]:
    def of(kind: str) -> dict[str, Any]:
        if kind == JSON or kind.endswith("+json"):
            return schema
        if kind.startswith("text/"):
            return {"type": "string"}
        return {"type": "string", "format": "binary"}

    return {kind: {"schema": of(kind)} for kind in types}


def _parameters(e: Endpoint, path_params: Mapping[str, str]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name, convertor in _PARAM.findall(e.path):
        if name not in path_params:
            raise ValueError(f"path parameter {name!r} of {e.path} has no description")
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": _PARAM_TYPES.get(convertor, "string")},
                "description": path_params[name],
            }
        )
    params += [
        {"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in e.query
    ]
    return params


def openapi_spec(
    title: str, endpoints: Sequence[Endpoint], path_params: Mapping[str, str]
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``endpoints``: schemas from the msgspec types themselves,
    :class:`ErrorBody` as every operation's default response, bearer security (and the role)
    on endpoints with a role. ``path_params`` describes every path parameter by name."""
    types: list[Any] = [ErrorBody]
    for e in endpoints:
        types += [t for t in (e.response, e.body) if t is not None]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        ok: dict[str, Any] = {"description": "No content"}
        if e.response is not None:
            ok = {"description": "OK", "content": _content([e.produces], by_type[e.response])}
        error = {"description": "error", "content": _content([JSON], schemas[0])}
        codes = set(e.errors)
        codes |= {400, 413} if e.body is not None else set()
        codes |= {401, 403} if e.role is not None else set()
        op: dict[str, Any] = {
            "summary": e.summary,
            "parameters": _parameters(e, path_params),
            "responses": {
                str(e.status): ok,
                **{str(code): error for code in sorted(codes)},
                "default": error,
            },
        }
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": _content(e.consumes, by_type[e.body])}
        if e.role is not None:
            op["security"] = [{"bearer": []}]
            op["x-role"] = e.role
            unless = " (not for a dry run)" if e.open_if is not None else ""
            op["description"] = f"Needs a bearer token with role '{e.role}'{unless}."
        paths.setdefault(_PARAM.sub(r"{\1}", e.path), {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def with_document(
    path: str, title: str, endpoints: Sequence[Endpoint], path_params: Mapping[str, str]
) -> list[Endpoint]:
    """``endpoints`` and, at ``path``, their OpenAPI document (which does not list itself)."""
    document = _ENCODER.encode(openapi_spec(title, endpoints, path_params))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type=JSON)

    summary = f"The OpenAPI document of the {title} API"
    return [*endpoints, Endpoint("GET", path, summary, dict[str, Any], openapi)]


_HTTP_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, a method the route does not take) in the common
    shape; ``exception_handlers={HTTPException: http_error}``."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status in _HTTP_CODES:
        message = f"no route {request.method} {request.url.path}; see /openapi.json"
    else:
        message = str(getattr(exc, "detail", "")) or "HTTP error"
    body = _ENCODER.encode(ErrorBody(_HTTP_CODES.get(status, "UNKNOWN"), message))
    headers = getattr(exc, "headers", None)  # 405 names the allowed methods
    return Response(body, status_code=status, headers=headers, media_type=JSON)


def api_app(routes: Sequence[BaseRoute], *, render: ErrorRenderer = _default_render) -> Starlette:
    """A Starlette app of ``routes`` as every Carrara API is: behind :class:`InputGuard` (errors
    rendered by ``render``), with Starlette's own 404/405 in the common shape."""
    return Starlette(
        routes=list(routes),
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(InputGuard, render=render)],
    )
