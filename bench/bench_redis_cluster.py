"""Keeps ``python -m bench.redis_cluster`` from rotting: a tiny run (it starts its own 3-master
cluster and standalone Redis; skipped without redis-server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.redis_cluster import main


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_cluster_quick(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    assert main(["--quick", "--processes", "1", "--json", str(out)]) == 0
    names = {r["name"]: r for r in json.loads(out.read_text())}
    for backend in ("standalone", "cluster"):
        for batch in (100, 1000):
            assert names[f"sdk_{backend}_{batch}"]["extra"]["lookups_per_s"] > 0
    assert {
        "layout_untagged_mget_nonatomic_1000",
        "layout_tags32_100",
        "layout_tags32_1000",
    } <= set(names)
