"""The monitoring HTTP API (Starlette routes, msgspec bodies), mounted by ``carrara up``.

``GET /monitoring/alerts?model=`` (active alerts), ``PUT /monitoring/models/{model}/config``
(window, thresholds, margins), ``PUT /monitoring/models/{model}/versions/{version}/reference``
(a reference profile built by the caller with ``build_profile``, msgpack), ``POST
/monitoring/run?flush=`` (consume what is logged, judge windows; returns the alert transitions)
and ``GET /monitoring/models/{model}/report?version=`` (the HTML report). Errors answer as the
registry API does: ``{"error": <grpc code>, "message": ...}`` with the error's HTTP status.
Writes need a bearer token (from ``tokens``) with role ``publisher``, checked before the body
is read; ``tokens=None`` leaves them open (a single-user setup). Bodies over
:data:`MAX_BODY_BYTES` are refused with 413 while they are read.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from carrara.errors import InvalidArgumentError
from carrara.eventlog import EventLog
from carrara.http import authorize, check_int64, decode_json, decode_msgpack, read_body, wrap
from carrara.http import json_response as _json
from carrara.registry.auth import Principal
from carrara.sql import Database

from .alerts import Alert, active_alerts
from .config import ModelMonitorConfig
from .consumer import MonitoringConsumer
from .profiles import ReferenceProfile, store_profile
from .store import configure_model

__all__ = [
    "API_CONSUMER",
    "AlertList",
    "MonitorRun",
    "create_routes",
]

#: The consumer name the API uses inside the monitoring consumer group (the ``carrara monitor
#: run`` process is another member: each event goes to one of them, and both dedup by request
#: id in the database, so nothing is counted twice).
API_CONSUMER = "api"
MAX_BODY_BYTES = 64 << 20


class AlertList(msgspec.Struct, frozen=True):
    alerts: list[Alert]


class MonitorRun(msgspec.Struct, frozen=True):
    """What one ``POST /monitoring/run`` did: predictions read and the alert transitions."""

    predictions: int
    windows_judged: int
    alerts: list[Alert]


def create_routes(
    db: Database,
    event_log: EventLog,
    *,
    tokens: Mapping[str, Principal] | None = None,
    group: str = "monitoring",
) -> list[Route]:
    """Routes over the monitoring tables in ``db`` and the prediction log ``event_log``."""
    consumer: MonitoringConsumer | None = None
    lock = threading.Lock()  # one run at a time: the consumer is not thread-safe

    def get_consumer() -> MonitoringConsumer:
        nonlocal consumer
        if consumer is None:
            consumer = MonitoringConsumer(db, event_log, group=group, consumer=API_CONSUMER)
        return consumer

    async def alerts(request: Request) -> Response:
        model = request.query_params.get("model") or None
        found = await run_in_threadpool(active_alerts, db, model)
        return _json(AlertList(found))

    async def configure(request: Request) -> Response:
        authorize(request, tokens, "publisher", "configuring monitoring")
        model = request.path_params["model"]
        raw = await read_body(request, MAX_BODY_BYTES)
        config = decode_json(raw, ModelMonitorConfig, what="monitoring config")
        await run_in_threadpool(configure_model, db, model, config)
        return _json(config)

    async def reference(request: Request) -> Response:
        authorize(request, tokens, "publisher", "storing a reference profile")
        model, version = request.path_params["model"], request.path_params["version"]
        profile: ReferenceProfile = decode_msgpack(
            await read_body(request, MAX_BODY_BYTES),
            ReferenceProfile,
            what="reference profile",
            hint="send build_profile(...) as msgpack",
        )
        if (profile.model, profile.version) != (model, version):
            raise InvalidArgumentError(
                f"the profile is of {profile.model} v{profile.version} but the path names "
                f"{model} v{version}"
            )
        await run_in_threadpool(store_profile, db, profile)
        return Response(status_code=204)

    async def run(request: Request) -> Response:
        authorize(request, tokens, "publisher", "running the monitoring consumer")
        flush = request.query_params.get("flush", "true").lower() not in ("0", "false", "no")

        def work() -> MonitorRun:
            with lock:
                c = get_consumer()
                result = c.run(stop_when_idle=True, block_ms=0)
                found = list(result.alerts)
                judged = result.windows_judged
                if flush:
                    found.extend(c.judge(flush=True))
                return MonitorRun(result.predictions_new, judged, found)

        return _json(await run_in_threadpool(work))

    async def report(request: Request) -> Response:
        from .report import render_report

        model = request.path_params["model"]
        raw = request.query_params.get("version")
        try:
            version = int(raw) if raw else None
        except ValueError as exc:
            raise InvalidArgumentError(f"version must be an integer, got {raw!r}") from exc
        if version is not None:
            check_int64(version, "version")
        html = await run_in_threadpool(render_report, db, model, version)
        return HTMLResponse(html)

    m = "/monitoring/models/{model}"
    return [
        Route("/monitoring/alerts", wrap(alerts), methods=["GET"]),
        Route(m + "/config", wrap(configure), methods=["PUT"]),
        Route(m + "/versions/{version:int}/reference", wrap(reference), methods=["PUT"]),
        Route("/monitoring/run", wrap(run), methods=["POST"]),
        Route(m + "/report", wrap(report), methods=["GET"]),
    ]
