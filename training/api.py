"""The training REST API: jobs, their logs, and triggers, as Starlette routes.

``create_app(queue, features, tokens=...)`` returns routes to mount into one Starlette app
next to the registry's (:func:`endpoints` is their table, from the kernel's HTTP kit). Errors
have the registry's shape, ``{"error": <grpc code>, "message": ...}`` with the status of the
``CarraraError``; every handler maps them itself, so the routes behave the same whatever app
they are mounted in. Reads are open; when ``tokens`` is given, writes (submit, cancel, trigger
changes) need ``Authorization: Bearer <token>`` whose principal has the ``publisher`` role,
checked before the body is read. ``GET /training/openapi.json`` serves the OpenAPI document of
these routes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carrara.auth import Authenticator, Principal, authenticator
from carrara.errors import InvalidArgumentError, PermissionDeniedError
from carrara.http import (
    Endpoint,
    ErrorBody,
    build_routes,
    check_int64,
    decode_json,
    principal_of,
    read_body,
    with_document,
)
from carrara.http import json_response as _json

from .queue import STATES, Job, JobQueue, JobState, LogLine
from .spec import JobSpec
from .triggers import Fire, Trigger, TriggerKind, TriggerStore

if TYPE_CHECKING:
    from carrara.feature_cache.service import FeatureService

__all__ = [
    "CreateTriggerRequest",
    "ErrorBody",
    "JobList",
    "JobView",
    "LogLines",
    "SubmitRequest",
    "TriggerList",
    "create_app",
    "endpoints",
]

#: Bodies are specs, not artifacts: anything bigger is a mistake.
MAX_BODY_BYTES = 1 << 20
WRITE_ROLE = "publisher"
TITLE = "Carrara training"
#: Descriptions of the path parameters, for the OpenAPI document.
PATH_PARAMS = {"job_id": "the job's id", "name": "the trigger's name"}


class SubmitRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    spec: JobSpec
    # The job is recorded as the token's subject. A different name here is refused (403)
    # unless the token is an admin's (submitting on someone's behalf); without tokens (an
    # open API) it is recorded as given.
    submitted_by: str = ""


class CreateTriggerRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    kind: TriggerKind
    spec: JobSpec
    schedule: str = ""
    model: str = ""


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """A job as the API shows it (the spec as an object)."""

    job_id: str
    model_name: str
    state: JobState
    spec: JobSpec
    submitted_by: str
    submitted_at_us: int
    started_at_us: int | None
    finished_at_us: int | None
    heartbeat_at_us: int | None
    worker: str | None
    attempts: int
    cancel_requested: bool
    error: str
    result: dict[str, Any]
    gpus_requested: int
    node: str | None
    gpus: list[int]
    trigger: str
    gpu_share: float = 0.0
    mig_profile: str = ""
    mig_device: str = ""
    nodes: int = 1

    @classmethod
    def of(cls, job: Job) -> JobView:
        fields = {f: getattr(job, f) for f in cls.__struct_fields__ if f != "spec"}
        return cls(spec=job.spec(), **fields)


class JobList(msgspec.Struct, frozen=True):
    jobs: list[JobView]


class LogLines(msgspec.Struct, frozen=True):
    lines: list[LogLine]


class TriggerList(msgspec.Struct, frozen=True):
    triggers: list[Trigger]


async def _body(request: Request, kind: Any) -> Any:
    """The body as ``kind``: over :data:`MAX_BODY_BYTES` is a 413 while reading (the kernel's
    reader), anything malformed a 400."""
    return decode_json(await read_body(request, MAX_BODY_BYTES), kind)


def _submitter(who: Principal | None, claimed: str) -> str:
    """Who a job is recorded as submitted by: the authenticated subject; a different
    ``submitted_by`` only from an admin (PermissionDeniedError otherwise)."""
    if who is None:  # no tokens configured: nobody to check the claim against
        return claimed
    if not claimed or claimed == who.subject:
        return who.subject
    if who.has("admin"):
        return claimed
    raise PermissionDeniedError(
        f"submitted_by {claimed!r} is not the caller ({who.subject!r}): jobs are recorded as "
        "the token's subject; only an admin may submit on someone else's behalf"
    )


def _int_query(request: Request, name: str, default: int, low: int = 0) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgumentError(f"query parameter {name}={text!r} is not an integer") from None
    if value < low:
        raise InvalidArgumentError(f"query parameter {name} must be >= {low}, got {value}")
    return check_int64(value, f"query parameter {name}")


def create_app(
    queue: JobQueue,
    features: FeatureService | None,
    *,
    tokens: Mapping[str, Principal] | Authenticator | None = None,
) -> list[Route]:
    """Routes over ``queue`` (specs are checked against ``features``' catalog when given);
    ``tokens`` (a table or an authenticator) guards the writes, None leaves them open."""
    return build_routes(
        endpoints(queue, features), None if tokens is None else authenticator(tokens)
    )


def endpoints(queue: JobQueue, features: FeatureService | None) -> list[Endpoint]:
    """The training API's table, ``/training/openapi.json`` included."""
    store = TriggerStore(queue)

    async def submit(request: Request) -> Response:
        who = principal_of(request)
        body: SubmitRequest = await _body(request, SubmitRequest)
        by = _submitter(who, body.submitted_by)
        job = await run_in_threadpool(queue.submit, body.spec, submitted_by=by, features=features)
        return _json(JobView.of(job), 201)

    async def list_jobs(request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state is not None and state not in STATES:
            raise InvalidArgumentError(f"unknown job state {state!r}; known: {', '.join(STATES)}")
        limit = _int_query(request, "limit", 100, low=1)
        trigger = request.query_params.get("trigger")
        jobs = await run_in_threadpool(
            queue.list, state=state, limit=min(limit, 1000), trigger=trigger
        )
        return _json(JobList([JobView.of(j) for j in jobs]))

    async def get_job(request: Request) -> Response:
        job = await run_in_threadpool(queue.get, request.path_params["job_id"])
        return _json(JobView.of(job))

    async def cancel(request: Request) -> Response:
        job = await run_in_threadpool(queue.cancel, request.path_params["job_id"])
        return _json(JobView.of(job))

    async def logs(request: Request) -> Response:
        after = _int_query(request, "after", 0)
        lines = await run_in_threadpool(queue.logs, request.path_params["job_id"], after)
        return _json(LogLines(lines))

    async def create_trigger(request: Request) -> Response:
        who = principal_of(request)
        body: CreateTriggerRequest = await _body(request, CreateTriggerRequest)
        trigger = await run_in_threadpool(
            store.add,
            body.name,
            body.kind,
            body.spec,
            schedule=body.schedule,
            model=body.model,
            created_by=who.subject if who else "",
            features=features,
        )
        return _json(trigger, 201)

    async def list_triggers(request: Request) -> Response:
        return _json(TriggerList(await run_in_threadpool(store.list)))

    async def remove_trigger(request: Request) -> Response:
        return _json(await run_in_threadpool(store.remove, request.path_params["name"]))

    async def run_trigger(request: Request) -> Response:
        fire = await run_in_threadpool(
            store.fire, request.path_params["name"], reason="manual (API)", features=features
        )
        return _json(fire, 201 if fire.outcome == "submitted" else 200)

    jobs, one = "/training-jobs", "/training-jobs/{job_id}"
    trig = "/training-triggers"
    w = WRITE_ROLE
    table = [
        Endpoint(
            "POST",
            jobs,
            "Submit a training job",
            JobView,
            submit,
            SubmitRequest,
            201,
            w,
            action="submitting a training job",
        ),
        Endpoint(
            "GET",
            jobs,
            "List jobs, newest first",
            JobList,
            list_jobs,
            query=("state", "limit", "trigger"),
        ),
        Endpoint("GET", one, "Show a job", JobView, get_job),
        Endpoint(
            "POST",
            one + "/cancel",
            "Cancel a job (a running one stops at its next heartbeat)",
            JobView,
            cancel,
            role=w,
            action="cancelling a training job",
        ),
        Endpoint(
            "GET",
            one + "/logs",
            "A job's log lines after seq 'after'",
            LogLines,
            logs,
            query=("after",),
        ),
        Endpoint(
            "POST",
            trig,
            "Create a trigger",
            Trigger,
            create_trigger,
            CreateTriggerRequest,
            201,
            w,
            action="creating a training trigger",
        ),
        Endpoint("GET", trig, "List triggers", TriggerList, list_triggers),
        Endpoint(
            "DELETE",
            trig + "/{name}",
            "Remove a trigger",
            Trigger,
            remove_trigger,
            role=w,
            action="removing a training trigger",
        ),
        Endpoint(
            "POST",
            trig + "/{name}/run",
            "Fire a trigger now (deferred while a run is active)",
            Fire,
            run_trigger,
            role=w,
            action="running a training trigger",
        ),
    ]
    return with_document("/training/openapi.json", TITLE, table, PATH_PARAMS)
