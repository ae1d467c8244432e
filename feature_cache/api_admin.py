# mypy: disable-error-code="import-untyped"
"""The feature platform's write and batch endpoints (what ``carrara.Client.features`` needs
beyond the read API of ``api.py``), as Starlette routes mounted by ``carrara up``.

- ``POST /features/apply?dry_run=`` — ``Definitions`` JSON → list of ``Change``
- ``GET  /features/groups/{group}/definition?version=`` — the ``RegisteredGroup``
- ``POST /features/groups/{group}/ingest?version=`` and ``.../write-offline`` — rows as an
  Arrow IPC stream (``application/vnd.apache.arrow.stream``) or a JSON list of objects
- ``POST /features/groups/{group}/compact?version=`` — ``CompactionResult``
- ``POST /features/groups/{group}/publish`` — JSON rows to the ``feature-updates`` topic
- ``POST /features/materialize`` — ``{"group", "full", "overlap_s"}`` → ``MaterializeResult``s
- ``POST /features/training-set`` — entity rows (Arrow IPC, base64 in JSON) → the joined table
  (Arrow IPC, base64), its snapshot reference and spec

Errors answer ``{"error": <grpc code>, "message": ...}`` (the registry's shape). Writes need a
bearer token from ``tokens`` whose principal has role ``publisher``; ``tokens=None`` leaves
them open (a single-user setup). Routes, their OpenAPI entries and the token guard come from
one table (:func:`endpoints`, the kernel's HTTP kit). The token is checked before the body is
read; bodies over :data:`MAX_BODY_BYTES` (rows, training sets) or :data:`MAX_SPEC_BYTES`
(definitions, a materialize request) are refused with 413 while they are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carrara.auth import Authenticator, Principal, authenticator
from carrara.errors import InvalidArgumentError, PayloadTooLargeError
from carrara.feature_cache.catalog import Change, RegisteredGroup
from carrara.feature_cache.definitions import Definitions
from carrara.feature_cache.materialize import MaterializeResult
from carrara.feature_cache.offline_store import CompactionResult
from carrara.feature_cache.service import FeatureService
from carrara.http import JSON, Endpoint, build_routes, check_int64, decode_json, read_body
from carrara.http import json_response as _json

__all__ = [
    "ARROW_STREAM",
    "MaterializeRequest",
    "PublishedIds",
    "RowsWritten",
    "PayloadTooLargeError",
    "TrainingSetRequest",
    "TrainingSetResponse",
    "arrow_from_ipc",
    "arrow_to_ipc",
    "create_routes",
    "endpoints",
]

ARROW_STREAM = "application/vnd.apache.arrow.stream"
MAX_BODY_BYTES = 512 << 20
#: Definitions and materialize requests are specs: anything bigger is a mistake (and a dry-run
#: apply is open to callers without a token).
MAX_SPEC_BYTES = 16 << 20
WRITE_ROLE = "publisher"
#: Descriptions of the path parameters, for the OpenAPI document.
PATH_PARAMS = {"group": "the feature group's name"}


#: Longest materialization overlap accepted (a year; more overflows the microsecond clock).
_MAX_OVERLAP_S = 365 * 86_400.0


class MaterializeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    group: str | None = None  # None: every online+offline group
    full: bool = False
    overlap_s: float = 60.0


class TrainingSetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    entity_df: bytes  # Arrow IPC stream
    features: list[str]
    timestamp_column: str = "event_timestamp"
    versions: dict[str, int] | None = None


class TrainingSetResponse(msgspec.Struct, frozen=True):
    table: bytes  # Arrow IPC stream
    snapshot_ref: str
    spec: dict[str, Any]


class RowsWritten(msgspec.Struct, frozen=True):
    """How many rows a write stored."""

    rows: int


class PublishedIds(msgspec.Struct, frozen=True):
    """The event ids of published rows."""

    ids: list[str]


def arrow_to_ipc(table: Any) -> bytes:
    """An Arrow table as an IPC stream."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def arrow_from_ipc(data: bytes) -> Any:
    """The Arrow table of an IPC stream (InvalidArgumentError if it is not one)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidArgumentError(f"body is not an Arrow IPC stream: {exc}") from exc


def _version(request: Request) -> int | None:
    raw = request.query_params.get("version")
    if not raw:
        return None
    try:
        version = int(raw)
    except ValueError as exc:
        raise InvalidArgumentError(f"version must be an integer, got {raw!r}") from exc
    return check_int64(version, "version")


async def _body(request: Request, *, spec: bool = False) -> bytes:
    limit = MAX_SPEC_BYTES if spec else MAX_BODY_BYTES
    return await read_body(request, limit, hint="send it in parts")


def _decode(raw: bytes, kind: Any, what: str) -> Any:
    if not raw.strip():
        raise InvalidArgumentError(f"{what} needs a JSON body")
    return decode_json(raw, kind, what=f"{what} body")


async def _convert(group: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)`` in the thread pool, with rows that Arrow cannot convert (a list
    where a number goes, an integer past int64) answered 400 rather than 500."""
    import pyarrow as pa

    try:
        return await run_in_threadpool(fn, *args, **kw)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"rows for feature group {group!r} do not convert to its columns: {exc}"
        ) from None


