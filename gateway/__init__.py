"""Serving gateway: gRPC + HTTP fronts, model backends, routing policies, prediction logging."""

from carrara.gateway.embedded import Embedded
from carrara.gateway.engine import ModelDeployment, PredictionResult, ServingEngine, VariantSpec

__all__ = ["Embedded", "ModelDeployment", "PredictionResult", "ServingEngine", "VariantSpec"]
