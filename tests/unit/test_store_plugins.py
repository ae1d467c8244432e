"""Store plug-ins (``carrara.plugins``): a class named by class path in the settings or the
URL is the store each part uses (database, online store, event log, offline engine); unknown
schemes and bad class paths are ConfigErrors that say what to write; the built-in schemes
still open the built-in classes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

import carrara
from carrara.config import Settings, load_settings
from carrara.core import FeatureVector
from carrara.errors import ConfigError
from carrara.eventlog import EVENT_LOGS, EventLog, LocalEventLog, RedisEventLog, open_event_log
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.feature_cache.offline_store import (
    OFFLINE_ENGINES,
    AsOfJoin,
    DuckDBOfflineStore,
    LatestRows,
    OfflineStore,
    open_offline_store,
)
from carrara.feature_cache.online_store import (
    ONLINE_STORES,
    EmbeddedOnlineStore,
    OnlineStore,
    RedisOnlineStore,
    open_online_store,
    url_namespace,
)
from carrara.plugins import StoreKind, is_class_path
from carrara.sql import DATABASES, Database, Migration, PostgresDatabase, SQLiteDatabase, connect

HERE = __name__
DAY_US = 86_400_000_000


# -- plug-ins ---------------------------------------------------------------------------------


class FixedOnlineStore(OnlineStore):
    """Serves ``[len(entity_id), 7]`` for every key of any group (read-only)."""

    urls: ClassVar[list[str]] = []

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.closed = False

    @classmethod
    def from_url(cls, url: str) -> FixedOnlineStore:
        cls.urls.append(url)
        return cls(url_namespace(url))

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            group, version, entity = key.removeprefix(f"{self.namespace}:").split(":", 2)
            values = np.array([len(entity), 7], np.float32)
            out.append(FeatureVector(entity, group, int(version), values, None, 1, 1).encode())
        return out

    def set_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> None:
        raise AssertionError("read-only")

    def delete_many(self, keys: Sequence[str]) -> None:
        raise AssertionError("read-only")

    def close(self) -> None:
        self.closed = True


class RecordingEventLog(LocalEventLog):
    """The in-memory local log, remembering the URL it was opened with."""

    urls: ClassVar[list[str]] = []

    @classmethod
    def from_url(cls, url: str) -> RecordingEventLog:
        cls.urls.append(url)
        return cls(None)


class FileDatabase(SQLiteDatabase):
    """SQLite under another scheme: ``{HERE}:FileDatabase:///abs/path.db``."""

    urls: ClassVar[list[str]] = []

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 8) -> FileDatabase:
        cls.urls.append(url)
        return cls("sqlite:///" + url.partition("://")[2])


class RecordingOfflineStore(DuckDBOfflineStore):
    """The DuckDB engine, recording which interface methods the parts call."""

    calls: ClassVar[list[str]] = []

    @classmethod
    def from_url(cls, root: str) -> RecordingOfflineStore:
        cls.calls.append(f"from_url {root}")
        return cls(root)

    def append(self, group: Any, data: Any, *, created_us: int | None = None) -> int:
        self.calls.append(f"append {group.name}")
        return super().append(group, data, created_us=created_us)

    def as_of_join(
        self, labels: Any, joins: Sequence[AsOfJoin], *, threads: int | None = None
    ) -> Any:
        self.calls.append("as_of_join " + ",".join(j.group.name for j in joins))
        return super().as_of_join(labels, joins, threads=threads)

    def close(self) -> None:
        self.calls.append("close")


class NotAStore:
    @classmethod
    def from_url(cls, url: str) -> NotAStore:
        return cls()


class HalfStore(OnlineStore):
    """Forgets most of the interface."""

    @classmethod
    def from_url(cls, url: str) -> HalfStore:
        raise AssertionError("never built")


@pytest.fixture(autouse=True)
def _reset_records() -> None:
    for cls in (FixedOnlineStore, RecordingEventLog, FileDatabase):
        cls.urls.clear()
    RecordingOfflineStore.calls.clear()


def _definitions() -> Definitions:
    return Definitions(
        entities=(Entity(name="user", join_key="user_id"),),
        groups=(
            FeatureGroup(
                name="activity",
                entity="user",
                ttl_days=30,
                features=(Feature(name="a"), Feature(name="b")),
            ),
        ),
    )


# -- every kind through the platform ----------------------------------------------------------


