"""The Spark offline engine against the same references as DuckDB: the brute-force
point-in-time join (the property test's generator), ``reference_values`` for windowed
aggregations, and the DuckDB engine's training sets and materialized values. One local[2]
session for the whole run (the ``spark_session`` fixture); tiny data."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings

from carrara.feature_cache import (
    Aggregation,
    Catalog,
    Definitions,
    Entity,
    Feature,
    FeatureGroup,
    FeatureService,
    transform,
)
from carrara.feature_cache.aggregations import reference_values
from carrara.feature_cache.catalog import RegisteredGroup
from carrara.feature_cache.materialize import aggregates_at, table_to_vectors
from carrara.feature_cache.offline_store import DuckDBOfflineStore, open_offline_store
from carrara.feature_cache.online_store import open_online_store
from carrara.feature_cache.pit_join import FeatureRequest, point_in_time_join
from tests.unit.feature_cache.test_pit_join import (
    BASE_US,
    HOUR,
    RATINGS,
    TRIPS,
    US,
    _brute_force,
    _pit_case,
    _random_rows,
    _table,
    _to_ts,
    check_pit_case,
)

MINUTE = 60 * US


@pytest.fixture
def spark_store(spark_session: Any, tmp_path: Path) -> Iterator[Any]:
    from carrara.feature_cache.spark_store import SparkOfflineStore

    store = SparkOfflineStore(str(tmp_path / "offline"))
    yield store
    store.close()


def _catalog(tmp: str | Path, *groups: FeatureGroup) -> Catalog:
    catalog = Catalog(f"sqlite:///{tmp}/catalog.db")
    entities = (
        Entity(name="driver", join_key="driver_id"),
        Entity(name="rider", join_key="rider_id"),
    )
    catalog.apply(Definitions(entities=entities, groups=groups))
    return catalog


def _trips(ttl_days: float = 2.0) -> FeatureGroup:
    return FeatureGroup(
        name="trips",
        entity="driver",
        features=tuple(Feature(name=n, dtype=d) for n, d in TRIPS.items()),  # type: ignore[arg-type]
        ttl_days=ttl_days,
    )


def _ratings() -> FeatureGroup:
    return FeatureGroup(
        name="ratings",
        entity="rider",
        features=tuple(Feature(name=n, dtype=d) for n, d in RATINGS.items()),  # type: ignore[arg-type]
    )


def _values(table: pa.Table) -> list[dict[str, Any]]:
    """Rows with times as µs integers: engines may spell the UTC zone differently."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        cols[name] = col
    rows: list[dict[str, Any]] = pa.table(cols).to_pylist()
    return rows


# -- row groups ---------------------------------------------------------------------------------


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_pit_case())
def test_property_matches_brute_force_on_spark(spark_session: Any, case: Any) -> None:
    """test_pit_join's property test (same generator, same check) on the Spark engine."""
    from carrara.feature_cache.spark_store import SparkOfflineStore

    check_pit_case(case, SparkOfflineStore)


