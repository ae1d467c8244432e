"""The feature HTTP API (Starlette + msgspec): ``POST /features/groups/{group}/get-online``.

Errors are ``carrara.CarraraError`` subclasses mapped to their ``http_status`` by one handler,
with the kernel's JSON body ``{"error": <gRPC code>, "message": ...}`` (every control-plane API
answers this shape). Bodies over :data:`MAX_BODY_BYTES` are refused with 413 while they are
read (chunked ones too). Routes and ``/openapi.json`` come from one table (:func:`endpoints`,
the kernel's HTTP kit).
"""

from __future__ import annotations

import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from carrara.feature_cache.online_store import EmbeddedOnlineStore
from carrara.feature_cache.service import FeatureService, GroupFreshness, float32_rows
from carrara.http import (
    Endpoint,
    ErrorBody,
    Health,
    api_app,
    build_routes,
    decode_json,
    read_body,
    with_document,
)
from carrara.http import json_response as _json

__all__ = [
    "EntityFeatures",
    "ErrorBody",
    "FeatureSummary",
    "GetOnlineRequest",
    "GetOnlineResponse",
    "GroupSummary",
    "create_app",
    "endpoints",
]

#: Request bodies larger than this are refused before parsing.
MAX_BODY_BYTES = 4 << 20
TITLE = "Carrara feature API"
#: Descriptions of the path parameters, for the OpenAPI document.
PATH_PARAMS = {"group": "the feature group's name"}


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


class FeatureSummary(msgspec.Struct):
    """One feature of a group, as its definition declares it."""

    name: str
    dtype: str
    description: str = ""
    owner_team: str = ""


class GroupSummary(msgspec.Struct):
    """A group's latest version, for catalog pages: ``features`` are the names in order,
    ``feature_specs`` the same features with dtype and metadata."""

    name: str
    version: int
    entity: str
    features: list[str]
    ttl_days: float
    online: bool
    offline: bool
    description: str = ""
    owner_team: str = ""
    entity_key: str = ""  # the entity's join key column
    source: str = ""
    transform: str = ""
    aggregated: bool = False
    created_at_us: int = 0  # when this version was applied
    feature_specs: list[FeatureSummary] = []


_request_decoder = msgspec.json.Decoder(GetOnlineRequest)


def create_app(service: FeatureService) -> Starlette:
    """The feature API over ``service``, with ``/openapi.json``."""
    return api_app(
        build_routes(with_document("/openapi.json", TITLE, endpoints(service), PATH_PARAMS))
    )


def endpoints(service: FeatureService) -> list[Endpoint]:
    """The read API's table over ``service``. Reads from the in-process store run on the event
    loop (microseconds); reads from Redis run in the thread pool."""
    inline = isinstance(service.online, EmbeddedOnlineStore)

    async def get_online(request: Request) -> Response:
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
        groups = await run_in_threadpool(service.list_groups)
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
                    description=g.definition.description,
                    owner_team=g.definition.owner_team,
                    entity_key=g.entity.key,
                    source=g.definition.source,
                    transform=g.definition.transform,
                    aggregated=g.definition.is_aggregated,
                    created_at_us=g.created_at_us,
                    feature_specs=[
                        FeatureSummary(f.name, f.dtype, f.description, f.owner_team)
                        for f in g.definition.features
                    ],
                )
                for g in groups
            ]
        )

    async def freshness(request: Request) -> Response:
        return _json(await run_in_threadpool(service.freshness))

    async def healthz(request: Request) -> Response:
        return _json(Health("ok"))

    return [
        Endpoint(
            "POST",
            "/features/groups/{group}/get-online",
            "Current feature values of a batch of entities",
            GetOnlineResponse,
            get_online,
            GetOnlineRequest,
            errors=(404, 503),
        ),
        Endpoint(
            "GET",
            "/features/groups",
            "Feature groups (latest versions)",
            list[GroupSummary],
            list_groups,
        ),
        Endpoint(
            "GET",
            "/features/freshness",
            "Online freshness of every group (last write, newest event, age vs TTL)",
            list[GroupFreshness],
            freshness,
            errors=(503,),
        ),
        Endpoint("GET", "/healthz", "Liveness", Health, healthz),
    ]
