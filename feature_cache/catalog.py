"""The feature catalog: applied definitions, their versions, materialization watermarks and
training-set snapshots, in SQLite or PostgreSQL (``carrara.sql``).

Tables: ``feature_groups(group_id, name, version, entity_type, online_enabled,
offline_enabled, ttl_days, source, transform, ...)`` and ``features(feature_id, group_id, name,
dtype, description, owner_team, ...)``, plus ``feature_entities``,
``feature_materializations`` and ``feature_snapshots``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.feature_cache.definitions import Definitions, Entity, FeatureGroup
from carrara.sql import Database, Migration, Transaction, connect

__all__ = ["MIGRATIONS", "Catalog", "Change", "RegisteredGroup", "upgrade"]

COMPONENT = "feature_cache"

_ID = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgresql": "BIGSERIAL PRIMARY KEY"}


def _ddl(dialect: str) -> str:
    pk = _ID[dialect]
    return f"""
CREATE TABLE feature_entities (
    name TEXT PRIMARY KEY,
    join_key TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE feature_groups (
    group_id {pk},
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    entity_type TEXT NOT NULL REFERENCES feature_entities(name),
    online_enabled BOOLEAN NOT NULL,
    offline_enabled BOOLEAN NOT NULL,
    ttl_days DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    transform TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    owner_team TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL,
    definition_json TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE features (
    feature_id {pk},
    group_id BIGINT NOT NULL REFERENCES feature_groups(group_id),
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    owner_team TEXT NOT NULL DEFAULT '',
    UNIQUE (group_id, name)
);
CREATE TABLE feature_materializations (
    group_name TEXT NOT NULL,
    version INTEGER NOT NULL,
    watermark_us BIGINT NOT NULL,
    rows_written BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL,
    PRIMARY KEY (group_name, version)
);
CREATE TABLE feature_snapshots (
    snapshot_ref TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
)"""


MIGRATIONS = [
    Migration("0001_catalog", sqlite=_ddl("sqlite"), postgresql=_ddl("postgresql")),
]


def upgrade(url: str) -> list[str]:
    """Create or upgrade the catalog tables in the database at ``url``; returns the ids of
    the migrations applied now."""
    db = connect(url)
    try:
        return db.migrate(COMPONENT, MIGRATIONS)
    finally:
        db.close()


class RegisteredGroup(msgspec.Struct, frozen=True):
    """A feature group version as the catalog holds it."""

    group_id: int
    version: int
    definition: FeatureGroup
    entity: Entity
    fingerprint: str
    created_at_us: int

    @property
    def name(self) -> str:
        return self.definition.name


class Change(msgspec.Struct, frozen=True):
    """One line of an ``apply`` plan."""

    kind: Literal["entity", "group"]
    name: str
    action: Literal["created", "new_version", "updated", "unchanged"]
    version: int = 0
    detail: str = ""


def _now_us() -> int:
    return time.time_ns() // 1000


def _describe_diff(old: FeatureGroup, new: FeatureGroup) -> str:
    out = []
    old_f = {f.name: f for f in old.features}
    new_f = {f.name: f for f in new.features}
    added = [n for n in new_f if n not in old_f]
    removed = [n for n in old_f if n not in new_f]
    retyped = [
        f"{n} {old_f[n].dtype}->{new_f[n].dtype}"
        for n in new_f
        if n in old_f and old_f[n].dtype != new_f[n].dtype
    ]
    if added:
        out.append("added " + ", ".join(added))
    if removed:
        out.append("removed " + ", ".join(removed))
    if retyped:
        out.append("retyped " + ", ".join(retyped))
    if not (added or removed or retyped) and old.feature_names != new.feature_names:
        out.append("reordered features")
    for attr in ("entity", "source", "transform", "ttl_days", "online", "offline", "tile"):
        if getattr(old, attr) != getattr(new, attr):
            out.append(f"{attr} {getattr(old, attr)!r}->{getattr(new, attr)!r}")
    if old.aggregations != new.aggregations and not (added or removed):
        # Same output names, other semantics (a renamed function, another bucket column...).
        out.append("aggregations")
    if old.description != new.description or old.owner_team != new.owner_team:
        out.append("metadata")
    if [(f.description, f.owner_team) for f in old.features] != [
        (new_f[f.name].description, new_f[f.name].owner_team)
        for f in old.features
        if f.name in new_f
    ]:
        out.append("feature metadata")
    return "; ".join(out)


class Catalog:
    """Feature definitions and their versions in a SQL database."""

    def __init__(self, db: Database | str, *, migrate: bool = True) -> None:
        self._owned = isinstance(db, str)
        self.db = connect(db) if isinstance(db, str) else db
        if migrate:
            self.db.migrate(COMPONENT, MIGRATIONS)

    def close(self) -> None:
        if self._owned:
            self.db.close()

    # -- apply ------------------------------------------------------------------------------

    def apply(self, definitions: Definitions, *, dry_run: bool = False) -> list[Change]:
        """Store ``definitions``: a group whose data-shaping parts (features, dtypes, order,
        entity, source, transform; an aggregated group's aggregations and tile) changed gets
        a new version — old versions and their data
        stay as they were; metadata-only changes (descriptions, owners, TTL, online/offline
        flags) update the latest version in place. With ``dry_run`` nothing is written."""
        changes: list[Change] = []
        with self.db.transaction() as tx:
            if tx.dialect == "postgresql":
                tx.execute("SELECT pg_advisory_xact_lock(hashtext('carrara_feature_apply'))")
            for e in definitions.entities:
                row = tx.fetchone(
                    "SELECT join_key, description FROM feature_entities WHERE name = ?", (e.name,)
                )
                if row is None:
                    changes.append(Change("entity", e.name, "created"))
                    if not dry_run:
                        tx.execute(
                            "INSERT INTO feature_entities (name, join_key, description)"
                            " VALUES (?, ?, ?)",
                            (e.name, e.key, e.description),
                        )
                elif tuple(row) != (e.key, e.description):
                    if row[0] != e.key:
                        raise InvalidArgumentError(
                            f"entity {e.name!r} has join key {row[0]!r} in the catalog; changing "
                            f"it to {e.key!r} would break existing groups: define a new entity"
                        )
                    changes.append(Change("entity", e.name, "updated", detail="description"))
                    if not dry_run:
                        tx.execute(
                            "UPDATE feature_entities SET description = ? WHERE name = ?",
                            (e.description, e.name),
                        )
                else:
                    changes.append(Change("entity", e.name, "unchanged"))
            for g in definitions.groups:
                changes.append(self._apply_group(tx, g, dry_run))
        return changes

    def _apply_group(self, tx: Transaction, g: FeatureGroup, dry_run: bool) -> Change:
        latest = self._latest(tx, g.name)
        fingerprint = g.schema_fingerprint()
        if latest is None:
            if not dry_run:
                self._insert_group(tx, g, 1, fingerprint)
            return Change("group", g.name, "created", 1, ", ".join(g.feature_names))
        if latest.definition == g:
            return Change("group", g.name, "unchanged", latest.version)
        detail = _describe_diff(latest.definition, g)
        if latest.fingerprint != fingerprint:
            version = latest.version + 1
            if not dry_run:
                self._insert_group(tx, g, version, fingerprint)
            return Change("group", g.name, "new_version", version, detail)
        if not dry_run:
            tx.execute(
                "UPDATE feature_groups SET online_enabled = ?, offline_enabled = ?, ttl_days = ?,"
                " description = ?, owner_team = ?, definition_json = ? WHERE group_id = ?",
                (
                    g.online,
                    g.offline,
                    g.ttl_days,
                    g.description,
                    g.owner_team,
                    msgspec.json.encode(g).decode(),
                    latest.group_id,
                ),
            )
            for f in g.features:
                tx.execute(
                    "UPDATE features SET description = ?, owner_team = ?"
                    " WHERE group_id = ? AND name = ?",
                    (f.description, f.owner_team, latest.group_id, f.name),
                )
        return Change("group", g.name, "updated", latest.version, detail)

    def _insert_group(self, tx: Transaction, g: FeatureGroup, version: int, fp: str) -> None:
        if tx.fetchone("SELECT 1 FROM feature_entities WHERE name = ?", (g.entity,)) is None:
            raise NotFoundError(
                f"feature group {g.name!r} uses entity {g.entity!r}, which is not in the catalog;"
                " define it in the same apply"
            )
        cur = tx.execute(
            "INSERT INTO feature_groups (name, version, entity_type, online_enabled,"
            " offline_enabled, ttl_days, source, transform, description, owner_team,"
            " fingerprint, definition_json, created_at_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING group_id",
            (
                g.name,
                version,
                g.entity,
                g.online,
                g.offline,
                g.ttl_days,
                g.source,
                g.transform,
                g.description,
                g.owner_team,
                fp,
                msgspec.json.encode(g).decode(),
                _now_us(),
            ),
        )
        row = cur.fetchone()
        assert row is not None
        tx.executemany(
            "INSERT INTO features (group_id, position, name, dtype, description, owner_team)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (row[0], i, f.name, f.dtype, f.description, f.owner_team)
                for i, f in enumerate(g.features)
            ],
        )

    # -- lookups ----------------------------------------------------------------------------

    _SELECT = (
        "SELECT g.group_id, g.version, g.definition_json, g.fingerprint, g.created_at_us,"
        " e.name, e.join_key, e.description FROM feature_groups g"
        " JOIN feature_entities e ON e.name = g.entity_type"
    )

    @staticmethod
    def _row(row: Sequence[Any]) -> RegisteredGroup:
        definition = msgspec.json.decode(str(row[2]), type=FeatureGroup)
        entity = Entity(name=str(row[5]), join_key=str(row[6]), description=str(row[7]))
        return RegisteredGroup(
            int(row[0]),
            int(row[1]),
            definition,
            entity,
            str(row[3]),
            int(row[4]),
        )

    def _latest(self, tx: Transaction, name: str) -> RegisteredGroup | None:
        row = tx.fetchone(
            self._SELECT + " WHERE g.name = ? ORDER BY g.version DESC LIMIT 1", (name,)
        )
        return None if row is None else self._row(row)

    def get_group(self, name: str, version: int | None = None) -> RegisteredGroup:
        """A group version (the latest when ``version`` is None)."""
        with self.db.transaction() as tx:
            if version is None:
                found = self._latest(tx, name)
            else:
                row = tx.fetchone(
                    self._SELECT + " WHERE g.name = ? AND g.version = ?", (name, version)
                )
                found = None if row is None else self._row(row)
            if found is None:
                versions = [
                    r[0]
                    for r in tx.fetchall(
                        "SELECT version FROM feature_groups WHERE name = ? ORDER BY version",
                        (name,),
                    )
                ]
        if found is not None:
            return found
        if versions:
            raise NotFoundError(
                f"feature group {name!r} has no version {version}; known versions: "
                + ", ".join(map(str, versions))
            )
        known = ", ".join(g.name for g in self.list_groups()) or "(none; run carrara apply)"
        raise NotFoundError(f"unknown feature group {name!r}; known: {known}")

    def list_groups(self) -> list[RegisteredGroup]:
        """The latest version of every group, by name."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                self._SELECT + " WHERE g.version = (SELECT MAX(version) FROM feature_groups"
                " WHERE name = g.name) ORDER BY g.name"
            )
        return [self._row(r) for r in rows]

    def versions(self, name: str) -> list[int]:
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                "SELECT version FROM feature_groups WHERE name = ? ORDER BY version", (name,)
            )
        return [int(r[0]) for r in rows]

    # -- materialization state --------------------------------------------------------------

    def watermark(self, group: str, version: int) -> int:
        """``created_timestamp`` (µs) up to which offline rows were materialized; 0 = never."""
        with self.db.transaction() as tx:
            row = tx.fetchone(
                "SELECT watermark_us FROM feature_materializations"
                " WHERE group_name = ? AND version = ?",
                (group, version),
            )
        return 0 if row is None else int(row[0])

    def set_watermark(self, group: str, version: int, watermark_us: int, rows: int) -> None:
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO feature_materializations (group_name, version, watermark_us,"
                " rows_written, updated_at_us) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (group_name, version) DO UPDATE SET"
                " watermark_us = excluded.watermark_us,"
                " rows_written = feature_materializations.rows_written + excluded.rows_written,"
                " updated_at_us = excluded.updated_at_us",
                (group, version, watermark_us, rows, _now_us()),
            )

    # -- snapshots --------------------------------------------------------------------------

    def record_snapshot(self, ref: str, spec_json: str) -> None:
        """Remember what a training set was built from (idempotent)."""
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO feature_snapshots (snapshot_ref, spec_json, created_at_us)"
                " VALUES (?, ?, ?) ON CONFLICT (snapshot_ref) DO NOTHING",
                (ref, spec_json, _now_us()),
            )

    def snapshot(self, ref: str) -> str:
        with self.db.transaction() as tx:
            row = tx.fetchone(
                "SELECT spec_json FROM feature_snapshots WHERE snapshot_ref = ?", (ref,)
            )
        if row is None:
            raise NotFoundError(f"unknown dataset snapshot {ref!r}")
        return str(row[0])