def test_platform_uses_the_plugins_its_settings_name(tmp_path: Path) -> None:
    settings = load_settings(
        env={
            "CARRARA_HOME": str(tmp_path / "home"),
            "CARRARA_REGISTRY_URL": f"{HERE}:FileDatabase://{tmp_path / 'reg.db'}",
            "CARRARA_ONLINE_STORE_URL": f"{HERE}.FixedOnlineStore://?namespace=ns",
            "CARRARA_EVENT_LOG_URL": f"{HERE}:RecordingEventLog://anywhere",
            "CARRARA_OFFLINE_ENGINE": f"{HERE}:RecordingOfflineStore",
        }
    )
    assert settings.offline_engine == f"{HERE}:RecordingOfflineStore"
    with carrara.Platform.open(settings) as p:
        assert type(p.features.online) is FixedOnlineStore
        assert p.features.online.namespace == "ns"
        assert type(p.events) is RecordingEventLog
        assert type(p.features.offline) is RecordingOfflineStore
        assert isinstance(p.monitor.db, FileDatabase)
        p.features.apply(_definitions())
        got = p.features.get_online("activity", ["u1", "user-2"])
        assert got.found.all()
        np.testing.assert_array_equal(got.values, [[2, 7], [6, 7]])
        rows = pd.DataFrame(
            {
                "user_id": ["u1", "u1"],
                "event_timestamp": pd.to_datetime([1, 3], unit="D", utc=True),
                "a": [1.0, 2.0],
                "b": [3.0, 4.0],
            }
        )
        assert p.features.write_offline("activity", rows) == 2
        labels = pd.DataFrame(
            {"user_id": ["u1", "u1"], "event_timestamp": pd.to_datetime([2, 4], unit="D", utc=True)}
        )
        ts = p.features.get_training_set(labels, ["activity:a"]).to_pandas()
        assert ts["activity__a"].tolist() == [1.0, 2.0]
        p.events.append("alerts", b"x")
        assert p.events.read_after("alerts", None)[0].payload == b"x"
    assert FixedOnlineStore.urls == [f"{HERE}.FixedOnlineStore://?namespace=ns"]
    assert RecordingEventLog.urls == [f"{HERE}:RecordingEventLog://anywhere"]
    # One database per part that keeps tables (registry, catalog, queue, monitoring).
    assert FileDatabase.urls and set(FileDatabase.urls) == {settings.resolved_registry_url}
    assert (tmp_path / "reg.db").is_file()
    assert RecordingOfflineStore.calls == [
        f"from_url {tmp_path / 'home' / 'offline'}",
        "append activity",
        "as_of_join activity",
        "close",
    ]


def test_feature_service_open_takes_an_online_plugin_and_its_namespace(tmp_path: Path) -> None:
    with FeatureService.open(
        catalog_url=f"sqlite:///{tmp_path / 'c.db'}",
        offline_path=str(tmp_path / "offline"),
        online_url=f"{HERE}:FixedOnlineStore://?namespace=url&x=1",
        namespace="given",
    ) as svc:
        assert isinstance(svc.online, FixedOnlineStore)
        assert svc.online.namespace == "given"
        assert isinstance(svc.offline, DuckDBOfflineStore)
        svc.apply(_definitions())
        assert svc.get_online("activity", ["abc"]).to_dicts() == [{"a": 3.0, "b": 7.0}]
    assert url_namespace(FixedOnlineStore.urls[0]) == "given"
    assert "x=1" in FixedOnlineStore.urls[0]


def test_database_plugin_by_url(tmp_path: Path) -> None:
    with connect(f"{HERE}:FileDatabase://{tmp_path / 'd.db'}") as db:
        assert isinstance(db, FileDatabase)
        assert db.migrate("t", [Migration("0001", "CREATE TABLE t (x INTEGER)")]) == ["0001"]
        with db.transaction() as tx:
            tx.execute("INSERT INTO t VALUES (?)", (5,))
    with connect(f"sqlite:///{tmp_path / 'd.db'}") as db, db.transaction() as tx:
        assert tx.fetchall("SELECT x FROM t") == [(5,)]


def test_event_log_plugin_by_url() -> None:
    with open_event_log(f"{HERE}.RecordingEventLog://x?maxlen=5") as log:
        assert type(log) is RecordingEventLog
        assert log.append("t", b"1")


def test_offline_engine_by_name_and_class_path(tmp_path: Path) -> None:
    root = str(tmp_path / "off")
    assert type(open_offline_store(root)) is DuckDBOfflineStore
    assert type(open_offline_store(root, "duckdb")) is DuckDBOfflineStore
    for path in (f"{HERE}:RecordingOfflineStore", f"{HERE}.RecordingOfflineStore"):
        store = open_offline_store(root, path)
        assert type(store) is RecordingOfflineStore
        assert store.root == root


# -- the built-ins ---------------------------------------------------------------------------


