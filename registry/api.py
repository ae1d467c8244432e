"""The registry's REST API: Starlette routes with msgspec bodies and a generated OpenAPI spec.

Path parameters name things the way users do: ``{model_id}`` is the model's name and
``{version_id}`` its version number. Reads are open; writes need ``Authorization: Bearer``
with the role the registry asks for. Every ``CarraraError`` maps to its HTTP status in one
handler, as ``{"error": <grpc code>, "message": ...}``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carrara.errors import (
    InvalidArgumentError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthenticatedError,
    UnavailableError,
)
from carrara.http import ErrorBody, Handler, InputGuard, decode_json, read_body, wrap
from carrara.http import json_response as _json
from carrara.registry.auth import Principal, require_role
from carrara.registry.registry import ModelRegistry
from carrara.registry.types import (
    Approval,
    AuditEntry,
    Deployment,
    DeployRequest,
    Gate,
    GateResult,
    Lineage,
    Model,
    ModelVersion,
    PromotionResult,
    Signature,
)

__all__ = [
    "ApproveRequest",
    "CreateModelRequest",
    "ErrorBody",
    "EvaluationRequest",
    "PayloadTooLargeError",
    "RegisterRequest",
    "UpdateModelRequest",
    "create_app",
]


class CreateModelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Create a model and its promotion policy."""

    name: str
    framework: str = ""
    description: str = ""
    high_stakes: bool = False
    gates: list[Gate] = []


class UpdateModelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Change a model's promotion policy; absent fields stay as they are."""

    description: str | None = None
    high_stakes: bool | None = None
    gates: list[Gate] | None = None


class RegisterRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Register a version; artifacts travel base64-encoded in the JSON body."""

    framework: str
    serving_artifact: bytes | None = None
    native_artifact: bytes | None = None
    native_format: str = ""
    framework_version: str = ""
    metrics: dict[str, float] = {}
    evaluations: dict[str, dict[str, float]] = {}
    feature_store_version: list[str] = []
    training_dataset_ref: str = ""
    signature: Signature | None = None
    run_id: str = ""
    tags: dict[str, str] = {}
    serving_spec: dict[str, Any] = {}


class EvaluationRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Metrics of a version on a named evaluation dataset."""

    dataset: str
    metrics: dict[str, float]


class ApproveRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    comment: str = ""


class Health(msgspec.Struct, frozen=True):
    status: str


Method = Literal["GET", "POST", "PATCH"]


class _Endpoint(msgspec.Struct, frozen=True):
    method: Method
    path: str
    summary: str
    response: Any
    body: Any = None
    status: int = 200
    role: str | None = None
    query: tuple[str, ...] = ()


async def _body(request: Request, kind: Any, *, optional: bool = False) -> Any:
    """The body as ``kind``: over the app's ``max_body_bytes`` is a 413 while reading (the
    kernel's :func:`~carrara.http.read_body`), anything malformed a 400."""
    raw = await read_body(
        request,
        request.app.state.max_body_bytes,
        hint="register large artifacts through the SDK against the artifact store directly",
    )
    return decode_json(raw, kind, optional=optional)


