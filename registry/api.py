"""The registry's REST API: Starlette routes with msgspec bodies and a generated OpenAPI spec.

Path parameters name things the way users do: ``{model_id}`` is the model's name and
``{version_id}`` its version number. Reads are open; writes need ``Authorization: Bearer``
with the role the registry asks for, checked before the body is read. Routes, the OpenAPI
document, the token guard and the error shape ``{"error": <grpc code>, "message": ...}`` are
the kernel's HTTP kit (``carrara.http``); this module holds the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from carrara.errors import (
    InvalidArgumentError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from carrara.http import (
    Endpoint,
    ErrorBody,
    Health,
    api_app,
    build_routes,
    decode_json,
    principal_of,
    read_body,
    with_document,
)
from carrara.http import json_response as _json
from carrara.registry.auth import registry_authenticator
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
    PendingApproval,
    PromotionResult,
    Signature,
)

__all__ = [
    "MAX_BODY_BYTES",
    "PATH_PARAMS",
    "ApproveRequest",
    "CreateModelRequest",
    "ErrorBody",
    "EvaluationRequest",
    "PayloadTooLargeError",
    "RegisterRequest",
    "RejectRequest",
    "UpdateModelRequest",
    "create_app",
    "endpoints",
]

#: The default body limit (artifacts travel base64 inside); an app keeps its own in
#: ``app.state.max_body_bytes``.
MAX_BODY_BYTES = 512 << 20
TITLE = "Carrara model registry"
#: Descriptions of the path parameters, for the OpenAPI document.
PATH_PARAMS = {
    "model_id": "the model's name",
    "version_id": "the version number",
    "group_version": "a feature group version, 'group:version'",
}


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


class RejectRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Why a version is turned down (required: an empty reason is a 400)."""

    reason: str = ""


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
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The REST app over ``registry`` (with ``/openapi.json``); ``bootstrap_token`` (e.g.
    ``Settings.api_token``) is accepted as an admin token so the first real tokens can be
    created remotely. Bodies over ``max_body_bytes`` are refused with 413."""
    table = with_document("/openapi.json", TITLE, endpoints(registry), PATH_PARAMS)
    app = api_app(build_routes(table, registry_authenticator(registry.tokens, bootstrap_token)))
    app.state.max_body_bytes = max_body_bytes
    return app


def endpoints(registry: ModelRegistry) -> list[Endpoint]:
    """The registry API's table over ``registry``. Handlers read the body limit from the app
    they run in (``app.state.max_body_bytes``) and the caller from :func:`principal_of`; the
    registry checks the role again (401 for no caller, 403 for a missing role)."""

    async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kw)

    def model_of(request: Request) -> str:
        name: str = request.path_params["model_id"]
        return name

    def version_of(request: Request) -> int:
        version: int = request.path_params["version_id"]
        return version

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
        who = principal_of(request)
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
        who = principal_of(request)
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
        who = principal_of(request)
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
        who = principal_of(request)
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
        who = principal_of(request)
        body: ApproveRequest = await _body(request, ApproveRequest, optional=True)
        approval = await call(
            registry.approve,
            model_of(request),
            version_of(request),
            actor=who,
            comment=body.comment,
        )
        return _json(approval, 201)

    async def reject(request: Request) -> Response:
        who = principal_of(request)
        body: RejectRequest = await _body(request, RejectRequest, optional=True)
        rejection = await call(
            registry.reject,
            model_of(request),
            version_of(request),
            actor=who,
            reason=body.reason,
        )
        return _json(rejection, 201)

    async def pending_approvals(request: Request) -> Response:
        return _json(await call(registry.pending_approvals))

    async def promote(request: Request) -> Response:
        who = principal_of(request)
        result = await call(registry.promote, model_of(request), version_of(request), actor=who)
        return _json(result)

    async def archive(request: Request) -> Response:
        who = principal_of(request)
        result = await call(registry.archive, model_of(request), version_of(request), actor=who)
        return _json(result)

    async def gate_results(request: Request) -> Response:
        return _json(await call(registry.gate_results, model_of(request), version_of(request)))

    async def deploy(request: Request) -> Response:
        who = principal_of(request)
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
        who = principal_of(request)
        return _json(await call(registry.rollback, model_of(request), actor=who), 201)

    async def audit(request: Request) -> Response:
        return _json(await call(registry.audit, model_of(request)))

    async def versions_using(request: Request) -> Response:
        group_version: str = request.path_params["group_version"]
        return _json(await call(registry.versions_using, group_version))

    m = "/models/{model_id}"
    v = m + "/versions/{version_id:int}"
    return [
        Endpoint("GET", "/healthz", "Liveness", Health, healthz),
        Endpoint("GET", "/readyz", "Readiness (database reachable)", Health, readyz),
        Endpoint("GET", "/models", "List models", list[Model], list_models),
        Endpoint(
            "POST",
            "/models",
            "Create a model",
            Model,
            create_model,
            CreateModelRequest,
            201,
            "publisher",
        ),
        Endpoint("GET", m, "Show a model", Model, get_model),
        Endpoint(
            "PATCH",
            m,
            "Change promotion policy",
            Model,
            update_model,
            UpdateModelRequest,
            200,
            "admin",
        ),
        Endpoint(
            "GET",
            m + "/versions",
            "List versions",
            list[ModelVersion],
            list_versions,
            query=("status",),
        ),
        Endpoint(
            "POST",
            m + "/versions",
            "Register a version",
            ModelVersion,
            register,
            RegisterRequest,
            201,
            "publisher",
        ),
        Endpoint("GET", v, "Show a version", ModelVersion, get_version),
        Endpoint("GET", v + "/lineage", "What produced a version", Lineage, lineage),
        Endpoint(
            "GET",
            v + "/artifact",
            "Download a verified artifact",
            bytes,
            artifact,
            query=("kind",),
            produces="application/octet-stream",
        ),
        Endpoint(
            "POST",
            v + "/evaluations",
            "Record evaluation metrics",
            ModelVersion,
            record_evaluation,
            EvaluationRequest,
            200,
            "publisher",
        ),
        Endpoint(
            "POST",
            v + "/approve",
            "Approve a promotion",
            Approval,
            approve,
            ApproveRequest,
            201,
            "approver",
        ),
        Endpoint(
            "POST",
            v + "/reject",
            "Reject a version (blocks a high-stakes promotion until approved again)",
            Approval,
            reject,
            RejectRequest,
            201,
            "approver",
        ),
        Endpoint(
            "GET",
            "/approvals/pending",
            "STAGING versions of high-stakes models awaiting an approval",
            list[PendingApproval],
            pending_approvals,
        ),
        Endpoint(
            "POST",
            v + "/promote",
            "Promote to PRODUCTION",
            PromotionResult,
            promote,
            role="deployer",
        ),
        Endpoint(
            "POST", v + "/archive", "Archive a version", ModelVersion, archive, role="deployer"
        ),
        Endpoint("GET", v + "/gates", "Gate results", list[GateResult], gate_results),
        Endpoint("GET", v + "/approvals", "Approvals", list[Approval], approvals),
        Endpoint(
            "POST",
            v + "/deploy",
            "Deploy with a traffic split",
            Deployment,
            deploy,
            DeployRequest,
            201,
            "deployer",
        ),
        Endpoint("GET", m + "/deployments", "Deployment history", list[Deployment], deployments),
        Endpoint(
            "GET", m + "/deployments/active", "Active deployment", Deployment, active_deployment
        ),
        Endpoint(
            "POST",
            m + "/deployments/rollback",
            "Roll back to the previous deployment",
            Deployment,
            rollback,
            status=201,
            role="deployer",
        ),
        Endpoint("GET", m + "/audit", "Audit log", list[AuditEntry], audit),
        Endpoint(
            "GET",
            "/lineage/feature-groups/{group_version}",
            "Model versions that used a feature group version",
            list[ModelVersion],
            versions_using,
        ),
    ]
