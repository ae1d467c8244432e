"""carrara.sql: one connector and migration runner over SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from carrara.errors import ConfigError
from carrara.sql import Database, Migration, connect

MIGRATIONS = [
    Migration(
        "0001",
        sqlite="CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE);\n"
        "CREATE INDEX items_name ON items(name);",
        postgresql="CREATE TABLE items (id BIGSERIAL PRIMARY KEY, name TEXT UNIQUE);\n"
        "CREATE INDEX items_name ON items(name);",
    ),
    Migration("0002", sql="ALTER TABLE items ADD COLUMN n INTEGER NOT NULL DEFAULT 0"),
]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = connect(url)
    yield database
    database.close()


def test_migrations_apply_once_in_order(db: Database) -> None:
    assert db.migrate("items", MIGRATIONS) == ["0001", "0002"]
    assert db.migrate("items", MIGRATIONS) == []
    assert db.applied_migrations("items") == ["0001", "0002"]
    assert db.applied_migrations("other") == []
    with db.transaction() as tx:
        tx.execute("INSERT INTO items (name, n) VALUES (?, ?)", ("a", 3))
        assert tx.fetchall("SELECT name, n FROM items") == [("a", 3)]


def test_failed_transaction_rolls_back(db: Database) -> None:
    db.migrate("items", MIGRATIONS)
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO items (name) VALUES (?)", ("x",))
        raise RuntimeError("boom")
    with db.transaction() as tx:
        assert tx.fetchall("SELECT name FROM items") == []


def test_failed_migration_leaves_previous_schema(db: Database) -> None:
    bad = [*MIGRATIONS, Migration("0003", sql="ALTER TABLE nope ADD COLUMN y INTEGER")]
    with pytest.raises(Exception, match="nope"):
        db.migrate("items", bad)
    assert db.applied_migrations("items") == ["0001", "0002"]


def test_concurrent_increments_are_serialized(db: Database) -> None:
    db.migrate("items", MIGRATIONS)
    with db.transaction() as tx:
        tx.execute("INSERT INTO items (name, n) VALUES ('c', 0)")

    def bump() -> None:
        for _ in range(10):
            with db.transaction() as tx:
                row = tx.fetchone(
                    "SELECT n FROM items WHERE name = 'c' FOR UPDATE"
                    if tx.dialect == "postgresql"
                    else "SELECT n FROM items WHERE name = 'c'"
                )
                assert row is not None
                tx.execute("UPDATE items SET n = ? WHERE name = 'c'", (row[0] + 1,))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.transaction() as tx:
        assert tx.fetchone("SELECT n FROM items WHERE name = 'c'") == (40,)


def test_unsupported_url() -> None:
    with pytest.raises(ConfigError, match="unsupported database URL"):
        connect("mysql://x")


def test_duplicate_migration_ids(tmp_path: Path) -> None:
    with connect(f"sqlite:///{tmp_path / 'd.db'}") as db, pytest.raises(ConfigError):
        db.migrate("x", [Migration("1", sql="SELECT 1"), Migration("1", sql="SELECT 1")])
