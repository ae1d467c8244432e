"""The feature HTTP API (Starlette + msgspec): ``POST /features/groups/{group}/get-online``.

Errors are ``carrara.CarraraError`` subclasses mapped to their ``http_status`` by one handler,
with the kernel's JSON body ``{"error": <gRPC code>, "message": ...}`` (every control-plane API
answers this shape). Bodies over :data:`MAX_BODY_BYTES` are refused with 413 while they are
read (chunked ones too).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carrara.errors import CarraraError
from carrara.feature_cache.online_store import EmbeddedOnlineStore
from carrara.feature_cache.service import FeatureService, float32_rows
from carrara.http import ErrorBody, InputGuard, check_path_params, decode_json, read_body
from carrara.http import error_response as _error

__all__ = [
    "EntityFeatures",
    "ErrorBody",
    "GetOnlineRequest",
    "GetOnlineResponse",
    "create_app",
]

#: Request bodies larger than this are refused before parsing.
MAX_BODY_BYTES = 4 << 20


class GetOnlineRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Entities to read, and optionally which features (default: all) of which version
    (default: the latest)."""

    entity_ids: list[str]
    features: list[str] | None = None
    version: int | None = None
    require_found: bool = False  # true: an unknown entity id is a 404 instead of found=false


class EntityFeatures(msgspec.Struct, omit_defaults=True):
    """One entity: ``values`` in the response's feature order, ``null`` where missing."""

    entity_id: str
    found: bool
    values: list[float | None]
    missing: list[str] = []


class GetOnlineResponse(msgspec.Struct):
    group: str
    version: int
    features: list[str]
    results: list[EntityFeatures]


class GroupSummary(msgspec.Struct):
    name: str
    version: int
    entity: str
    features: list[str]
    ttl_days: float
    online: bool
    offline: bool


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(GetOnlineRequest)


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def _openapi() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [GetOnlineRequest, GetOnlineResponse, ErrorBody, list[GroupSummary]],
        ref_template="#/components/schemas/{name}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def errors(*codes: int) -> dict[str, Any]:
        return {
            str(c): {
                "description": "error",
                "content": {"application/json": {"schema": ref("ErrorBody")}},
            }
            for c in codes
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "Carrara feature API", "version": "1"},
        "paths": {
            "/features/groups/{group}/get-online": {
                "post": {
                    "summary": "Current feature values of a batch of entities",
                    "parameters": [
                        {
                            "name": "group",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("GetOnlineRequest")}},
                    },
                    "responses": {
                        "200": {
                            "description": "values per entity",
                            "content": {"application/json": {"schema": ref("GetOnlineResponse")}},
                        },
                        **errors(400, 404, 413, 503),
                    },
                }
            },
            "/features/groups": {
                "get": {
                    "summary": "Feature groups (latest versions)",
                    "responses": {
                        "200": {
                            "description": "groups",
                            "content": {
                                "application/json": {
                                    "schema": {"type": "array", "items": ref("GroupSummary")}
                                }
                            },
                        }
                    },
                }
            },
            "/healthz": {
                "get": {"summary": "liveness", "responses": {"200": {"description": "ok"}}}
            },
        },
        "components": {"schemas": components},
    }


def create_app(service: FeatureService) -> Starlette:
    """The feature API over ``service``. Reads from the in-process store run on the event
    loop (microseconds); reads from Redis run in the thread pool."""
    openapi = _encoder.encode(_openapi())
    inline = isinstance(service.online, EmbeddedOnlineStore)

    async def get_online(request: Request) -> Response:
        try:
            check_path_params(request.path_params)
            raw = await read_body(request, MAX_BODY_BYTES, hint="split the batch")
            body: GetOnlineRequest = decode_json(
                raw,
                _request_decoder,
                hint='expected {"entity_ids": ["..."], "features": ["..."] (optional)}',
            )
            group = request.path_params["group"]
            if inline:
                result = service.get_online(
                    group,
                    body.entity_ids,
                    body.features,
                    version=body.version,
                    require_found=body.require_found,
                )
            else:  # a network round trip: keep the event loop free for other requests
                result = await run_in_threadpool(
                    service.get_online,
                    group,
                    body.entity_ids,
                    body.features,
                    version=body.version,
                    require_found=body.require_found,
                )
        except CarraraError as exc:
            return _error(exc)
        # Shortest floats that round-trip float32 (14.2, not 14.199999809265137); None -> null.
        rows = float32_rows(result.values, result.missing)
        names = result.features
        out = []
        for i, (eid, found) in enumerate(
            zip(result.entity_ids, result.found.tolist(), strict=True)
        ):
            miss = result.missing[i]
            out.append(
                EntityFeatures(
                    eid,
                    found,
                    rows[i],
                    [names[j] for j in np.flatnonzero(miss).tolist()]
                    if found and miss.any()
                    else [],
                )
            )
        return _json(GetOnlineResponse(result.group, result.version, names, out))

    async def list_groups(request: Request) -> Response:
        try:
            groups = service.list_groups()
        except CarraraError as exc:
            return _error(exc)
        return _json(
            [
                GroupSummary(
                    g.name,
                    g.version,
                    g.entity.name,
                    list(g.definition.feature_names),
                    g.definition.ttl_days,
                    g.definition.online,
                    g.definition.offline,
                )
                for g in groups
            ]
        )

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    return Starlette(
        routes=[
            Route("/features/groups/{group}/get-online", get_online, methods=["POST"]),
            Route("/features/groups", list_groups, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        middleware=[Middleware(InputGuard)],
    )
