"""The registry's data and wire types (msgspec structs), shared by the store, API and client."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "Approval",
    "AuditEntry",
    "Decision",
    "Deployment",
    "DeployRequest",
    "DeployedVariant",
    "Gate",
    "GateResult",
    "Lineage",
    "Model",
    "ModelVersion",
    "PendingApproval",
    "PromotionResult",
    "Signature",
    "Status",
    "TensorSpec",
    "TrafficSplit",
    "VariantSplit",
    "VersionRef",
]

Status = Literal["STAGING", "PRODUCTION", "ARCHIVED"]
STATUSES: tuple[Status, ...] = ("STAGING", "PRODUCTION", "ARCHIVED")


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One named input or output of a model: dtype and shape (-1 = any size)."""

    name: str
    dtype: str
    shape: list[int] = []


class Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A model's input and output tensors, checked by serving before it loads a version."""

    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []


class Gate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An automated promotion gate: ``metric`` on ``dataset`` must clear ``threshold`` and be no
    worse than the current production version by more than ``max_regression``."""

    metric: str
    dataset: str
    threshold: float | None = None
    max_regression: float | None = None
    higher_is_better: bool = True


class Model(msgspec.Struct, frozen=True, kw_only=True):
    """A named model; its versions carry the artifacts and lineage."""

    model_id: int
    name: str
    framework: str
    created_by: str
    created_at: str
    description: str = ""
    high_stakes: bool = False
    gates: list[Gate] = []
    latest_version: int = 0
    production_version: int | None = None


class ModelVersion(msgspec.Struct, frozen=True, kw_only=True):
    """One registered version with everything that produced it."""

    version_id: int
    model: str
    version: int
    status: Status
    metrics: dict[str, float]
    evaluations: dict[str, dict[str, float]]
    framework: str
    framework_version: str
    feature_store_version: list[str]
    training_dataset_ref: str
    signature: Signature
    run_id: str
    tags: dict[str, str]
    artifact_path: str
    artifact_sha256: str
    native_artifact_path: str
    native_artifact_sha256: str
    native_format: str
    created_by: str
    created_at: str
    promoted_at: str | None = None
    promoted_by: str | None = None
    archived_at: str | None = None
    serving_spec: dict[str, Any] = {}


class GateResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one gate check for one promotion attempt."""

    gate: Literal["threshold", "regression"]
    dataset: str
    metric: str
    value: float | None
    reference: float | None
    passed: bool
    detail: str


class PromotionResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a successful promotion did."""

    version: ModelVersion
    archived_version: int | None
    gate_results: list[GateResult]


Decision = Literal["approved", "rejected"]


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """An approver's decision on one version: a sign-off (``approved``, with an optional
    comment) or a rejection (``rejected``, ``comment`` holding the required reason). On a
    high-stakes model the version's latest decision must be ``approved`` to promote it."""

    model: str
    version: int
    approver: str
    comment: str
    created_at: str
    decision: Decision = "approved"


class PendingApproval(msgspec.Struct, frozen=True, kw_only=True):
    """A STAGING version of a high-stakes model whose latest decision is not ``approved``
    (never decided, or rejected): what ``GET /approvals/pending`` lists for approvers."""

    model: str
    version: int
    status: Status
    created_by: str
    created_at: str
    metrics: dict[str, float]
    high_stakes: bool
    decisions: list[Approval]  # oldest first; empty when nobody decided yet


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """Who did what to which model/version, and when."""

    audit_id: int
    model: str | None
    version: int | None
    actor: str
    action: str
    detail: dict[str, Any]
    created_at: str


class VariantSplit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One routed variant: a version and its share of traffic in basis points (of 10,000)."""

    name: str
    version: int
    weight_bp: int
    canary: bool = False


class VersionRef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A non-routed variant (shadow or fallback): a name and a version."""

    name: str
    version: int


class TrafficSplit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a deployment routes requests; weights match the gateway's ``RoutingPolicy`` (bp)."""

    variants: list[VariantSplit]
    shadows: list[VersionRef] = []
    fallback: VersionRef | None = None
    salt: str = ""


class DeployRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST .../deploy``; no split means all traffic to the version in the path."""

    traffic_split: TrafficSplit | None = None
    serving_endpoint: str = ""


class DeployedVariant(msgspec.Struct, frozen=True, kw_only=True):
    """A variant as published to gateways: where its verified artifact lives."""

    name: str
    version: int
    role: Literal["routed", "shadow", "fallback"]
    weight_bp: int
    canary: bool
    artifact_path: str
    artifact_sha256: str
    serving_spec: dict[str, Any] = {}


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """One deployment record (also the ``deployments`` event payload, as msgspec JSON)."""

    deployment_id: int
    model: str
    version: int
    traffic_split: TrafficSplit
    variants: list[DeployedVariant]
    serving_endpoint: str
    created_by: str
    created_at: str
    is_active: bool
    rollback_of: int | None = None


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """What produced a version: dataset snapshot, feature group versions, training run."""

    model: str
    version: int
    training_dataset_ref: str
    feature_group_versions: list[str]
    run_id: str
    framework: str
    framework_version: str
