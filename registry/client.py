"""SDK for the registry: the REST client and an embedded twin with the same methods.

``RegistryClient`` talks HTTP to ``carrara.registry.api``; ``LocalRegistryClient`` calls a
``ModelRegistry`` directly as a given principal. The CLI uses either through ``RegistryAPI``.
Errors come back as the same ``CarraraError`` classes the server raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import httpx
import msgspec

from carrara import errors
from carrara.registry.api import (
    ApproveRequest,
    CreateModelRequest,
    EvaluationRequest,
    RegisterRequest,
    UpdateModelRequest,
)
from carrara.registry.auth import Principal
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
    TrafficSplit,
)

__all__ = ["LocalRegistryClient", "RegistryAPI", "RegistryClient"]

T = TypeVar("T")

_BY_CODE: dict[str, type[errors.CarraraError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgumentError,
    "NOT_FOUND": errors.NotFoundError,
    "ALREADY_EXISTS": errors.AlreadyExistsError,
    "FAILED_PRECONDITION": errors.FailedPreconditionError,
    "UNAUTHENTICATED": errors.UnauthenticatedError,
    "PERMISSION_DENIED": errors.PermissionDeniedError,
    "RESOURCE_EXHAUSTED": errors.ResourceExhaustedError,
    "UNAVAILABLE": errors.UnavailableError,
    "DEADLINE_EXCEEDED": errors.DeadlineExceededError,
}


class RegistryAPI(Protocol):
    """What the CLI needs, remote or embedded."""

    def list_models(self) -> list[Model]: ...
    def get_model(self, name: str) -> Model: ...
    def create_model(
        self,
        name: str,
        *,
        framework: str = "",
        description: str = "",
        high_stakes: bool = False,
        gates: Sequence[Gate] = (),
    ) -> Model: ...
    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        high_stakes: bool | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Model: ...
    def list_versions(self, name: str, *, status: str | None = None) -> list[ModelVersion]: ...
    def get_version(self, name: str, version: int) -> ModelVersion: ...
    def register(self, name: str, request: RegisterRequest) -> ModelVersion: ...
    def record_evaluation(
        self, name: str, version: int, dataset: str, metrics: Mapping[str, float]
    ) -> ModelVersion: ...
    def approve(self, name: str, version: int, comment: str = "") -> Approval: ...
    def approvals(self, name: str, version: int) -> list[Approval]: ...
    def promote(self, name: str, version: int) -> PromotionResult: ...
    def archive(self, name: str, version: int) -> ModelVersion: ...
    def gate_results(self, name: str, version: int) -> list[GateResult]: ...
    def deploy(
        self, name: str, version: int, split: TrafficSplit | None = None, serving_endpoint: str = ""
    ) -> Deployment: ...
    def rollback(self, name: str) -> Deployment: ...
    def deployments(self, name: str) -> list[Deployment]: ...
    def lineage(self, name: str, version: int) -> Lineage: ...
    def versions_using(self, feature_group_version: str) -> list[ModelVersion]: ...
    def audit(self, name: str) -> list[AuditEntry]: ...
    def load_artifact(
        self, name: str, version: int, kind: Literal["serving", "native"] = "serving"
    ) -> bytes: ...


class RegistryClient:
    """HTTP client for the registry API; pass ``http`` to reuse or inject an ``httpx.Client``."""

    def __init__(
        self,
        url: str = "",
        token: str | None = None,
        *,
        http: httpx.Client | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._owns = http is None
        self._http = http if http is not None else httpx.Client(base_url=url, timeout=timeout_s)
        self._headers = headers

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        kind: type[T],
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> T:
        content = msgspec.json.encode(body) if body is not None else None
        try:
            response = self._http.request(
                method,
                path,
                content=content,
                params=params,
                headers={**self._headers, "content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise errors.UnavailableError(f"registry API unreachable: {exc}") from exc
        if response.status_code >= 400:
            try:
                err = msgspec.json.decode(response.content)
                code, message = err["error"], err["message"]
            except (msgspec.DecodeError, KeyError, TypeError):
                code, message = "UNKNOWN", response.text
            raise _BY_CODE.get(code, errors.InternalError)(message)
        if kind is bytes:
            return response.content  # type: ignore[return-value]
        return msgspec.json.decode(response.content, type=kind)

    def list_models(self) -> list[Model]:
        return self._call("GET", "/models", list[Model])

    def get_model(self, name: str) -> Model:
        return self._call("GET", f"/models/{name}", Model)

    def create_model(
        self,
        name: str,
        *,
        framework: str = "",
        description: str = "",
        high_stakes: bool = False,
        gates: Sequence[Gate] = (),
    ) -> Model:
        body = CreateModelRequest(
            name=name,
            framework=framework,
            description=description,
            high_stakes=high_stakes,
            gates=list(gates),
        )
        return self._call("POST", "/models", Model, body)

    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        high_stakes: bool | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Model:
        body = UpdateModelRequest(
            description=description,
            high_stakes=high_stakes,
            gates=None if gates is None else list(gates),
        )
        return self._call("PATCH", f"/models/{name}", Model, body)

    def list_versions(self, name: str, *, status: str | None = None) -> list[ModelVersion]:
        params = {"status": status} if status else None
        return self._call("GET", f"/models/{name}/versions", list[ModelVersion], params=params)

    def get_version(self, name: str, version: int) -> ModelVersion:
        return self._call("GET", f"/models/{name}/versions/{version}", ModelVersion)

    def register(self, name: str, request: RegisterRequest) -> ModelVersion:
        return self._call("POST", f"/models/{name}/versions", ModelVersion, request)

    def record_evaluation(
        self, name: str, version: int, dataset: str, metrics: Mapping[str, float]
    ) -> ModelVersion:
        body = EvaluationRequest(dataset=dataset, metrics=dict(metrics))
        return self._call(
            "POST", f"/models/{name}/versions/{version}/evaluations", ModelVersion, body
        )

    def approve(self, name: str, version: int, comment: str = "") -> Approval:
        return self._call(
            "POST",
            f"/models/{name}/versions/{version}/approve",
            Approval,
            ApproveRequest(comment=comment),
        )

    def approvals(self, name: str, version: int) -> list[Approval]:
        return self._call("GET", f"/models/{name}/versions/{version}/approvals", list[Approval])

    def promote(self, name: str, version: int) -> PromotionResult:
        return self._call("POST", f"/models/{name}/versions/{version}/promote", PromotionResult)

    def archive(self, name: str, version: int) -> ModelVersion:
        return self._call("POST", f"/models/{name}/versions/{version}/archive", ModelVersion)

    def gate_results(self, name: str, version: int) -> list[GateResult]:
        return self._call("GET", f"/models/{name}/versions/{version}/gates", list[GateResult])

    def deploy(
        self, name: str, version: int, split: TrafficSplit | None = None, serving_endpoint: str = ""
    ) -> Deployment:
        body = DeployRequest(traffic_split=split, serving_endpoint=serving_endpoint)
        return self._call("POST", f"/models/{name}/versions/{version}/deploy", Deployment, body)

    def rollback(self, name: str) -> Deployment:
        return self._call("POST", f"/models/{name}/deployments/rollback", Deployment)

    def deployments(self, name: str) -> list[Deployment]:
        return self._call("GET", f"/models/{name}/deployments", list[Deployment])

    def lineage(self, name: str, version: int) -> Lineage:
        return self._call("GET", f"/models/{name}/versions/{version}/lineage", Lineage)

    def versions_using(self, feature_group_version: str) -> list[ModelVersion]:
        return self._call(
            "GET", f"/lineage/feature-groups/{feature_group_version}", list[ModelVersion]
        )

    def audit(self, name: str) -> list[AuditEntry]:
        return self._call("GET", f"/models/{name}/audit", list[AuditEntry])

    def load_artifact(
        self, name: str, version: int, kind: Literal["serving", "native"] = "serving"
    ) -> bytes:
        return self._call(
            "GET", f"/models/{name}/versions/{version}/artifact", bytes, params={"kind": kind}
        )


class LocalRegistryClient:
    """The client interface over an embedded ``ModelRegistry``, acting as ``principal``."""

    def __init__(self, registry: ModelRegistry, principal: Principal | None) -> None:
        self.registry = registry
        self.principal = principal

    @property
    def _actor(self) -> Any:
        return self.principal  # None: the registry answers 401 with how to get a token

    def close(self) -> None:
        self.registry.close()

    def list_models(self) -> list[Model]:
        return self.registry.list_models()

    def get_model(self, name: str) -> Model:
        return self.registry.get_model(name)

    def create_model(
        self,
        name: str,
        *,
        framework: str = "",
        description: str = "",
        high_stakes: bool = False,
        gates: Sequence[Gate] = (),
    ) -> Model:
        return self.registry.create_model(
            name,
            actor=self._actor,
            framework=framework,
            description=description,
            high_stakes=high_stakes,
            gates=gates,
        )

    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        high_stakes: bool | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Model:
        return self.registry.update_model(
            name, actor=self._actor, description=description, high_stakes=high_stakes, gates=gates
        )

    def list_versions(self, name: str, *, status: str | None = None) -> list[ModelVersion]:
        return self.registry.list_versions(name, status=status)

    def get_version(self, name: str, version: int) -> ModelVersion:
        return self.registry.get_version(name, version)

    def register(self, name: str, request: RegisterRequest) -> ModelVersion:
        return self.registry.register(
            name,
            actor=self._actor,
            serving_artifact=request.serving_artifact,
            native_artifact=request.native_artifact,
            native_format=request.native_format,
            framework=request.framework,
            framework_version=request.framework_version,
            metrics=request.metrics,
            evaluations=request.evaluations,
            feature_store_version=request.feature_store_version,
            training_dataset_ref=request.training_dataset_ref,
            signature=request.signature or Signature(),
            run_id=request.run_id,
            tags=request.tags,
            serving_spec=request.serving_spec,
        )

    def record_evaluation(
        self, name: str, version: int, dataset: str, metrics: Mapping[str, float]
    ) -> ModelVersion:
        return self.registry.record_evaluation(name, version, dataset, metrics, actor=self._actor)

    def approve(self, name: str, version: int, comment: str = "") -> Approval:
        return self.registry.approve(name, version, actor=self._actor, comment=comment)

    def approvals(self, name: str, version: int) -> list[Approval]:
        return self.registry.approvals(name, version)

    def promote(self, name: str, version: int) -> PromotionResult:
        return self.registry.promote(name, version, actor=self._actor)

    def archive(self, name: str, version: int) -> ModelVersion:
        return self.registry.archive(name, version, actor=self._actor)

    def gate_results(self, name: str, version: int) -> list[GateResult]:
        return self.registry.gate_results(name, version)

    def deploy(
        self, name: str, version: int, split: TrafficSplit | None = None, serving_endpoint: str = ""
    ) -> Deployment:
        return self.registry.deploy(
            name, version, split, actor=self._actor, serving_endpoint=serving_endpoint
        )

    def rollback(self, name: str) -> Deployment:
        return self.registry.rollback(name, actor=self._actor)

    def deployments(self, name: str) -> list[Deployment]:
        return self.registry.deployments(name)

    def lineage(self, name: str, version: int) -> Lineage:
        return self.registry.lineage(name, version)

    def versions_using(self, feature_group_version: str) -> list[ModelVersion]:
        return self.registry.versions_using(feature_group_version)

    def audit(self, name: str) -> list[AuditEntry]:
        return self.registry.audit(name)

    def load_artifact(
        self, name: str, version: int, kind: Literal["serving", "native"] = "serving"
    ) -> bytes:
        return self.registry.load_artifact(name, version, kind)


def read_artifact(path: str | None) -> bytes | None:
    """The bytes of a local artifact file given on the command line, or None."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise errors.NotFoundError(f"artifact file {path} does not exist") from exc
