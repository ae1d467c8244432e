"""Model registry: versions, lineage, evaluation gates, approvals, deployments."""

from __future__ import annotations

from carrara.registry.artifacts import ArtifactIntegrityError, ArtifactStore
from carrara.registry.auth import ROLES, Principal, TokenStore
from carrara.registry.migrations import upgrade
from carrara.registry.registry import DEPLOYMENTS_TOPIC, ModelRegistry
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
    TensorSpec,
    TrafficSplit,
    VariantSplit,
    VersionRef,
)

__all__ = [
    "DEPLOYMENTS_TOPIC",
    "ROLES",
    "Approval",
    "ArtifactIntegrityError",
    "ArtifactStore",
    "AuditEntry",
    "DeployRequest",
    "Deployment",
    "Gate",
    "GateResult",
    "Lineage",
    "Model",
    "ModelRegistry",
    "ModelVersion",
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