def test_row_groups_give_duckdbs_training_set(spark_store: Any, tmp_path: Path) -> None:
    rng = random.Random(7)
    catalog = _catalog(tmp_path, _trips(), _ratings())
    trips_g, ratings_g = catalog.get_group("trips"), catalog.get_group("ratings")
    drivers = [f"d{i}" for i in range(10)]
    riders = [f"r{i}" for i in range(6)]
    trips = _random_rows(rng, drivers, 400, TRIPS)
    ratings = _random_rows(rng, riders, 150, RATINGS)
    duck = DuckDBOfflineStore(spark_store.root)
    trips_sorted = sorted(trips, key=lambda r: r["created_timestamp"])
    for chunk in (trips_sorted[:250], trips_sorted[250:]):
        duck.append(trips_g, _table(chunk, TRIPS))
    spark_store.append(ratings_g, _table(ratings, RATINGS))  # the same writes on either engine
    ttl = trips_g.definition.ttl_us
    label_ts = []
    for _ in range(200):
        r = rng.choice(trips)
        label_ts.append(
            rng.choice(
                [
                    r["event_timestamp"],
                    r["event_timestamp"] + ttl,
                    r["event_timestamp"] + ttl + 1,
                    r["event_timestamp"] - 1,
                    BASE_US + rng.randrange(-24, 24 * 10) * HOUR,
                ]
            )
        )
    n = len(label_ts)
    entity_df = pd.DataFrame(
        {
            "driver_id": [rng.choice([*drivers, "ghost"]) for _ in range(n)],
            "rider_id": [rng.choice(riders) for _ in range(n)],
            "event_timestamp": pd.to_datetime(label_ts, unit="us", utc=True),
            "label": [rng.random() for _ in range(n)],
        }
    )
    requests = [
        FeatureRequest(trips_g, tuple(TRIPS), "driver_id"),
        FeatureRequest(ratings_g, ("vip", "rating"), "rider_id"),
    ]
    a = point_in_time_join(entity_df, requests, duck)
    b = point_in_time_join(entity_df, requests, spark_store)
    assert b.table.column_names == a.table.column_names
    features = [c for c in a.table.column_names if "__" in c]
    assert [b.table.schema.field(c).type for c in features] == [
        a.table.schema.field(c).type for c in features
    ]
    assert _values(b.table) == _values(a.table)
    assert b.snapshot_ref == a.snapshot_ref  # same inputs, same files: the same reference
    found = sum(row["trips__fare_mean"] is not None for row in a.table.to_pylist())
    assert n // 4 < found < n
    # latest rows (what materialization reads) agree too, watermark and all
    for after in (0, trips_sorted[300]["created_timestamp"]):
        da = duck.latest_rows(trips_g, created_after_us=after)
        sb = spark_store.latest_rows(trips_g, created_after_us=after)
        assert sb.max_created_us == da.max_created_us
        assert sb.table.equals(da.table.sort_by("entity_id"))
    catalog.close()


# -- aggregated groups --------------------------------------------------------------------------


def _clicks() -> FeatureGroup:
    return FeatureGroup(
        name="clicks",
        entity="driver",
        tile="5m",
        aggregations=(
            Aggregation(function="count", windows=("5m", "1h")),
            Aggregation(function="count", column="amount", windows=("15m",)),
            Aggregation(function="sum", column="amount", windows=("10m", "1h")),
            Aggregation(function="mean", column="amount", windows=("30m",)),
            Aggregation(function="min", column="amount", windows=("1h",)),
            Aggregation(function="max", column="amount", windows=("15m",)),
            Aggregation(function="last", column="amount", windows=("20m", "1h")),
            Aggregation(function="count_distinct", column="amount", windows=("1h",)),
            Aggregation(
                function="sum",
                column="amount",
                windows=("30m",),
                bucket_column="kind",
                buckets=("card", "cash"),
            ),
        ),
    )


def _events(rng: random.Random, n: int) -> list[dict[str, Any]]:
    created = rng.sample(range(1, 50 * n), n)
    return [
        {
            "entity_id": rng.choice(["a", "b", "c"]),
            # half-minute grid: many events on one time, some on tile edges
            "event_timestamp": BASE_US + rng.randrange(-20, 120) * MINUTE // 2,
            "created_timestamp": BASE_US + created[i] * US,
            "amount": None if rng.random() < 0.1 else float(rng.randrange(-5, 20)),
            "kind": rng.choice(["card", "cash", "other"]),
        }
        for i in range(n)
    ]


def _write_events(store: Any, group: RegisteredGroup, events: list[dict[str, Any]]) -> None:
    half = len(events) // 2
    for part in (events[half:], events[:half]):
        store.append(
            group,
            pa.table(
                {
                    "entity_id": [e["entity_id"] for e in part],
                    "event_timestamp": _to_ts([e["event_timestamp"] for e in part]),
                    "created_timestamp": _to_ts([e["created_timestamp"] for e in part]),
                    "amount": pa.array([e["amount"] for e in part], pa.float64()),
                    "kind": [e["kind"] for e in part],
                }
            ),
        )


def _same(have: Any, want: Any) -> bool:
    if want is None or have is None:
        return have is want
    if isinstance(want, float):
        return math.isclose(have, want, rel_tol=1e-12, abs_tol=1e-9)
    return bool(have == want)


