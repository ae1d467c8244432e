"""The monitoring HTTP API (Starlette routes, msgspec bodies), mounted by ``carrara up``.

``GET /monitoring/alerts?model=`` (active alerts, with their acknowledgement),
``POST /monitoring/alerts/acknowledge`` (role ``deployer``; the alert key goes in the body, as
a key may hold any character of a feature name, ``/`` included), the JSON reads of
:mod:`carrara.monitoring.views` (``GET /monitoring/models``, ``GET
/monitoring/models/{model}/drift?version=&limit=``, ``.../distributions?version=``,
``.../performance?version=&limit=``), ``PUT /monitoring/models/{model}/config``
(window, thresholds, margins), ``PUT /monitoring/models/{model}/versions/{version}/reference``
(a reference profile built by the caller with ``build_profile``, msgpack), ``POST
/monitoring/run?flush=`` (consume what is logged, judge windows; returns the alert transitions)
and ``GET /monitoring/models/{model}/report?version=`` (the HTML report). Errors answer as the
registry API does: ``{"error": <grpc code>, "message": ...}`` with the error's HTTP status.
Writes need a bearer token (from ``tokens``) with role ``publisher`` (acknowledging an alert:
``deployer``), checked before the body is read; ``tokens=None`` leaves them open (a
single-user setup). Bodies over :data:`MAX_BODY_BYTES` are refused with 413 while they are
read. Routes, their OpenAPI entries and the token guard come from one table
(:func:`endpoints`, the kernel's HTTP kit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from carrara.auth import Authenticator, Principal, authenticator
from carrara.errors import InvalidArgumentError
from carrara.eventlog import EventLog
from carrara.http import (
    Endpoint,
    build_routes,
    check_int64,
    decode_json,
    decode_msgpack,
    principal_of,
    read_body,
)
from carrara.http import json_response as _json
from carrara.sql import Database
from carrara.types import Topic

from .alerts import ActiveAlert, Alert, acknowledge_alert, firing_alerts
from .config import ModelMonitorConfig
from .consumer import MonitoringConsumer
from .profiles import ReferenceProfile, store_profile
from .store import configure_model
from .views import (
    MAX_WINDOWS,
    DistributionView,
    DriftView,
    ModelList,
    PerformanceView,
    check_window_count,
    distribution_view,
    drift_view,
    model_list,
    performance_view,
)

__all__ = [
    "API_CONSUMER",
    "Acknowledgement",
    "AlertList",
    "MonitorRun",
    "create_routes",
    "endpoints",
]

#: The consumer name the API uses inside the monitoring consumer group (the ``carrara monitor
#: run`` process is another member: each event goes to one of them, and both dedup by request
#: id in the database, so nothing is counted twice).
API_CONSUMER = "api"
#: How long a flushing run waits for events other consumers of the group still hold.
SETTLE_S = 10.0
MAX_BODY_BYTES = 64 << 20
WRITE_ROLE = "publisher"
#: Acknowledging an alert is an operator's call, as deploying is.
ACK_ROLE = "deployer"
MAX_ACK_BODY_BYTES = 64 << 10
MAX_ACK_COMMENT_CHARS = 4_000
MSGPACK = "application/msgpack"
#: Descriptions of the path parameters, for the OpenAPI document.
PATH_PARAMS = {"model": "the model's name", "version": "the model version"}


class AlertList(msgspec.Struct, frozen=True):
    alerts: list[ActiveAlert]


class Acknowledgement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of ``POST /monitoring/alerts/acknowledge``: the alert's key
    (``"<model>:v<version>:<kind>:<subject>"``, as ``GET /monitoring/alerts`` lists it) and why."""

    key: str
    comment: str = ""


