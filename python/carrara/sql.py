"""A narrow SQL connector shared by the registry and the feature catalog.

One interface (:class:`Database`) over SQLite (embedded default) and PostgreSQL (psycopg 3
with a pool), chosen by URL scheme (:data:`DATABASES`; a plug-in by class path), plus a
numbered-migration runner. Callers write SQL with ``?`` placeholders; on PostgreSQL they are
turned into ``%s``. Dialect-specific DDL goes in a :class:`Migration` per dialect.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from carrara.errors import ConfigError, UnavailableError
from carrara.plugins import StoreKind

__all__ = [
    "DATABASES",
    "Cursor",
    "Database",
    "Dialect",
    "Migration",
    "PostgresDatabase",
    "SQLiteDatabase",
    "Transaction",
    "connect",
]

Dialect = Literal["sqlite", "postgresql"]
Row = tuple[Any, ...]


class Cursor(Protocol):
    """The part of a DB-API cursor the parts use."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...


class Migration(msgspec.Struct, frozen=True):
    """One schema step. ``sql`` is run as is on both dialects unless a per-dialect text is set;
    several statements are separated by ``;`` at line ends."""

    id: str
    sql: str = ""
    sqlite: str | None = None
    postgresql: str | None = None

    def text(self, dialect: Dialect) -> str:
        chosen = self.sqlite if dialect == "sqlite" else self.postgresql
        return chosen if chosen is not None else self.sql


_PLACEHOLDER = re.compile(r"\?")


class Transaction:
    """Statements run inside one transaction (see :meth:`Database.transaction`)."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect: Dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Cursor:
        if self.dialect == "postgresql":
            sql = _PLACEHOLDER.sub("%s", sql)
        cur: Cursor = self._conn.execute(sql, params)
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.dialect == "postgresql":
            sql = _PLACEHOLDER.sub("%s", sql)
            with self._conn.cursor() as cur:
                cur.executemany(sql, rows)
        else:
            self._conn.executemany(sql, rows)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self.execute(sql, params).fetchone()

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self.execute(sql, params).fetchall()


class Database(ABC):
    """A database behind one transaction API (the interface the registry, catalog, queue and
    monitoring stores use). Plug-ins speak one of the two SQL dialects the parts know."""

    url: str
    dialect: Dialect

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, *, pool_size: int = 8) -> Database:
        """Open the database ``url`` names (``pool_size``: most connections held)."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- migrations -----------------------------------------------------------------------

    def migrate(self, component: str, migrations: Sequence[Migration]) -> list[str]:
        """Apply, in order, the migrations of ``component`` not applied yet; returns their ids.

        Each runs in its own transaction together with its bookkeeping row, so a failed step
        leaves the schema at the previous one. Safe to call from several processes at once.
        """
        ids = [m.id for m in migrations]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate migration ids in {component}: {ids}")
        with self.transaction() as tx:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS carrara_migrations ("
                " component TEXT NOT NULL, migration_id TEXT NOT NULL, applied_at TEXT NOT NULL,"
                " PRIMARY KEY (component, migration_id))"
            )
        applied: list[str] = []
        for m in migrations:
            with self.transaction() as tx:
                if self.dialect == "postgresql":
                    # Serialize concurrent upgraders on this component.
                    tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (component,))
                done = tx.fetchone(
                    "SELECT 1 FROM carrara_migrations WHERE component = ? AND migration_id = ?",
                    (component, m.id),
                )
                if done is not None:
                    continue
                for statement in _split_statements(m.text(self.dialect)):
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO carrara_migrations (component, migration_id, applied_at)"
                    " VALUES (?, ?, CURRENT_TIMESTAMP)",
                    (component, m.id),
                )
                applied.append(m.id)
        return applied

    def applied_migrations(self, component: str) -> list[str]:
        with self.transaction() as tx:
            exists = (
                tx.fetchone("SELECT name FROM sqlite_master WHERE name = 'carrara_migrations'")
                if self.dialect == "sqlite"
                else tx.fetchone("SELECT to_regclass('carrara_migrations')")
            )
            if exists is None or exists[0] is None:
                return []
            rows = tx.fetchall(
                "SELECT migration_id FROM carrara_migrations WHERE component = ?"
                " ORDER BY migration_id",
                (component,),
            )
        return [r[0] for r in rows]