async def _rows(request: Request) -> Any:
    """Rows of an ingest body: an Arrow table, or a list of dicts (JSON)."""
    raw = await _body(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind == ARROW_STREAM:
        return arrow_from_ipc(raw)
    rows = _decode(raw, list[dict[str, Any]], "rows")
    if not rows:
        raise InvalidArgumentError("no rows in the body")
    return rows


def create_routes(
    service: FeatureService, *, tokens: Mapping[str, Principal] | Authenticator | None = None
) -> list[Route]:
    """The write/batch routes over ``service`` (mount beside ``api.create_app``'s routes);
    ``tokens`` (a table or an authenticator) guards the writes, None leaves them open."""
    return build_routes(endpoints(service), None if tokens is None else authenticator(tokens))


def _dry_run(request: Request) -> bool:
    return request.query_params.get("dry_run", "").lower() in ("1", "true", "yes")


def endpoints(service: FeatureService) -> list[Endpoint]:
    """The feature admin API's table over ``service``."""

    async def apply(request: Request) -> Response:
        dry_run = _dry_run(request)
        raw = await _body(request, spec=True)
        definitions = _decode(raw, Definitions, "definitions")
        changes: list[Change] = await run_in_threadpool(service.apply, definitions, dry_run=dry_run)
        return _json(changes)

    async def definition(request: Request) -> Response:
        group = await run_in_threadpool(
            service.group, request.path_params["group"], _version(request)
        )
        return _json(group)

    async def ingest(request: Request) -> Response:
        rows = await _rows(request)
        group = request.path_params["group"]
        n = await _convert(group, service.ingest, group, rows, version=_version(request))
        return _json(RowsWritten(n))

    async def write_offline(request: Request) -> Response:
        rows = await _rows(request)
        group = request.path_params["group"]
        if isinstance(rows, list):
            import pyarrow as pa

            rows = await _convert(group, pa.Table.from_pylist, rows)
        n = await _convert(group, service.write_offline, group, rows, version=_version(request))
        return _json(RowsWritten(n))

    async def compact(request: Request) -> Response:
        result = await run_in_threadpool(
            service.compact, request.path_params["group"], version=_version(request)
        )
        return _json(result)

    async def publish(request: Request) -> Response:
        rows = await _rows(request)
        if not isinstance(rows, list):
            rows = rows.to_pylist()
        group = request.path_params["group"]
        ids = await _convert(group, service.publish, group, rows)
        return _json(PublishedIds(ids))

    async def materialize(request: Request) -> Response:
        raw = await _body(request, spec=True)
        body = (
            _decode(raw, MaterializeRequest, "materialize") if raw.strip() else MaterializeRequest()
        )
        if not math.isfinite(body.overlap_s) or abs(body.overlap_s) > _MAX_OVERLAP_S:
            raise InvalidArgumentError(
                f"overlap_s must be a finite number of seconds up to {_MAX_OVERLAP_S:g}, "
                f"got {body.overlap_s!r}"
            )
        results = await run_in_threadpool(
            service.materialize, body.group, full=body.full, overlap_s=body.overlap_s
        )
        return _json(results)

    async def training_set(request: Request) -> Response:
        body: TrainingSetRequest = _decode(await _body(request), TrainingSetRequest, "training-set")
        entity_df = arrow_from_ipc(body.entity_df)

        def build() -> TrainingSetResponse:
            result = service.get_training_set(
                entity_df,
                body.features,
                timestamp_column=body.timestamp_column,
                versions=body.versions,
            )
            return TrainingSetResponse(
                arrow_to_ipc(result.to_arrow()), result.snapshot_ref, result.spec
            )

        return _json(await run_in_threadpool(build))

    g = "/features/groups/{group}"
    rows = (JSON, ARROW_STREAM)
    w = WRITE_ROLE
    return [
        Endpoint(
            "POST",
            "/features/apply",
            "Apply feature definitions (a dry run only plans)",
            list[Change],
            apply,
            Definitions,
            role=w,
            query=("dry_run",),
            action="applying feature definitions",
            open_if=_dry_run,
        ),
        Endpoint(
            "GET",
            g + "/definition",
            "A feature group's registered definition",
            RegisteredGroup,
            definition,
            query=("version",),
            errors=(404,),
        ),
        Endpoint(
            "POST",
            g + "/ingest",
            "Ingest rows (offline and online)",
            RowsWritten,
            ingest,
            list[dict[str, Any]],
            role=w,
            query=("version",),
            consumes=rows,
            action="ingesting feature rows",
        ),
        Endpoint(
            "POST",
            g + "/write-offline",
            "Write rows to the offline store only",
            RowsWritten,
            write_offline,
            list[dict[str, Any]],
            role=w,
            query=("version",),
            consumes=rows,
            action="writing feature rows",
        ),
        Endpoint(
            "POST",
            g + "/compact",
            "Compact the offline store of a group",
            CompactionResult,
            compact,
            role=w,
            query=("version",),
            action="compacting the offline store",
        ),
        Endpoint(
            "POST",
            g + "/publish",
            "Publish rows to the feature-updates topic",
            PublishedIds,
            publish,
            list[dict[str, Any]],
            role=w,
            consumes=rows,
            action="publishing feature updates",
        ),
        Endpoint(
            "POST",
            "/features/materialize",
            "Materialize offline rows into the online store",
            list[MaterializeResult],
            materialize,
            MaterializeRequest,
            role=w,
            action="materializing feature groups",
        ),
        Endpoint(
            "POST",
            "/features/training-set",
            "A point-in-time training set (Arrow IPC, base64)",
            TrainingSetResponse,
            training_set,
            TrainingSetRequest,
            role=w,
            action="building a training set",
        ),
    ]