def test_builtin_schemes_open_builtin_classes(tmp_path: Path) -> None:
    with open_online_store("memory://?namespace=n") as online:
        assert type(online) is EmbeddedOnlineStore
        assert online.namespace == "n"
    with open_event_log("local://") as log:
        assert type(log) is LocalEventLog
    with connect("sqlite://") as db:
        assert type(db) is SQLiteDatabase
        assert db.dialect == "sqlite"
    assert ONLINE_STORES.known() == ["memory", "redis", "rediss", "unix"]
    assert EVENT_LOGS.known() == ["local", "redis", "rediss", "unix"]
    assert DATABASES.known() == ["postgres", "postgresql", "sqlite"]
    assert OFFLINE_ENGINES.known() == ["duckdb", "spark"]
    # The Redis and PostgreSQL factories are their classes' from_url (opened for real in
    # the integration tests).
    assert ONLINE_STORES.resolve("redis") == RedisOnlineStore.from_url
    assert EVENT_LOGS.resolve("rediss") == RedisEventLog.from_url
    assert DATABASES.resolve("postgres") == PostgresDatabase.from_url
    assert Settings().offline_engine == "duckdb"


def test_every_interface_declares_from_url() -> None:
    for iface in (OnlineStore, EventLog, Database, OfflineStore):
        assert "from_url" in iface.__abstractmethods__, iface


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("open_", "url", "known"),
    [
        (open_online_store, "memcached://x", "memory, redis, rediss, unix (e.g. memory://"),
        (open_event_log, "kafka://broker/", "local, redis, rediss, unix (e.g. local:///"),
        (connect, "mysql://x", "postgres, postgresql, sqlite (e.g. sqlite:///path"),
    ],
)
def test_unknown_scheme_names_the_known_ones_and_the_class_path_form(
    open_: Any, url: str, known: str
) -> None:
    with pytest.raises(ConfigError) as info:
        open_(url)
    message = str(info.value)
    assert f"URL {url!r}; known schemes: {known}" in message
    assert "package.module:ClassName (or package.module.ClassName)" in message


def test_unknown_offline_engine() -> None:
    with pytest.raises(ConfigError, match=r"engine 'spork'; known engines: duckdb") as info:
        open_offline_store("x", "spork")
    assert "OfflineStore" in str(info.value)
    with pytest.raises(ConfigError, match="offline_engine must name"):
        Settings(offline_engine=" ")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("no_such_module_xyz:Store://h", "cannot import module 'no_such_module_xyz'"),
        (f"{HERE}:Missing://h", f"module {HERE!r} has no attribute 'Missing'"),
        (f"{HERE}:NotAStore://h", "NotAStore does not implement the online store interface"),
        (f"{HERE}:RecordingEventLog://h", "RecordingEventLog does not implement the online"),
        (f"{HERE}:HalfStore://h", "abstract method(s) close, delete_many, get_many, set_many"),
        (f"{HERE}:DAY_US://h", "names 86400000000, not a class"),
    ],
)
def test_bad_class_paths_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="online store class path") as info:
        open_online_store(url)
    assert message in str(info.value)


def test_bad_offline_engine_class_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FixedOnlineStore does not implement the offline"):
        open_offline_store(str(tmp_path), f"{HERE}:FixedOnlineStore")
    with pytest.raises(ConfigError, match="cannot import module 'nope'"):
        FeatureService.open(
            catalog_url="sqlite://", offline_path=str(tmp_path), offline_engine="nope.Engine"
        )


def test_class_path_forms() -> None:
    assert is_class_path("a.b:C") and is_class_path("a.b.C") and is_class_path("a:C.D")
    assert not is_class_path("duckdb") and not is_class_path("a:") and not is_class_path("a b.c")
    kind: StoreKind[OnlineStore] = StoreKind("thing", OnlineStore, examples="memory://")
    with pytest.raises(ValueError, match="no dots or colons"):
        kind.register("a.b", EmbeddedOnlineStore.from_url)
    kind.register("lazy", "carrara.feature_cache.online_store:EmbeddedOnlineStore")
    assert type(kind.open("lazy://?namespace=z")) is EmbeddedOnlineStore


def test_latest_rows_is_the_latest_of_each_touched_entity(tmp_path: Path) -> None:
    from carrara.feature_cache.catalog import Catalog

    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        catalog.apply(_definitions())
        g = catalog.get_group("activity")
    finally:
        catalog.close()
    store = DuckDBOfflineStore(str(tmp_path / "off"))
    assert store.latest_rows(g).max_created_us is None
    rows = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u1"],
            "event_timestamp": [5 * DAY_US, 9 * DAY_US, 1 * DAY_US, 9 * DAY_US],
            "created_timestamp": [10, 11, 12, 13],
            "a": [1.0, 2.0, 3.0, 4.0],
            "b": [0.0, 0.0, 0.0, 0.0],
        }
    )
    store.append(g, rows)
    latest = store.latest_rows(g)
    assert isinstance(latest, LatestRows) and latest.max_created_us == 13
    by_id = {r["entity_id"]: r for r in latest.table.to_pylist()}
    assert by_id["u1"]["a"] == 4.0 and by_id["u1"]["created_timestamp"] == 13  # tie: newest write
    assert by_id["u2"]["event_timestamp"] == DAY_US
    touched = store.latest_rows(g, created_after_us=12).table
    assert touched.column("entity_id").to_pylist() == ["u1"]
