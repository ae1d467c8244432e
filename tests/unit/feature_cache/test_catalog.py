"""The catalog: apply diffs definitions and versions groups (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.feature_cache import Catalog, Definitions, Feature, upgrade
from carrara.feature_cache.catalog import MIGRATIONS


def test_apply_creates_then_is_a_no_op(service: Any, definitions: Definitions) -> None:
    changes = service.apply(definitions)
    assert [(c.kind, c.name, c.action, c.version) for c in changes] == [
        ("entity", "driver", "created", 0),
        ("entity", "rider", "created", 0),
        ("group", "trips", "created", 1),
        ("group", "ratings", "created", 1),
    ]
    again = service.apply(definitions)
    assert {c.action for c in again} == {"unchanged"}
    g = service.catalog.get_group("trips")
    assert g.version == 1 and g.definition == definitions.groups[0]
    assert g.entity.key == "driver_id"
    assert [x.name for x in service.catalog.list_groups()] == ["ratings", "trips"]


def test_feature_changes_make_a_new_version_and_keep_the_old(
    service: Any, definitions: Definitions, fc: Any
) -> None:
    service.apply(definitions)
    old = service.catalog.get_group("trips")
    new_group = fc.trips_group(features=(*old.definition.features, Feature(name="tip_mean")))
    plan = service.apply(
        Definitions(entities=definitions.entities, groups=(new_group,)), dry_run=True
    )
    assert plan[-1].action == "new_version" and plan[-1].version == 2
    assert service.catalog.versions("trips") == [1]  # dry run wrote nothing
    changes = service.apply(Definitions(entities=definitions.entities, groups=(new_group,)))
    assert (changes[-1].action, changes[-1].version, changes[-1].detail) == (
        "new_version",
        2,
        "added tip_mean",
    )
    assert service.catalog.versions("trips") == [1, 2]
    assert service.catalog.get_group("trips", 1).definition == old.definition
    assert service.catalog.get_group("trips").definition.feature_names[-1] == "tip_mean"
    # A dtype change is also a new version.
    retyped = fc.trips_group(
        features=(Feature(name="fare_mean", dtype="float32"), *new_group.features[1:])
    )
    c = service.apply(Definitions(entities=definitions.entities, groups=(retyped,)))[-1]
    assert c.action == "new_version" and "retyped fare_mean float64->float32" in c.detail


def test_metadata_changes_update_in_place(service: Any, definitions: Definitions, fc: Any) -> None:
    service.apply(definitions)
    changed = fc.trips_group(ttl_days=7.0, description="trip stats", online=False)
    c = service.apply(Definitions(entities=definitions.entities, groups=(changed,)))[-1]
    assert (c.action, c.version) == ("updated", 1)
    g = service.catalog.get_group("trips")
    assert g.version == 1 and g.definition.ttl_days == 7.0 and not g.definition.online


def test_lookups_name_what_exists(service: Any, definitions: Definitions) -> None:
    service.apply(definitions)
    with pytest.raises(NotFoundError, match="unknown feature group 'trip'; known: ratings, trips"):
        service.catalog.get_group("trip")
    with pytest.raises(NotFoundError, match="no version 9; known versions: 1"):
        service.catalog.get_group("trips", 9)


def test_entity_join_key_cannot_change(service: Any, definitions: Definitions, fc: Any) -> None:
    service.apply(definitions)
    moved = msgspec.structs.replace(fc.DRIVER, join_key="driver_uuid")
    with pytest.raises(InvalidArgumentError, match="define a new entity"):
        service.apply(Definitions(entities=(moved,)))


def test_watermarks_and_snapshots(service: Any) -> None:
    cat = service.catalog
    assert cat.watermark("trips", 1) == 0
    cat.set_watermark("trips", 1, 123, 5)
    cat.set_watermark("trips", 1, 456, 5)
    assert cat.watermark("trips", 1) == 456
    cat.record_snapshot("ds-1", '{"a": 1}')
    cat.record_snapshot("ds-1", '{"a": 1}')
    assert cat.snapshot("ds-1") == '{"a": 1}'
    with pytest.raises(NotFoundError):
        cat.snapshot("ds-2")


def test_upgrade_applies_migrations_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert upgrade(url) == [m.id for m in MIGRATIONS]
    assert upgrade(url) == []
    cat = Catalog(url)
    assert cat.list_groups() == []
    cat.close()


@pytest.mark.integration
def test_upgrade_on_postgresql(postgres_url: str) -> None:
    assert upgrade(postgres_url) == [m.id for m in MIGRATIONS]
    assert upgrade(postgres_url) == []
