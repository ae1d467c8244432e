"""Definitions as code: validation, YAML and Python loading, transforms."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, load_definitions
from carrara.feature_cache.definitions import resolve_transform, transform


def test_bad_definitions_explain_the_fix() -> None:
    with pytest.raises(InvalidArgumentError, match="dtype 'float16'; known: float32"):
        Feature(name="x", dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="reserved"):
        Feature(name="entity_id")
    with pytest.raises(InvalidArgumentError, match="invalid feature group name"):
        FeatureGroup(name="Bad-Name", entity="e", features=(Feature(name="a"),))
    with pytest.raises(InvalidArgumentError, match="declares a more than once"):
        FeatureGroup(name="g", entity="e", features=(Feature(name="a"), Feature(name="a")))
    with pytest.raises(InvalidArgumentError, match="entity 'nope', which is not defined"):
        Definitions(
            entities=(Entity(name="e"),),
            groups=(FeatureGroup(name="g", entity="nope", features=(Feature(name="a"),)),),
        )
    g = FeatureGroup(name="g", entity="e", features=(Feature(name="a"), Feature(name="b")))
    with pytest.raises(NotFoundError, match="has no feature 'c'; known: a, b"):
        g.feature("c")


def test_yaml_definitions_load(tmp_path: Path) -> None:
    path = tmp_path / "features.yaml"
    path.write_text(
        """
entities:
  - {name: driver, join_key: driver_id}
groups:
  - name: trips
    entity: driver
    ttl_days: 1.5
    owner_team: pricing
    features:
      - {name: fare_mean, dtype: float64, description: mean fare}
      - {name: trip_count, dtype: int64}
"""
    )
    defs = load_definitions(path)
    assert defs.entities[0].key == "driver_id"
    (g,) = defs.groups
    assert g.feature_names == ("fare_mean", "trip_count")
    assert g.ttl_us == int(1.5 * 86400e6)
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [{name: g}]")
    with pytest.raises(InvalidArgumentError, match="invalid definitions"):
        load_definitions(bad)


def test_python_definitions_load(tmp_path: Path) -> None:
    path = tmp_path / "defs.py"
    path.write_text(
        "from carrara.feature_cache import Entity, Feature, FeatureGroup\n"
        "driver = Entity(name='driver')\n"
        "trips = FeatureGroup(name='trips', entity='driver', features=(Feature(name='a'),))\n"
    )
    defs = load_definitions(path)
    assert [e.name for e in defs.entities] == ["driver"]
    assert [g.name for g in defs.groups] == ["trips"]
    with pytest.raises(NotFoundError):
        load_definitions(tmp_path / "missing.py")


def test_transforms_resolve_by_name_or_import_path() -> None:
    @transform("double_fare")
    def double(df: pd.DataFrame) -> pd.DataFrame:
        return df.assign(fare=df["fare"] * 2)

    assert resolve_transform("double_fare") is double
    assert resolve_transform("") is None
    assert resolve_transform("json:dumps") is not None
    with pytest.raises(NotFoundError, match="unknown transform 'nope'"):
        resolve_transform("nope")
    with pytest.raises(NotFoundError, match="cannot import"):
        resolve_transform("no_such_module:fn")
