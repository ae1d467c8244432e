"""``carrara apply`` and ``carrara materialize`` on the embedded backends."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from carrara.cli import main
from carrara.config import load_settings
from carrara.feature_cache import FeatureService

DEFS = """
entities:
  - {name: driver, join_key: driver_id}
groups:
  - name: trips
    entity: driver
    ttl_days: 1
    features:
      - {name: fare_mean, dtype: float64}
      - {name: trip_count, dtype: int64}
"""


def test_apply_then_materialize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    defs = tmp_path / "features.yaml"
    defs.write_text(DEFS)
    assert main(["apply", str(defs), "--dry-run"]) == 0
    assert "group trips v1: created" in capsys.readouterr().out
    assert main(["apply", str(defs)]) == 0
    assert main(["apply", str(defs)]) == 0
    assert "group trips v1: unchanged" in capsys.readouterr().out
    defs.write_text(DEFS + "      - {name: tip_mean}\n")
    assert main(["apply", str(defs)]) == 0
    assert "group trips v2: new_version (added tip_mean)" in capsys.readouterr().out

    settings = load_settings()
    now_us = time.time_ns() // 1000
    with FeatureService.from_settings(settings) as svc:
        svc.write_offline(
            "trips",
            pd.DataFrame(
                {
                    "entity_id": ["a", "b"],
                    "event_timestamp": [now_us, now_us],
                    "fare_mean": [1.0, 2.0],
                    "trip_count": [1, 2],
                    "tip_mean": [0.5, 0.5],
                }
            ),
        )
        svc.publish(
            "trips",
            [
                {
                    "driver_id": "c",
                    "event_timestamp": now_us,
                    "fare_mean": 3.0,
                    "trip_count": 3,
                    "tip_mean": 0.1,
                }
            ],
        )
    assert main(["materialize", "trips", "--quiet"]) == 0
    assert "trips v2: 2 entities, 2 written" in capsys.readouterr().out
    assert main(["materialize", "--stream", "--until-idle"]) == 0
    assert "stream: 1 events, 1 rows, 1 online writes, 1 offline rows" in capsys.readouterr().out
    assert main(["materialize", "--stream", "--max-events", "1", "--max-seconds", "0.2"]) == 0
    # errors are one clear line and exit code 2
    assert main(["materialize", "nope"]) == 2
    assert "unknown feature group 'nope'" in capsys.readouterr().err


def test_materialize_explains_zero_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    defs = tmp_path / "features.yaml"
    defs.write_text(DEFS)
    assert main(["apply", str(defs)]) == 0
    old_us = time.time_ns() // 1000 - 3 * 86_400 * 1_000_000
    with FeatureService.from_settings(load_settings()) as svc:
        svc.write_offline(
            "trips",
            pd.DataFrame(
                {
                    "driver_id": ["a", "b"],
                    "event_timestamp": [old_us, old_us],
                    "fare_mean": [1.0, 2.0],
                    "trip_count": [1, 2],
                }
            ),
        )
    capsys.readouterr()
    assert main(["materialize", "trips", "--full", "--quiet"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "trips v1: 2 entities, 0 written, 2 expired: every row is older than the group's" in out
    assert "TTL of 1 day (newest event at " in out
