"""HTTP front: ``POST /predict/{model}``, ``/healthz``, ``/readyz``, ``/metrics``.

Bodies are msgspec structs (JSON); errors answer with the status of their ``CarraraError`` class
and ``{"error": CODE, "message"}`` like every Carrara API (the KServe routes under ``/v2``
answer Triton's ``{"error": "message"}``). Input is bounded as in every Carrara API
(``carrara.http``): a body over :data:`MAX_BODY_BYTES` is refused with 413 while it is read,
chunked or not; malformed or too deeply nested JSON and control characters in the path are 400.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carrara.errors import CarraraError
from carrara.gateway.auth import BearerAuthMiddleware
from carrara.gateway.kserve_http import kserve_error, kserve_routes
from carrara.gateway.service import Gateway
from carrara.http import InputGuard, check_path_params, decode_json, error_response, read_body

__all__ = ["HttpPrediction", "HttpPredictRequest", "HttpPredictResponse", "create_app"]

MAX_BODY_BYTES = 4 << 20


class HttpPredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    entity_ids: list[str]
    overrides: dict[str, float | list[float]] | None = None
    request_id: str | None = None


class HttpPrediction(msgspec.Struct):
    entity_id: str
    values: list[float]
    variant: str
    model_version: int
    degraded: bool


class HttpPredictResponse(msgspec.Struct):
    model: str
    request_id: str
    predictions: list[HttpPrediction]
    latency_us: int
    degraded: bool


_decoder = msgspec.json.Decoder(HttpPredictRequest)
_encoder = msgspec.json.Encoder()


def _error(exc: CarraraError) -> Response:
    return error_response(exc)  # the shape every Carrara API answers with


def _render(path: str, exc: CarraraError) -> Response:
    """An error from the input guard in the shape of the route family ``path`` is in."""
    return kserve_error(exc) if path == "/v2" or path.startswith("/v2/") else _error(exc)


def create_app(gateway: Gateway, *, auth_tokens: Sequence[str] = ()) -> Starlette:
    """The HTTP front. With ``auth_tokens``, every route but ``auth.OPEN_PATHS`` (health,
    readiness, metrics) answers 401 unless the request carries ``Authorization: Bearer <t>``
    for one of them (``carrara.gateway.auth``)."""

    async def predict(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            check_path_params(request.path_params)
            raw = await read_body(request, MAX_BODY_BYTES)
            body: HttpPredictRequest = decode_json(raw, _decoder, what="predict request")
            result = await gateway.predict(model, body.entity_ids, body.overrides, body.request_id)
        except CarraraError as exc:
            return _error(exc)
        outputs = result.outputs.tolist()
        response = HttpPredictResponse(
            model=result.model,
            request_id=result.request_id,
            predictions=[
                HttpPrediction(
                    e, outputs[i], result.variants[i], result.versions[i], result.degraded[i]
                )
                for i, e in enumerate(result.entity_ids)
            ],
            latency_us=result.latency_us,
            degraded=any(result.degraded),
        )
        return Response(_encoder.encode(response), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, body = gateway.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/predict/{model}", predict, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *kserve_routes(gateway),
        ],
        middleware=[
            Middleware(InputGuard, render=_render),
            *([Middleware(BearerAuthMiddleware, tokens=auth_tokens)] if auth_tokens else []),
        ],
    )
