"""HTTP front: ``POST /predict/{model}``, ``/healthz``, ``/readyz``, ``/metrics``.

Bodies are msgspec structs (JSON); errors answer with the status of their ``CarraraError`` class
and ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carrara.errors import CarraraError, InvalidArgumentError
from carrara.gateway.kserve_http import kserve_routes
from carrara.gateway.service import Gateway

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
    body = {"error": {"code": exc.grpc_code, "message": str(exc)}}
    return Response(
        _encoder.encode(body), status_code=exc.http_status, media_type="application/json"
    )


def create_app(gateway: Gateway) -> Starlette:
    async def predict(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise InvalidArgumentError(f"request body over {MAX_BODY_BYTES} bytes")
            try:
                body = _decoder.decode(raw)
            except msgspec.DecodeError as exc:
                raise InvalidArgumentError(f"invalid predict request: {exc}") from exc
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
        ready = gateway.ready
        return JSONResponse(
            {"ready": ready, "models": gateway.engine.models(), "draining": gateway.draining},
            status_code=200 if ready else 503,
        )

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/predict/{model}", predict, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *kserve_routes(gateway),
        ]
    )
