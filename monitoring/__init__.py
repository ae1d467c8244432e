"""Monitoring: prediction-log consumer, drift and performance checks, alerts, metrics."""

__all__: list[str] = []
