"""The small training setup several tests share: a ``stats`` feature group (``x``, ``y`` of
entity ``thing``, join key ``id``), rows for it, labels a day later (``target = 3x - y``) and
the job spec that trains a ridge regression on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService

__all__ = ["SPEC", "T0_US", "stats_definitions", "write_stats_job"]

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
