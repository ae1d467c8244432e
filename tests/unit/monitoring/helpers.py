"""Shared setup of the monitoring tests: one model, one-minute windows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from carrara.monitoring import ModelMonitorConfig
from carrara.monitoring.traffic import SyntheticModel, phased_records, publish, register_synthetic
from carrara.sql import Database
from carrara.types import PredictionRecord

__all__ = ["MODEL", "WINDOW_MS", "publish", "register", "traffic"]

WINDOW_MS = 60_000
MODEL = "churn"


def register(db: Database, sm: SyntheticModel, *, version: int = 1) -> float:
    """Profile the reference data; one-minute windows judged as soon as they end."""
    config = ModelMonitorConfig(window_ms=WINDOW_MS, allowed_lateness_ms=0)
    return register_synthetic(db, sm, model=MODEL, version=version, config=config)


def traffic(
    sm: SyntheticModel,
    phases: Sequence[tuple[int, Mapping[str, float]]],
    *,
    per_window: int,
    seed: int = 7,
    prefix: str = "r",
    version: int = 1,
) -> list[PredictionRecord]:
    return phased_records(
        sm,
        phases,
        model=MODEL,
        window_ms=WINDOW_MS,
        per_window=per_window,
        seed=seed,
        prefix=prefix,
        version=version,
    )
