"""Model registry: versions, lineage, evaluation gates, approvals, deployments."""

from __future__ import annotations

from carrara.registry.artifacts import ArtifactIntegrityError, ArtifactStore
from carrara.registry.auth import ROLES, Principal, TokenStore
from carrara.registry.migrations import upgrade
from carrara.registry.registry import ModelRegistry
from carrara.registry.types import (
    Approval,
    AuditEntry,
    DeployedVariant,
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
    TensorSpec,
    TrafficSplit,
    VariantSplit,
    VersionRef,
)

__all__ = [
    "ROLES",
    "Approval",
    "ArtifactIntegrityError",
    "ArtifactStore",
    "AuditEntry",
    "DeployedVariant",
    "DeployRequest",
    "Deployment",
    "Gate",
    "GateResult",
    "Lineage",
    "Model",
    "ModelRegistry",
    "ModelVersion",
    "PendingApproval",
    "Principal",
    "PromotionResult",
    "Signature",
    "TensorSpec",
    "TokenStore",
    "TrafficSplit",
    "VariantSplit",
    "VersionRef",
    "upgrade",
]