def test_aggregated_groups_match_the_reference(spark_store: Any, tmp_path: Path) -> None:
    rng = random.Random(11)
    catalog = _catalog(tmp_path, _clicks())
    g = catalog.get_group("clicks")
    events = _events(rng, 150)
    _write_events(spark_store, g, events)
    labels = [
        (rng.choice(["a", "b", "c", "z"]), BASE_US + rng.randrange(-30, 140) * MINUTE // 2 + d)
        for d in (0, 1, -1)
        for _ in range(40)
    ]
    entity_df = pa.table(
        {"driver_id": [e for e, _ in labels], "event_timestamp": _to_ts([t for _, t in labels])}
    )
    names = g.definition.feature_names
    out = point_in_time_join(entity_df, [FeatureRequest(g, names, "driver_id")], spark_store)
    outs = g.definition.outputs
    tile = g.definition.tile_us
    differences = []
    for (entity, t), row in zip(labels, out.table.to_pylist(), strict=True):
        mine = [e for e in events if e["entity_id"] == entity]
        want = reference_values(mine, t, outs, tile)
        for name in names:
            if not _same(row[f"clicks__{name}"], want[name]):
                differences.append((entity, t, name, row[f"clicks__{name}"], want[name]))
    assert differences == []
    types = {o.name: pa.int64() if o.dtype == "int64" else pa.float64() for o in outs}
    assert all(out.table.schema.field(f"clicks__{n}").type == types[n] for n in names)
    catalog.close()


def test_aggregated_groups_give_duckdbs_training_set(spark_store: Any, tmp_path: Path) -> None:
    rng = random.Random(5)
    catalog = _catalog(tmp_path, _clicks(), _trips())
    g, trips_g = catalog.get_group("clicks"), catalog.get_group("trips")
    _write_events(spark_store, g, _events(rng, 100))
    spark_store.append(trips_g, _table(_random_rows(rng, ["a", "b"], 50, TRIPS), TRIPS))
    entity_df = pd.DataFrame(
        {
            "driver_id": [rng.choice(["a", "b", "c", None]) for _ in range(60)],
            "event_timestamp": pd.to_datetime(
                [BASE_US + rng.randrange(-30, 140) * MINUTE // 2 for _ in range(60)],
                unit="us",
                utc=True,
            ),
        }
    )
    requests = [
        FeatureRequest(g, ("amount_last_1h", "event_count_5m", "amount_sum_card_30m"), "driver_id"),
        FeatureRequest(trips_g, ("fare_mean",), "driver_id"),  # row and aggregated groups mix
    ]
    duck = DuckDBOfflineStore(spark_store.root)
    a = point_in_time_join(entity_df, requests, duck).table
    b = point_in_time_join(entity_df, requests, spark_store).table
    assert b.schema.names == a.schema.names
    assert [f.type for f in b.schema][2:] == [f.type for f in a.schema][2:]
    for x, y in zip(_values(b), _values(a), strict=True):
        assert all(_same(x[k], y[k]) for k in x), (x, y)
    catalog.close()


# -- settings, ingest and materialization -------------------------------------------------------


def test_offline_engine_spark_through_settings(
    spark_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carrara.config import Settings, load_settings
    from carrara.feature_cache.spark_store import SparkOfflineStore

    assert Settings().spark_master == "local[2]"
    assert load_settings(env={"CARRARA_SPARK_MASTER": "spark://h:7077"}).spark_master == (
        "spark://h:7077"
    )
    monkeypatch.setenv("CARRARA_SPARK_MASTER", "local[2]")
    assert isinstance(open_offline_store(str(tmp_path / "o"), "spark"), SparkOfflineStore)
    settings = Settings(home=str(tmp_path), offline_engine="spark")
    with FeatureService.from_settings(settings) as service:
        assert isinstance(service.offline, SparkOfflineStore)
        service.apply(
            Definitions(entities=(Entity(name="driver", join_key="driver_id"),), groups=(_trips(),))
        )
        service.write_offline(
            "trips",
            pd.DataFrame(
                {
                    "driver_id": ["d1", "d2"],
                    "event_timestamp": pd.to_datetime([BASE_US, BASE_US], unit="us", utc=True),
                    "fare_mean": [1.5, 2.5],
                    "fare_p50": [1.0, 2.0],
                    "trip_count": [3, 4],
                }
            ),
        )
        labels = pd.DataFrame(
            {
                "driver_id": ["d2", "d1", "d3"],
                "event_timestamp": pd.to_datetime([BASE_US + US] * 3, unit="us", utc=True),
            }
        )
        out = service.get_training_set(labels, ["trips:*"]).table
        assert out.column("trips__fare_mean").to_pylist() == [2.5, 1.5, None]
    # spark_master given in code (not only in the process's settings) reaches the engine.
    coded = Settings(home=str(tmp_path), offline_engine="spark", spark_master="local[1]")
    with FeatureService.from_settings(coded) as service:
        assert isinstance(service.offline, SparkOfflineStore)
        assert service.offline.master == "local[1]"
    # the test run's session outlives the service (it is held by the fixture)
    assert spark_session.range(1).count() == 1


@transform("spark_test_fares")
def _fares(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "driver_id": df["driver"],
            "event_timestamp": df["ts"],
            "fare_mean": df["fare"] * 2,
            "fare_p50": df["fare"],
            "trip_count": df["n"],
        }
    )


def test_transform_with_spark_ingests_like_ingest(spark_store: Any, tmp_path: Path) -> None:
    import msgspec

    from carrara.feature_cache.spark_store import transform_with_spark

    group = msgspec.structs.replace(_trips(0.0), transform="spark_test_fares")
    catalog = _catalog(tmp_path, group)
    g = catalog.get_group("trips")
    source = pd.DataFrame(
        {
            "driver": [f"d{i % 7}" for i in range(40)],
            "ts": pd.to_datetime([BASE_US + i * HOUR for i in range(40)], unit="us", utc=True),
            "fare": [float(i) for i in range(40)],
            "n": list(range(40)),
        }
    )
    frame = spark_store.spark.createDataFrame(pa.Table.from_pandas(source)).repartition(3)
    rows = transform_with_spark(frame, g)
    assert spark_store.append(g, rows) == 40
    assert len(spark_store.files("trips", g.version)) >= 3  # written by the executors
    stored = spark_store.read(g).sort_by(
        [("entity_id", "ascending"), ("event_timestamp", "ascending")]
    )
    expected = _fares(source).rename(columns={"driver_id": "entity_id"})
    expected = expected.sort_values(["entity_id", "event_timestamp"]).reset_index(drop=True)
    assert stored.column("fare_mean").to_pylist() == expected["fare_mean"].tolist()
    assert stored.column("entity_id").to_pylist() == expected["entity_id"].tolist()
    assert stored.column("trip_count").to_pylist() == expected["trip_count"].tolist()
    catalog.close()


def _online_values(store: Any, group: RegisteredGroup, ids: list[str]) -> list[bytes | None]:
    values: list[bytes | None] = store.read(group.name, group.version, ids)
    return values


@pytest.mark.parametrize("online", ["memory", pytest.param("redis", marks=pytest.mark.integration)])
def test_materialize_partitions_writes_duckdbs_values(
    spark_store: Any, tmp_path: Path, request: pytest.FixtureRequest, online: str
) -> None:
    rng = random.Random(3)
    catalog = _catalog(tmp_path, _trips(0.0), _clicks())
    g, clicks = catalog.get_group("trips"), catalog.get_group("clicks")
    ids = [f"d{i}" for i in range(30)]
    spark_store.append(g, _table(_random_rows(rng, ids, 300, TRIPS), TRIPS))
    _write_events(spark_store, clicks, _events(rng, 80))
    duck = DuckDBOfflineStore(spark_store.root)
    reference = open_online_store("memory://")
    for vectors in table_to_vectors(g, duck.latest_rows(g).table):
        reference.write_vectors(vectors, 0)
    now = BASE_US + 40 * MINUTE
    for vectors in table_to_vectors(clicks, aggregates_at(duck, clicks, ["a", "b", "c"], now)):
        reference.write_vectors(vectors, 0)
    if online == "memory":
        target: Any = open_online_store("memory://")
        written = spark_store.materialize_partitions(g, target)
        written += spark_store.materialize_partitions(clicks, target, now_us=now)
        check = target
    else:
        url = request.getfixturevalue("redis_url")
        namespace = request.getfixturevalue("redis_namespace")
        latest = spark_store.latest_rows(g).table
        written = spark_store.materialize_partitions(g, url, namespace=namespace)
        written += spark_store.materialize_partitions(clicks, url, namespace=namespace, now_us=now)
        check = open_online_store(url, namespace=namespace)
        assert latest.num_rows == 30
    assert written == 30 + 3
    assert _online_values(check, g, ids) == _online_values(reference, g, ids)
    assert _online_values(check, clicks, ["a", "b", "c"]) == _online_values(
        reference, clicks, ["a", "b", "c"]
    )
    # re-running writes nothing: the stored values are as recent
    if online == "memory":
        assert spark_store.materialize_partitions(g, check) == 0
    else:
        assert spark_store.materialize_partitions(g, url, namespace=namespace) == 0
        check.close()
    catalog.close()


@pytest.mark.integration
def test_feature_service_materialize_writes_from_the_executors(
    spark_session: Any,
    tmp_path: Path,
    redis_url: str,
    redis_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``FeatureService.materialize`` (``carrara materialize``) on the Spark engine with a
    Redis online store: the executors write (writing from this process is made to fail),
    with the counts and values of the DuckDB path."""
    from carrara.feature_cache.online_store import RedisOnlineStore

    ids = [f"d{i}" for i in range(25)]
    results = {}
    for engine in ("duckdb", "spark"):
        namespace = f"{redis_namespace}-{engine}"
        svc = FeatureService.open(
            catalog_url=f"sqlite:///{tmp_path / engine}.db",
            offline_path=str(tmp_path / engine / "offline"),
            online_url=redis_url,
            namespace=namespace,
            offline_engine=engine,
        )
        try:
            svc.apply(
                Definitions(
                    entities=(Entity(name="driver", join_key="driver_id"),), groups=(_trips(0.0),)
                )
            )
            rows = _random_rows(random.Random(7), ids, 200, TRIPS)
            svc.write_offline("trips", _table(rows, TRIPS))
            if engine == "spark":

                def driver_write(*args: Any, **kwargs: Any) -> int:
                    raise AssertionError("the driver wrote: the executors should have")

                monkeypatch.setattr(RedisOnlineStore, "write_vectors", driver_write)
            [result] = svc.materialize("trips")
            monkeypatch.undo()
            values = _online_values(svc.online, svc.group("trips"), ids)
            results[engine] = (result.entities, result.written, result.expired, values)
            [again] = svc.materialize("trips")  # incremental: nothing new since the watermark
            assert again.written == 0
        finally:
            svc.close()
    assert results["spark"][:3] == results["duckdb"][:3] == (25, 25, 0)
    assert results["spark"][3] == results["duckdb"][3]


def test_materialize_partitions_refuses_memory_urls(spark_store: Any, tmp_path: Path) -> None:
    from carrara.errors import InvalidArgumentError

    catalog = _catalog(tmp_path, _trips(0.0))
    g = catalog.get_group("trips")
    spark_store.append(g, _table(_random_rows(random.Random(1), ["d1"], 3, TRIPS), TRIPS))
    with pytest.raises(InvalidArgumentError, match="executors cannot reach"):
        spark_store.materialize_partitions(g, "memory://")
    catalog.close()


def test_remote_roots_spark_cannot_read_go_through_fsspec(
    spark_session: Any, tmp_path: Path
) -> None:
    """A root Spark has no connector for (here ``memory://``) is read on the driver."""
    import uuid

    from carrara.feature_cache.spark_store import SparkOfflineStore

    catalog = _catalog(tmp_path, _trips(0.0))
    g = catalog.get_group("trips")
    store = SparkOfflineStore(f"memory://spark-{uuid.uuid4().hex[:8]}")
    rows = _random_rows(random.Random(2), ["d1", "d2"], 20, TRIPS)
    store.append(g, _table(rows, TRIPS))
    labels = [("d1", BASE_US + 50 * HOUR), ("d2", BASE_US + 3 * HOUR), ("d3", BASE_US)]
    entity_df = pa.table(
        {"driver_id": [e for e, _ in labels], "event_timestamp": _to_ts([t for _, t in labels])}
    )
    out = point_in_time_join(entity_df, [FeatureRequest(g, tuple(TRIPS), "driver_id")], store)
    for (entity, t), row in zip(labels, out.table.to_pylist(), strict=True):
        want = _brute_force(entity, t, rows, 0, list(TRIPS))
        assert [row[f"trips__{f}"] for f in TRIPS] == [
            None if v is None else pytest.approx(v, rel=1e-6) for v in want
        ]
    store.close()
    catalog.close()
