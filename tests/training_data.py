"""The small training setups several tests (and benches) share: a ``stats`` feature group
(``x``, ``y`` of entity ``thing``, join key ``id``), rows for it, labels a day later
(``target = 3x - y``) and the job spec that trains a ridge regression on them; and
:func:`mlp_job`, a PyTorch classifier over a group ``g`` (``a``, ``b``) with the settings a
``carrara train worker`` subprocess needs (:func:`worker_env`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.training.spec import CheckpointSpec, DatasetSpec, JobSpec, ModelSpec, Resources

__all__ = ["SPEC", "T0_US", "mlp_job", "stats_definitions", "worker_env", "write_stats_job"]

T0_US = 1_780_000_000_000_000
DAY_US = 86_400_000_000

SPEC = """
model_name: score
dataset:
  features: ["stats:x", "stats:y"]
  label_source: labels.csv
  label_column: target
  entity_column: id
model: {estimator: ridge, task: regression}
"""


def stats_definitions() -> Definitions:
    return Definitions(
        entities=(Entity(name="thing", join_key="id"),),
        groups=(
            FeatureGroup(
                name="stats", entity="thing", features=(Feature(name="x"), Feature(name="y"))
            ),
        ),
    )


def write_stats_job(features: FeatureService, folder: Path, n: int, *, seed: int = 0) -> None:
    """Apply the group, ingest ``n`` rows, write ``folder/labels.csv`` and ``folder/job.yaml``."""
    rng = np.random.default_rng(seed)
    ids = [f"e{i}" for i in range(n)]
    rows = pd.DataFrame(
        {
            "id": ids,
            "event_timestamp": [T0_US] * n,
            "x": rng.normal(size=n),
            "y": rng.normal(size=n),
        }
    )
    features.apply(stats_definitions())
    features.ingest("stats", rows)
    labels = pd.DataFrame(
        {
            "id": ids,
            "event_timestamp": pd.to_datetime(T0_US + DAY_US, unit="us", utc=True),
            "target": 3 * rows["x"] - rows["y"],
        }
    )
    labels.to_csv(folder / "labels.csv", index=False)
    (folder / "job.yaml").write_text(SPEC)


def mlp_job(
    features: FeatureService,
    folder: Path,
    *,
    model_name: str,
    n: int,
    params: Mapping[str, Any],
    data_seed: int = 2,
    seed: int = 4,
    resources: Resources | None = None,
) -> JobSpec:
    """Group ``g`` (``a``, ``b`` of entity ``thing``) with ``n`` entities at T0, labels
    ``y = (a - 2b + noise > 0)`` a day later in ``folder/labels.parquet``, and the spec of a
    PyTorch MLP job over them (checkpoint every epoch, keep 2)."""
    features.apply(
        Definitions(
            entities=(Entity(name="thing", join_key="id"),),
            groups=(
                FeatureGroup(
                    name="g", entity="thing", features=(Feature(name="a"), Feature(name="b"))
                ),
            ),
        )
    )
    rng = np.random.default_rng(data_seed)
    ids = [f"e{i}" for i in range(n)]
    a, b = rng.normal(size=n), rng.normal(size=n)
    features.ingest("g", pd.DataFrame({"id": ids, "event_timestamp": [T0_US] * n, "a": a, "b": b}))
    pd.DataFrame(
        {
            "id": ids,
            "event_timestamp": T0_US + DAY_US + np.arange(n) * 1_000_000,
            "y": (a - 2 * b + rng.normal(size=n) * 0.5 > 0).astype(np.int64),
        }
    ).to_parquet(folder / "labels.parquet")
    return JobSpec(
        model_name=model_name,
        dataset=DatasetSpec(
            features=["g:a", "g:b"],
            label_source=str(folder / "labels.parquet"),
            label_column="y",
            entity_column="id",
        ),
        model=ModelSpec(framework="pytorch", estimator="mlp", params=dict(params)),
        resources=resources or Resources(),
        checkpoint=CheckpointSpec(every_epochs=1, keep=2),
        seed=seed,
    )


def worker_env(folder: Path, url: str) -> dict[str, str]:
    """Settings (environment) for a ``carrara train worker`` subprocess over a test's stores:
    registry/queue at ``url``, offline store, artifacts and event log under ``folder``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARRARA_")},
        "CARRARA_HOME": str(folder / "home"),
        "CARRARA_REGISTRY_URL": url,
        "CARRARA_OFFLINE_STORE_PATH": str(folder / "offline"),
        "CARRARA_ARTIFACT_PATH": str(folder / "artifacts"),
        "CARRARA_EVENT_LOG_URL": f"local:///{folder / 'events.db'}",
        "CARRARA_DATA_ROOTS": str(folder),  # the labels are written there
    }