def _int_query(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidArgumentError(f"{name} must be an integer, got {raw!r}") from exc
    return check_int64(value, name)


class MonitorRun(msgspec.Struct, frozen=True):
    """What one ``POST /monitoring/run`` did: predictions read and the alert transitions."""

    predictions: int
    windows_judged: int
    alerts: list[Alert]


def create_routes(
    db: Database,
    event_log: EventLog,
    *,
    tokens: Mapping[str, Principal] | Authenticator | None = None,
    group: str = "monitoring",
) -> list[Route]:
    """Routes over the monitoring tables in ``db`` and the prediction log ``event_log``;
    ``tokens`` (a table or an authenticator) guards the writes, None leaves them open."""
    auth = None if tokens is None else authenticator(tokens)
    return build_routes(endpoints(db, event_log, group=group), auth)


def endpoints(db: Database, event_log: EventLog, *, group: str = "monitoring") -> list[Endpoint]:
    """The monitoring API's table (one consumer of ``group`` per table, made on first run)."""
    consumer: MonitoringConsumer | None = None
    lock = threading.Lock()  # one run at a time: the consumer is not thread-safe

    def get_consumer() -> MonitoringConsumer:
        nonlocal consumer
        if consumer is None:
            consumer = MonitoringConsumer(db, event_log, group=group, consumer=API_CONSUMER)
        return consumer

    async def alerts(request: Request) -> Response:
        model = request.query_params.get("model") or None
        found = await run_in_threadpool(firing_alerts, db, model)
        return _json(AlertList(found))

    async def configure(request: Request) -> Response:
        model = request.path_params["model"]
        raw = await read_body(request, MAX_BODY_BYTES)
        config = decode_json(raw, ModelMonitorConfig, what="monitoring config")
        await run_in_threadpool(configure_model, db, model, config)
        return _json(config)

    async def reference(request: Request) -> Response:
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

    async def models(request: Request) -> Response:
        return _json(await run_in_threadpool(model_list, db))

    def window_count(request: Request) -> int:
        last = _int_query(request, "limit")
        return MAX_WINDOWS if last is None else check_window_count(last)

    async def drift(request: Request) -> Response:
        model, version = request.path_params["model"], _int_query(request, "version")
        last = window_count(request)
        return _json(await run_in_threadpool(drift_view, db, model, version, last=last))

    async def distributions(request: Request) -> Response:
        model, version = request.path_params["model"], _int_query(request, "version")
        return _json(await run_in_threadpool(distribution_view, db, model, version))

    async def performance(request: Request) -> Response:
        model, version = request.path_params["model"], _int_query(request, "version")
        last = window_count(request)
        return _json(await run_in_threadpool(performance_view, db, model, version, last=last))

    async def acknowledge(request: Request) -> Response:
        raw = await read_body(request, MAX_ACK_BODY_BYTES)
        body = decode_json(
            raw, Acknowledgement, what="acknowledgement", hint='send {"key": ..., "comment": ...}'
        )
        if len(body.comment) > MAX_ACK_COMMENT_CHARS:
            raise InvalidArgumentError(
                f"comment is {len(body.comment)} characters; at most {MAX_ACK_COMMENT_CHARS}"
            )
        who = principal_of(request)
        by = who.subject if who is not None else "anonymous"
        return _json(await run_in_threadpool(acknowledge_alert, db, body.key, by, body.comment))

    async def run(request: Request) -> Response:
        flush = request.query_params.get("flush", "true").lower() not in ("0", "false", "no")

        def work() -> MonitorRun:
            with lock:
                c = get_consumer()
                result = c.run(stop_when_idle=True, block_ms=0)
                found = list(result.alerts)
                judged = result.windows_judged
                new = result.predictions_new
                if flush:
                    # Other consumers of the group (`carrara monitor run` next to this API)
                    # may hold delivered events they have not folded into the windows yet:
                    # wait for them (bounded), so the windows judged now hold every event
                    # logged before this call, whichever consumer read it.
                    deadline = time.monotonic() + SETTLE_S
                    while time.monotonic() < deadline and any(
                        event_log.pending_count(t, group) for t in (Topic.PREDICTIONS, Topic.LABELS)
                    ):
                        time.sleep(0.05)
                        more = c.run(stop_when_idle=True, block_ms=0)
                        found.extend(more.alerts)
                        judged += more.windows_judged
                        new += more.predictions_new
                    found.extend(c.judge(flush=True))
                return MonitorRun(new, judged, found)

        return _json(await run_in_threadpool(work))

    async def report(request: Request) -> Response:
        from .report import render_report

        model, version = request.path_params["model"], _int_query(request, "version")
        html = await run_in_threadpool(render_report, db, model, version)
        return HTMLResponse(html)

    m = "/monitoring/models/{model}"
    w = WRITE_ROLE
    return [
        Endpoint("GET", "/monitoring/alerts", "Active alerts", AlertList, alerts, query=("model",)),
        Endpoint(
            "POST",
            "/monitoring/alerts/acknowledge",
            "Acknowledge a firing alert",
            ActiveAlert,
            acknowledge,
            Acknowledgement,
            role=ACK_ROLE,
            action="acknowledging an alert",
            errors=(404, 409),
        ),
        Endpoint(
            "GET",
            "/monitoring/models",
            "Monitored models, their versions and alerts",
            ModelList,
            models,
        ),
        Endpoint(
            "GET",
            m + "/drift",
            "Drift (PSI, KS, JS and status) per feature of the newest judged windows",
            DriftView,
            drift,
            query=("version", "limit"),
            errors=(404,),
        ),
        Endpoint(
            "GET",
            m + "/distributions",
            "Reference vs current distributions in the latest judged window",
            DistributionView,
            distributions,
            query=("version",),
            errors=(404,),
        ),
        Endpoint(
            "GET",
            m + "/performance",
            "Performance metrics per window (delayed labels) with their baselines",
            PerformanceView,
            performance,
            query=("version", "limit"),
            errors=(404,),
        ),
        Endpoint(
            "PUT",
            m + "/config",
            "Configure monitoring of a model",
            ModelMonitorConfig,
            configure,
            ModelMonitorConfig,
            role=w,
            action="configuring monitoring",
        ),
        Endpoint(
            "PUT",
            m + "/versions/{version:int}/reference",
            "Store a reference profile (build_profile(...) as msgpack)",
            None,
            reference,
            ReferenceProfile,
            204,
            w,
            consumes=(MSGPACK,),
            action="storing a reference profile",
        ),
        Endpoint(
            "POST",
            "/monitoring/run",
            "Consume logged predictions and judge windows",
            MonitorRun,
            run,
            role=w,
            query=("flush",),
            action="running the monitoring consumer",
        ),
        Endpoint(
            "GET",
            m + "/report",
            "The HTML monitoring report",
            str,
            report,
            query=("version",),
            produces="text/html",
        ),
    ]