def create_app(
    registry: ModelRegistry,
    *,
    bootstrap_token: str | None = None,
    max_body_bytes: int = 512 << 20,
) -> Starlette:
    """The REST app over ``registry``; ``bootstrap_token`` (e.g. ``Settings.api_token``) is
    accepted as an admin token so the first real tokens can be created remotely. Bodies over
    ``max_body_bytes`` (artifacts travel base64 inside) are refused with 413."""

    def principal(request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("the Authorization header must be 'Bearer <token>'")
        token = token.strip()
        if bootstrap_token and hmac.compare_digest(token.encode(), bootstrap_token.encode()):
            return Principal("bootstrap", frozenset({"admin"}))
        return registry.tokens.authenticate(token)

    def model_of(request: Request) -> str:
        name: str = request.path_params["model_id"]
        return name

    def version_of(request: Request) -> int:
        version: int = request.path_params["version_id"]
        return version

    def actor(request: Request) -> Any:
        # Authenticated before the body was read (``authenticated``); the registry checks the
        # role again and raises 401 for None, 403 for a missing role.
        if hasattr(request.state, "principal"):
            return request.state.principal
        return principal(request)

    def authenticated(role: str, summary: str, handler: Handler) -> Handler:
        """``handler`` behind a token check that runs before any of the body is read, so a
        caller without a token with ``role`` never makes the server read a large body."""

        async def check(request: Request) -> Response:
            who = await call(principal, request)
            require_role(who, role, f"'{summary}'")
            request.state.principal = who
            return await handler(request)

        check.__name__ = handler.__name__
        return check

    async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kw)

    # -- handlers ---------------------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        return _json(Health("ok"))

    async def readyz(request: Request) -> Response:
        def ping() -> None:
            try:
                with registry.db.transaction() as tx:
                    tx.fetchone("SELECT 1")
            except Exception as exc:
                raise UnavailableError(f"registry database unreachable: {exc}") from exc

        await call(ping)
        return _json(Health("ready"))

    async def approvals(request: Request) -> Response:
        return _json(await call(registry.approvals, model_of(request), version_of(request)))

    async def list_models(request: Request) -> Response:
        return _json(await call(registry.list_models))

    async def create_model(request: Request) -> Response:
        who = await call(actor, request)
        body: CreateModelRequest = await _body(request, CreateModelRequest)
        model = await call(
            registry.create_model,
            body.name,
            actor=who,
            framework=body.framework,
            description=body.description,
            high_stakes=body.high_stakes,
            gates=body.gates,
        )
        return _json(model, 201)

    async def get_model(request: Request) -> Response:
        return _json(await call(registry.get_model, model_of(request)))

    async def update_model(request: Request) -> Response:
        who = await call(actor, request)
        body: UpdateModelRequest = await _body(request, UpdateModelRequest)
        model = await call(
            registry.update_model,
            model_of(request),
            actor=who,
            description=body.description,
            high_stakes=body.high_stakes,
            gates=body.gates,
        )
        return _json(model)

    async def list_versions(request: Request) -> Response:
        status = request.query_params.get("status")
        return _json(await call(registry.list_versions, model_of(request), status=status))

    async def register(request: Request) -> Response:
        who = await call(actor, request)
        body: RegisterRequest = await _body(request, RegisterRequest)
        version = await call(
            registry.register,
            model_of(request),
            actor=who,
            serving_artifact=body.serving_artifact,
            native_artifact=body.native_artifact,
            native_format=body.native_format,
            framework=body.framework,
            framework_version=body.framework_version,
            metrics=body.metrics,
            evaluations=body.evaluations,
            feature_store_version=body.feature_store_version,
            training_dataset_ref=body.training_dataset_ref,
            signature=body.signature,
            run_id=body.run_id,
            tags=body.tags,
            serving_spec=body.serving_spec,
        )
        return _json(version, 201)

    async def get_version(request: Request) -> Response:
        return _json(await call(registry.get_version, model_of(request), version_of(request)))

    async def lineage(request: Request) -> Response:
        return _json(await call(registry.lineage, model_of(request), version_of(request)))

    async def artifact(request: Request) -> Response:
        kind = request.query_params.get("kind", "serving")
        if kind not in ("serving", "native"):
            raise InvalidArgumentError(f"unknown artifact kind {kind!r}; use serving or native")
        name, number = model_of(request), version_of(request)
        data = await call(registry.load_artifact, name, number, kind)
        return Response(data, media_type="application/octet-stream")

    async def record_evaluation(request: Request) -> Response:
        who = await call(actor, request)
        body: EvaluationRequest = await _body(request, EvaluationRequest)
        version = await call(
            registry.record_evaluation,
            model_of(request),
            version_of(request),
            body.dataset,
            body.metrics,
            actor=who,
        )
        return _json(version)

    async def approve(request: Request) -> Response:
        who = await call(actor, request)
        body: ApproveRequest = await _body(request, ApproveRequest, optional=True)
        approval = await call(
            registry.approve,
            model_of(request),
            version_of(request),
            actor=who,
            comment=body.comment,
        )
        return _json(approval, 201)

    async def promote(request: Request) -> Response:
        who = await call(actor, request)
        result = await call(registry.promote, model_of(request), version_of(request), actor=who)
        return _json(result)

    async def archive(request: Request) -> Response:
        who = await call(actor, request)
        result = await call(registry.archive, model_of(request), version_of(request), actor=who)
        return _json(result)

    async def gate_results(request: Request) -> Response:
        return _json(await call(registry.gate_results, model_of(request), version_of(request)))

    async def deploy(request: Request) -> Response:
        who = await call(actor, request)
        body: DeployRequest = await _body(request, DeployRequest, optional=True)
        deployment = await call(
            registry.deploy,
            model_of(request),
            version_of(request),
            body.traffic_split,
            actor=who,
            serving_endpoint=body.serving_endpoint,
        )
        return _json(deployment, 201)

    async def deployments(request: Request) -> Response:
        return _json(await call(registry.deployments, model_of(request)))

    async def active_deployment(request: Request) -> Response:
        name = model_of(request)
        found = await call(registry.active_deployment, name)
        if found is None:
            raise NotFoundError(f"model {name!r} has no active deployment")
        return _json(found)

    async def rollback(request: Request) -> Response:
        who = await call(actor, request)
        return _json(await call(registry.rollback, model_of(request), actor=who), 201)

    async def audit(request: Request) -> Response:
        return _json(await call(registry.audit, model_of(request)))

    async def versions_using(request: Request) -> Response:
        group_version: str = request.path_params["group_version"]
        return _json(await call(registry.versions_using, group_version))

    async def openapi(request: Request) -> Response:
        return _json(spec)

    m = "/models/{model_id}"
    v = m + "/versions/{version_id:int}"
    table: list[tuple[_Endpoint, Handler]] = [
        (_Endpoint("GET", "/healthz", "Liveness", Health), healthz),
        (_Endpoint("GET", "/readyz", "Readiness (database reachable)", Health), readyz),
        (_Endpoint("GET", "/models", "List models", list[Model]), list_models),
        (
            _Endpoint(
                "POST", "/models", "Create a model", Model, CreateModelRequest, 201, "publisher"
            ),
            create_model,
        ),
        (_Endpoint("GET", m, "Show a model", Model), get_model),
        (
            _Endpoint(
                "PATCH", m, "Change promotion policy", Model, UpdateModelRequest, 200, "admin"
            ),
            update_model,
        ),
        (
            _Endpoint(
                "GET", m + "/versions", "List versions", list[ModelVersion], query=("status",)
            ),
            list_versions,
        ),
        (
            _Endpoint(
                "POST",
                m + "/versions",
                "Register a version",
                ModelVersion,
                RegisterRequest,
                201,
                "publisher",
            ),
            register,
        ),
        (_Endpoint("GET", v, "Show a version", ModelVersion), get_version),
        (_Endpoint("GET", v + "/lineage", "What produced a version", Lineage), lineage),
        (
            _Endpoint(
                "GET", v + "/artifact", "Download a verified artifact", bytes, query=("kind",)
            ),
            artifact,
        ),
        (
            _Endpoint(
                "POST",
                v + "/evaluations",
                "Record evaluation metrics",
                ModelVersion,
                EvaluationRequest,
                200,
                "publisher",
            ),
            record_evaluation,
        ),
        (
            _Endpoint(
                "POST",
                v + "/approve",
                "Approve a promotion",
                Approval,
                ApproveRequest,
                201,
                "approver",
            ),
            approve,
        ),
        (
            _Endpoint(
                "POST",
                v + "/promote",
                "Promote to PRODUCTION",
                PromotionResult,
                None,
                200,
                "deployer",
            ),
            promote,
        ),
        (
            _Endpoint(
                "POST", v + "/archive", "Archive a version", ModelVersion, None, 200, "deployer"
            ),
            archive,
        ),
        (_Endpoint("GET", v + "/gates", "Gate results", list[GateResult]), gate_results),
        (_Endpoint("GET", v + "/approvals", "Approvals", list[Approval]), approvals),
        (
            _Endpoint(
                "POST",
                v + "/deploy",
                "Deploy with a traffic split",
                Deployment,
                DeployRequest,
                201,
                "deployer",
            ),
            deploy,
        ),
        (_Endpoint("GET", m + "/deployments", "Deployment history", list[Deployment]), deployments),
        (
            _Endpoint("GET", m + "/deployments/active", "Active deployment", Deployment),
            active_deployment,
        ),
        (
            _Endpoint(
                "POST",
                m + "/deployments/rollback",
                "Roll back to the previous deployment",
                Deployment,
                None,
                201,
                "deployer",
            ),
            rollback,
        ),
        (_Endpoint("GET", m + "/audit", "Audit log", list[AuditEntry]), audit),
        (
            _Endpoint(
                "GET",
                "/lineage/feature-groups/{group_version}",
                "Model versions that used a feature group version",
                list[ModelVersion],
            ),
            versions_using,
        ),
    ]
    spec = openapi_spec([e for e, _ in table])
    routes = [
        Route(
            e.path,
            wrap(h if e.role is None else authenticated(e.role, e.summary, h)),
            methods=[e.method],
        )
        for e, h in table
    ]
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error},
        middleware=[Middleware(InputGuard)],
    )
    app.state.max_body_bytes = max_body_bytes
    return app


