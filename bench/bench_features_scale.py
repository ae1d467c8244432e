"""Keeps ``python -m bench.features_scale`` from rotting: a tiny run on DuckDB (the Spark
engine's queries are covered by tests/unit/feature_cache/test_spark_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.features_scale import main


def test_features_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert main(["--quick", "--engines", "duckdb", "--json", str(out)]) == 0
    names = {r["name"]: r for r in json.loads(out.read_text())}
    assert {
        "pit_duckdb_2k_labels_x_20k_rows",
        "agg_backfill_duckdb_2k_labels_x_20k_events",
        "agg_now_duckdb_2k_entities_x_20k_events",
        "stream_throughput_5k_events",
        "stream_freshness_100_per_s",
    } <= set(names)
    assert names["stream_throughput_5k_events"]["extra"]["events_per_s"] > 0
    assert names["stream_freshness_100_per_s"]["extra"]["events"] >= 100
