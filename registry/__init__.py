"""Model registry: versions, lineage, evaluation gates, approvals, deployments."""

__all__: list[str] = []
