"""Keeps ``python -m bench.multi_node`` from rotting: one tiny job on one rank of each of two
nodes (the 2-node path's values are checked in tests/integration/training/test_multi_node.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.multi_node import main


def test_multi_node_quick(tmp_path: Path) -> None:
    out = tmp_path / "nodes.json"
    # The 2-node configuration only (the others are the single-node paths other tests run).
    assert main(["--quick", "--configs", "2x1", "--json", str(out)]) == 0
    names = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(names) == {"train_2x1_ranks_400_rows"}
    assert all(r["median_ns"] > 0 and r["extra"]["epochs"] == 2 for r in names.values())
