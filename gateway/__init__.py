"""Serving gateway: gRPC + HTTP fronts, model backends, routing policies, prediction logging."""

__all__: list[str] = []
