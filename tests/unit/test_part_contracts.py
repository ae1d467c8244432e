"""The seams between parts: one table of topic names, and parts that use each other only
through what the other part exports.

Both are source checks (AST), so a new module that spells a topic name or reaches into another
part's internals fails here rather than drifting unnoticed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from carrara.eventlog import DEFAULT_TOPIC_MAXLEN
from carrara.types import TOPICS, Topic

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("feature_cache", "training", "registry", "gateway", "monitoring")
#: Event-log methods whose first argument is a topic.
TOPIC_METHODS = {"append", "append_many", "read", "read_after", "ack", "pending_count"}


def _modules() -> list[tuple[str, Path]]:
    found = [(part, path) for part in PARTS for path in sorted((ROOT / part).rglob("*.py"))]
    found += [("kernel", path) for path in sorted((ROOT / "python" / "carrara").rglob("*.py"))]
    return [(part, path) for part, path in found if "/v1/" not in str(path)]


def test_every_topic_has_a_writer_a_reader_and_one_name() -> None:
    assert set(TOPICS) == set(Topic)
    for topic, info in TOPICS.items():
        assert info.writers and info.readers, topic
    assert len({str(t) for t in Topic}) == len(Topic)
    # The event log's default caps come from the table, not a second list.
    assert DEFAULT_TOPIC_MAXLEN == {"predictions": 1_000_000}


def test_no_module_spells_a_topic_name() -> None:
    names = {str(t) for t in Topic}
    spelled = []
    for _, path in _modules():
        if path.name == "types.py" and path.parent.name == "carrara":
            continue  # the table itself
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in TOPIC_METHODS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in names
            ):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if node.value.value in names and any("TOPIC" in t for t in targets):
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert spelled == [], f"use carrara.types.Topic instead of a literal topic name: {spelled}"


@pytest.mark.parametrize("part", PARTS)
def test_parts_use_each_other_only_through_exports(part: str) -> None:
    """A module of one part imports from another part only names that part's package exports
    (its ``__all__``): helpers shared by several parts belong in the kernel (``carrara.*``)."""
    leaks = []
    for owner, path in _modules():
        if owner != part:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            pieces = node.module.split(".")
            if len(pieces) < 2 or pieces[0] != "carrara" or pieces[1] not in PARTS:
                continue
            other = pieces[1]
            if other == part:
                continue
            exported = set(importlib.import_module(f"carrara.{other}").__all__)
            for alias in node.names:
                if alias.name not in exported:
                    leaks.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
                    )
    assert leaks == [], f"not exported by the part it comes from: {leaks}"
