"""Keeps ``python -m bench.multi_node`` from rotting: one tiny job on one rank of each of two
nodes (the 2-node path's values are checked in tests/integration/training/test_multi_node.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.multi_node import main


@pytest.mark.timeout(300)
def test_multi_node_quick(tmp_path: Path) -> None:
    out = tmp_path / "nodes.json"
    # The 2-node configuration only (the others are the single-node paths other tests run).
    # The bench's own timeout comes first, so a stuck job fails with its log and the workers'.
    args = ["--quick", "--configs", "2x1", "--timeout", "240", "--json", str(out)]
    assert main(args) == 0
    names = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(names) == {"train_2x1_ranks_400_rows"}
    assert all(r["median_ns"] > 0 and r["extra"]["epochs"] == 2 for r in names.values())