_HTTP_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own errors (no such route, wrong method) in the same JSON shape.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"no route {request.method} {request.url.path}; see /openapi.json"
    return _json(ErrorBody(_HTTP_CODES.get(status, "UNKNOWN"), message), status)


def openapi_spec(endpoints: list[_Endpoint]) -> dict[str, Any]:
    """An OpenAPI 3.1 document whose schemas come from the msgspec types themselves."""
    types: list[Any] = [ErrorBody]
    for e in endpoints:
        types.append(e.response)
        if e.body is not None:
            types.append(e.body)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(types, schemas, strict=True))
    error_ref = by_type[ErrorBody]
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        path = e.path.replace(":int", "")
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "integer" if name == "version_id" else "string"},
                "description": {
                    "model_id": "the model's name",
                    "version_id": "the version number",
                    "group_version": "a feature group version, 'group:version'",
                }[name],
            }
            for name in ("model_id", "version_id", "group_version")
            if "{" + name in e.path
        ]
        params += [
            {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
            for q in e.query
        ]
        op: dict[str, Any] = {
            "summary": e.summary,
            "parameters": params,
            "responses": {
                str(e.status): {
                    "description": "OK",
                    "content": {
                        "application/octet-stream" if e.response is bytes else "application/json": {
                            "schema": by_type[e.response]
                        }
                    },
                },
                "default": {
                    "description": "error",
                    "content": {"application/json": {"schema": error_ref}},
                },
            },
        }
        if e.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_type[e.body]}},
            }
        if e.role is not None:
            op["security"] = [{"bearer": []}]
            op["description"] = f"Needs a bearer token with role '{e.role}'."
        paths.setdefault(path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Carrara model registry", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
