"""The registry over its REST API, with the signatures of ``ModelRegistry``.

``RegistryClient`` is ``carrara.Client().registry`` and what ``carrara models --server`` calls;
its public methods take exactly the arguments of
:class:`carrara.registry.registry.ModelRegistry`'s (``tests/unit/test_sdk_signatures.py``
compares them), so code written for the embedded registry runs against a server unchanged.
Errors come back as the ``CarraraError`` classes the server raised (one transport,
:class:`carrara.transport.Transport`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import httpx

from carrara import errors
from carrara.registry.api import (
    ApproveRequest,
    CreateModelRequest,
    EvaluationRequest,
    RegisterRequest,
    RejectRequest,
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
    PendingApproval,
    PromotionResult,
    Signature,
    TrafficSplit,
)
from carrara.transport import Transport

__all__ = ["TOKEN_ACTOR", "RegistryAPI", "RegistryClient", "read_artifact"]

#: The ``actor=`` to pass a remote registry: a stand-in, since the server acts as whoever
#: the bearer token belongs to and checks that token's roles (``RegistryClient.actor``).
TOKEN_ACTOR = Principal("bearer-token", frozenset())


def read_artifact(path: bytes | str | Path | None) -> bytes | None:
    """The bytes of an artifact given as bytes or as a local file path, or None."""
    if path is None or isinstance(path, bytes):
        return path
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise errors.NotFoundError(f"artifact file {path} does not exist") from exc


class RegistryClient:
    """``ModelRegistry``'s methods over the registry API (``carrara.registry.api``).

    Every ``actor`` argument is accepted for parity with the embedded registry and not sent:
    the bearer ``token`` decides who acts, and the server checks its roles (pass
    ``actor=client.actor``, :data:`TOKEN_ACTOR`). Pass ``http`` to inject an ``httpx.Client``
    or ``transport`` to share one (``carrara.Client`` does); neither is closed here.
    """

    def __init__(
        self,
        url: str = "",
        token: str | None = None,
        *,
        http: httpx.Client | None = None,
        transport: Transport | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._owns = transport is None
        self._t = transport or Transport(
            url, token, http=http, timeout_s=timeout_s, service="registry API"
        )
        #: What to pass as ``actor=``; the token is who acts.
        self.actor: Principal = TOKEN_ACTOR

    def close(self) -> None:
        if self._owns:
            self._t.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, kind: Any, **kw: Any) -> Any:
        return self._t.call(method, path, kind, service="registry API", **kw)

    # -- models and versions ------------------------------------------------------------------

    def get_model(self, name: str) -> Model:
        model: Model = self._call("GET", f"/models/{name}", Model)
        return model

    def list_models(self) -> list[Model]:
        models: list[Model] = self._call("GET", "/models", list[Model])
        return models

    def get_version(self, name: str, version: int) -> ModelVersion:
        found: ModelVersion = self._call("GET", f"/models/{name}/versions/{version}", ModelVersion)
        return found

    def list_versions(self, name: str, *, status: str | None = None) -> list[ModelVersion]:
        versions: list[ModelVersion] = self._call(
            "GET", f"/models/{name}/versions", list[ModelVersion], params={"status": status}
        )
        return versions

    def version_for_run(self, name: str, run_id: str) -> ModelVersion | None:
        """The first version of ``name`` registered by training run ``run_id``, or None
        (also when the model does not exist)."""
        if not run_id:
            raise errors.InvalidArgumentError("version_for_run needs a run id")
        try:
            versions = self.list_versions(name)
        except errors.NotFoundError:
            return None
        found = sorted((v for v in versions if v.run_id == run_id), key=lambda v: v.version)
        return found[0] if found else None

    def production_version(self, name: str) -> ModelVersion | None:
        found = self.list_versions(name, status="PRODUCTION")
        return found[0] if found else None

    def create_model(
        self,
        name: str,
        *,
        actor: Principal,
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
        model: Model = self._call("POST", "/models", Model, json=body)
        return model

    def update_model(
        self,
        name: str,
        *,
        actor: Principal,
        description: str | None = None,
        high_stakes: bool | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Model:
        body = UpdateModelRequest(
            description=description,
            high_stakes=high_stakes,
            gates=None if gates is None else list(gates),
        )
        model: Model = self._call("PATCH", f"/models/{name}", Model, json=body)
        return model

    def register(
        self,
        name: str,
        *,
        actor: Principal,
        serving_artifact: bytes | str | Path | None,
        native_artifact: bytes | str | Path | None = None,
        native_format: str = "",
        framework: str,
        framework_version: str = "",
        metrics: Mapping[str, float] | None = None,
        evaluations: Mapping[str, Mapping[str, float]] | None = None,
        feature_store_version: Sequence[str] = (),
        training_dataset_ref: str = "",
        signature: Signature | None = None,
        run_id: str = "",
        tags: Mapping[str, str] | None = None,
        serving_spec: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Register a version; artifacts given as file paths are read here and sent in the
        body (``RegisterRequest``, the wire format)."""
        body = RegisterRequest(
            framework=framework,
            serving_artifact=read_artifact(serving_artifact),
            native_artifact=read_artifact(native_artifact),
            native_format=native_format,
            framework_version=framework_version,
            metrics=dict(metrics or {}),
            evaluations={k: dict(v) for k, v in (evaluations or {}).items()},
            feature_store_version=list(feature_store_version),
            training_dataset_ref=training_dataset_ref,
            signature=signature,
            run_id=run_id,
            tags=dict(tags or {}),
            serving_spec=dict(serving_spec or {}),
        )
        version: ModelVersion = self._call(
            "POST", f"/models/{name}/versions", ModelVersion, json=body
        )
        return version

    def load_artifact(
        self, name: str, version: int, kind: Literal["serving", "native"] = "serving"
    ) -> bytes:
        data: bytes = self._call(
            "GET", f"/models/{name}/versions/{version}/artifact", bytes, params={"kind": kind}
        )
        return data

    # -- promotion ------------------------------------------------------------------------------

    def record_evaluation(
        self,
        name: str,
        version: int,
        dataset: str,
        metrics: Mapping[str, float],
        *,
        actor: Principal,
    ) -> ModelVersion:
        body = EvaluationRequest(dataset=dataset, metrics=dict(metrics))
        found: ModelVersion = self._call(
            "POST", f"/models/{name}/versions/{version}/evaluations", ModelVersion, json=body
        )
        return found

    def approve(self, name: str, version: int, *, actor: Principal, comment: str = "") -> Approval:
        approval: Approval = self._call(
            "POST",
            f"/models/{name}/versions/{version}/approve",
            Approval,
            json=ApproveRequest(comment=comment),
        )
        return approval

    def reject(self, name: str, version: int, *, actor: Principal, reason: str) -> Approval:
        rejection: Approval = self._call(
            "POST",
            f"/models/{name}/versions/{version}/reject",
            Approval,
            json=RejectRequest(reason=reason),
        )
        return rejection

    def approvals(self, name: str, version: int) -> list[Approval]:
        found: list[Approval] = self._call(
            "GET", f"/models/{name}/versions/{version}/approvals", list[Approval]
        )
        return found

    def pending_approvals(self) -> list[PendingApproval]:
        found: list[PendingApproval] = self._call(
            "GET", "/approvals/pending", list[PendingApproval]
        )
        return found

    def promote(self, name: str, version: int, *, actor: Principal) -> PromotionResult:
        result: PromotionResult = self._call(
            "POST", f"/models/{name}/versions/{version}/promote", PromotionResult
        )
        return result

    def gate_results(self, name: str, version: int) -> list[GateResult]:
        found: list[GateResult] = self._call(
            "GET", f"/models/{name}/versions/{version}/gates", list[GateResult]
        )
        return found

    def archive(self, name: str, version: int, *, actor: Principal) -> ModelVersion:
        found: ModelVersion = self._call(
            "POST", f"/models/{name}/versions/{version}/archive", ModelVersion
        )
        return found

    # -- deployments ----------------------------------------------------------------------------

    def deploy(
        self,
        name: str,
        version: int,
        split: TrafficSplit | None = None,
        *,
        actor: Principal,
        serving_endpoint: str = "",
        prepare: Callable[[Deployment], None] | None = None,
    ) -> Deployment:
        """Deploy on the server; ``prepare`` (a hook run in the registry's process before
        the commit) cannot travel, so it must be None here: gateways load what the
        ``deployments`` topic announces."""
        if prepare is not None:
            raise errors.FailedPreconditionError(
                "deploy(prepare=...) runs only in the registry's process; a remote deploy is "
                "loaded by the gateways that follow the deployments topic"
            )
        body = DeployRequest(traffic_split=split, serving_endpoint=serving_endpoint)
        deployment: Deployment = self._call(
            "POST", f"/models/{name}/versions/{version}/deploy", Deployment, json=body
        )
        return deployment

    def rollback(self, name: str, *, actor: Principal) -> Deployment:
        deployment: Deployment = self._call(
            "POST", f"/models/{name}/deployments/rollback", Deployment
        )
        return deployment

    def active_deployment(self, name: str) -> Deployment | None:
        try:
            found: Deployment = self._call("GET", f"/models/{name}/deployments/active", Deployment)
        except errors.NotFoundError:
            self.get_model(name)  # an unknown model stays an error
            return None
        return found

    def deployments(self, name: str) -> list[Deployment]:
        found: list[Deployment] = self._call("GET", f"/models/{name}/deployments", list[Deployment])
        return found

    # -- lineage and audit ----------------------------------------------------------------------

    def lineage(self, name: str, version: int) -> Lineage:
        found: Lineage = self._call("GET", f"/models/{name}/versions/{version}/lineage", Lineage)
        return found

    def versions_using(self, feature_group_version: str) -> list[ModelVersion]:
        found: list[ModelVersion] = self._call(
            "GET", f"/lineage/feature-groups/{feature_group_version}", list[ModelVersion]
        )
        return found

    def versions_from_dataset(self, training_dataset_ref: str) -> list[ModelVersion]:
        """Versions trained on a dataset snapshot (one listing per model)."""
        return [
            v
            for m in self.list_models()
            for v in self.list_versions(m.name)
            if v.training_dataset_ref == training_dataset_ref
        ]

    def audit(self, name: str | None = None, *, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries, oldest first, of one model or (``name=None``) of every model; token
        changes are in the database's log only (``carrara models token list``)."""
        names = [name] if name is not None else [m.name for m in self.list_models()]
        entries: list[AuditEntry] = [
            e for n in names for e in self._call("GET", f"/models/{n}/audit", list[AuditEntry])
        ]
        return sorted(entries, key=lambda e: e.audit_id)[:limit]


#: A registry the CLI and the SDK call through ``ModelRegistry``'s methods: the database
#: itself or the REST API (the signatures are one contract; ``test_sdk_signatures`` checks).
RegistryAPI: TypeAlias = ModelRegistry | RegistryClient