class SQLiteDatabase(Database):
    """A SQLite file (one connection per thread) or an in-memory database (one shared
    connection)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = "sqlite"
        path = url.removeprefix("sqlite://").removeprefix("/") if url != "sqlite://" else ""
        # sqlite:///relative.db -> "relative.db"; sqlite:////abs/path.db -> "/abs/path.db";
        # sqlite:// or sqlite:///:memory: -> an in-memory database (one shared connection).
        self._path = path or ":memory:"
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._memory_conn: sqlite3.Connection | None = None
        self._memory_lock = threading.RLock()

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 8) -> SQLiteDatabase:
        return cls(url)

    def _sqlite_conn(self) -> sqlite3.Connection:
        if self._path == ":memory:":
            if self._memory_conn is None:
                self._memory_conn = sqlite3.connect(
                    ":memory:", check_same_thread=False, isolation_level=None
                )
            return self._memory_conn
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE, which
            # takes the write lock up front so concurrent writers queue instead of deadlocking.
            conn = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        lock = self._memory_lock if self._path == ":memory:" else None
        if lock is not None:
            lock.acquire()
        try:
            conn = self._sqlite_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(conn, "sqlite")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if lock is not None:
                lock.release()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._memory_conn is not None:
            self._memory_conn.close()
            self._memory_conn = None


class PostgresDatabase(Database):
    """A PostgreSQL connection pool (psycopg 3)."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = url
        self.dialect = "postgresql"
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - the platform extra installs it
            raise ConfigError(
                "PostgreSQL needs psycopg[pool]: pip install carrara[platform]"
            ) from exc
        # Each checkout is checked (a session killed by pg_terminate_backend or a server
        # restart is replaced, not handed out), and waiting for one is bounded.
        check = getattr(ConnectionPool, "check_connection", None)
        extra: dict[str, Any] = {"check": check} if check is not None else {}
        self._pool: Any = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=5.0,
            kwargs={"autocommit": False},
            **extra,
        )
        try:
            self._pool.open(wait=True, timeout=10)
        except Exception as exc:
            self._pool.close()
            raise UnavailableError(f"cannot connect to PostgreSQL at {url}: {exc}") from exc

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 8) -> PostgresDatabase:
        return cls(url, pool_size=pool_size)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn, conn.transaction():
                yield Transaction(conn, "postgresql")
        except (PoolTimeout, psycopg.OperationalError) as exc:
            # A dropped session or a server restart: retryable (503), and the pool replaces
            # the connection on its next checkout.
            raise UnavailableError(f"the database is unreachable: {exc}") from exc

    def close(self) -> None:
        self._pool.close()


def _split_statements(sql: str) -> list[str]:
    return [s.strip() for s in re.split(r";\s*\n", sql.strip() + "\n") if s.strip().rstrip(";")]


#: Database backends by URL scheme; any other is a class path in place of the scheme.
DATABASES: StoreKind[Database] = StoreKind(
    "database", Database, examples="sqlite:///path or postgresql://..."
)
DATABASES.register("sqlite", SQLiteDatabase.from_url)
DATABASES.register("postgresql", PostgresDatabase.from_url)
DATABASES.register("postgres", PostgresDatabase.from_url)


def connect(url: str, *, pool_size: int = 8) -> Database:
    """Open a database by URL: ``sqlite:///path``, ``sqlite://`` (memory),
    ``postgresql://...`` or a plug-in (``package.module:ClassName://...``, built by its
    ``from_url``)."""
    return DATABASES.open(url, pool_size=pool_size)
