"""`carrara train submit | list | status | cancel | worker --until-idle` on SQLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from carrara.cli import main
from carrara.config import load_settings
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.registry.registry import ModelRegistry

DAY_US = 86_400_000_000
T0_US = 1_780_000_000_000_000

SPEC = """
model_name: score
dataset:
  features: ["stats:x", "stats:y"]
  label_source: labels.csv
  label_column: target
  entity_column: id
model: {estimator: ridge, task: regression}
"""


def test_train_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CARRARA_CONFIG", raising=False)
    monkeypatch.delenv("CARRARA_REGISTRY_URL", raising=False)
    monkeypatch.delenv("CARRARA_EVENT_LOG_URL", raising=False)
    rng = np.random.default_rng(0)
    ids = [f"e{i}" for i in range(80)]
    rows = pd.DataFrame(
        {
            "id": ids,
            "event_timestamp": [T0_US] * len(ids),
            "x": rng.normal(size=len(ids)),
            "y": rng.normal(size=len(ids)),
        }
    )
    with FeatureService.from_settings(load_settings()) as features:
        features.apply(
            Definitions(
                entities=(Entity(name="thing", join_key="id"),),
                groups=(
                    FeatureGroup(
                        name="stats",
                        entity="thing",
                        features=(Feature(name="x"), Feature(name="y")),
                    ),
                ),
            )
        )
        features.ingest("stats", rows)
    labels = pd.DataFrame(
        {
            "id": ids,
            "event_timestamp": pd.to_datetime(T0_US + DAY_US, unit="us", utc=True),
            "target": 3 * rows["x"] - rows["y"],
        }
    )
    labels.to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "job.yaml").write_text(SPEC)
    (tmp_path / "bad.yaml").write_text(SPEC.replace("stats:y", "stats:nope"))

    assert main(["train", "submit", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown feature 'stats:nope'" in capsys.readouterr().err
    assert main(["train", "submit", str(tmp_path / "job.yaml")]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["train", "submit", str(tmp_path / "job.yaml")]) == 0
    other = capsys.readouterr().out.strip()
    assert main(["train", "cancel", other]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert main(["train", "list", "--state", "QUEUED"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["train", "worker", "--until-idle"]) == 0
    assert "SUCCEEDED  score  -> score v1" in capsys.readouterr().out
    assert main(["train", "status", job_id]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out

    settings = load_settings()
    with ModelRegistry.open(settings.resolved_registry_url, settings.resolved_artifact_path) as r:
        v = r.get_version("score", 1)
        assert v.run_id == job_id and v.metrics["rmse"] < 0.2
