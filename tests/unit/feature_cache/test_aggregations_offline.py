"""Aggregated groups end to end on the DuckDB engine: events in the offline store, training
sets against the reference semantics (``reference_values``), mixed training sets, online
values after ingest and batch materialization, transforms that produce events."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carrara.core import decode_feature_vector
from carrara.errors import InvalidArgumentError
from carrara.feature_cache import (
    Aggregation,
    Definitions,
    FeatureGroup,
    FeatureService,
    transform,
)
from carrara.feature_cache.aggregations import reference_values
from carrara.feature_cache.materialize import materialize_batch

US = 1_000_000
M = 60 * US
H = 60 * M
BASE_US = 1_709_251_200 * US  # 2024-03-01 UTC

AGGREGATIONS = (
    Aggregation(function="count", windows=("1m", "3m", "10m")),
    Aggregation(function="count", column="fare", windows=("3m",)),
    Aggregation(function="sum", column="fare", windows=("1m", "3m", "10m")),
    Aggregation(function="mean", column="fare", windows=("3m", "10m")),
    Aggregation(function="min", column="fare", windows=("3m", "10m")),
    Aggregation(function="max", column="fare", windows=("3m", "10m")),
    Aggregation(function="last", column="fare", windows=("1m", "10m")),
    Aggregation(function="count_distinct", column="fare", windows=("3m", "10m")),
    Aggregation(function="count", windows=("3m",), bucket_column="kind", buckets=("a", "b")),
    Aggregation(
        function="sum", column="fare", windows=("10m",), bucket_column="kind", buckets=("a", "b")
    ),
    Aggregation(
        function="last", column="fare", windows=("10m",), bucket_column="kind", buckets=("b",)
    ),
)


def rides_group(**changes: Any) -> FeatureGroup:
    base: dict[str, Any] = {"tile": "1m", "aggregations": AGGREGATIONS}
    return FeatureGroup(name="rides", entity="driver", **{**base, **changes})


def events_table(events: list[dict[str, Any]], key: str = "driver_id") -> pa.Table:
    def ts(name: str) -> pa.Array:
        return pa.array([e[name] for e in events], pa.int64()).cast(pa.timestamp("us", tz="UTC"))

    return pa.table(
        {
            key: pa.array([e["entity_id"] for e in events], pa.string()),
            "event_timestamp": ts("event_timestamp"),
            "created_timestamp": ts("created_timestamp"),
            "fare": pa.array([e["fare"] for e in events], pa.float64()),
            "kind": pa.array([e["kind"] for e in events], pa.string()),
        }
    )


def expected(
    group: FeatureGroup, events: list[dict[str, Any]], entity: str, t_us: int
) -> dict[str, Any]:
    mine = [e for e in events if e["entity_id"] == entity]
    return reference_values(mine, t_us, group.outputs, group.tile_us)


def assert_row_matches(row: dict[str, Any], want: dict[str, Any], group: FeatureGroup) -> None:
    for name, value in want.items():
        got = row[f"{group.name}__{name}"]
        assert got == value, (name, got, value)
        assert type(got) is type(value), (name, got, value)


# -- the property: every function, window and bucket equals the reference --------------------


@st.composite
def _case(draw: st.DrawFn) -> tuple[int, list[dict[str, Any]], list[tuple[str, int]]]:
    # Before and after 1970: the tile floor must hold for negative times too.
    base = draw(st.sampled_from([BASE_US, -7 * H]))
    n = draw(st.integers(0, 30))
    created = draw(st.permutations(range(n)))  # distinct write times: ties fully ordered
    events = [
        {
            "entity_id": draw(st.sampled_from(["a", "a", "b", "c"])),
            # A coarse grid (30 s) within ±15 minutes: many ties on event time, and events on
            # tile boundaries.
            "event_timestamp": base + draw(st.integers(-30, 30)) * 30 * US,
            "created_timestamp": BASE_US + created[i] * US,
            # Integer-valued floats: sums are exact in any order.
            "fare": draw(st.one_of(st.none(), st.integers(-20, 20).map(float))),
            "kind": draw(st.one_of(st.none(), st.sampled_from(["a", "b", "c"]))),
        }
        for i in range(n)
    ]
    labels = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c", "z"]),
                st.one_of(
                    st.integers(-20 * 60, 20 * 60).map(lambda s: base + s * US),
                    st.integers(-20, 20).map(lambda m: base + m * M),  # on tile boundaries
                    st.integers(-20, 20).map(lambda m: base + m * M - 1),  # just before
                ),
            ),
            min_size=1,
            max_size=12,
        )
    )
    return base, events, labels


@settings(max_examples=40, deadline=None)
@given(case=_case())
def test_training_set_equals_the_reference(case: Any) -> None:
    _, events, labels = case
    group = rides_group(online=False)  # offline only: no online refresh on each write
    with tempfile.TemporaryDirectory() as tmp:
        svc = FeatureService.open(catalog_url=f"sqlite:///{tmp}/c.db", offline_path=f"{tmp}/o")
        try:
            svc.apply(Definitions(entities=(_driver(),), groups=(group,)))
            half = len(events) // 2  # two appends (two files per date), the later one first
            for part in (events[half:], events[:half]):
                if part:
                    svc.write_offline("rides", events_table(part))
            entity_df = pd.DataFrame(
                {
                    "driver_id": [e for e, _ in labels],
                    "event_timestamp": pd.to_datetime([t for _, t in labels], unit="us", utc=True),
                }
            )
            out = svc.get_training_set(entity_df, ["rides:*"]).table
        finally:
            svc.close()
    for name in group.feature_names:
        want_type = pa.int64() if group.feature(name).dtype == "int64" else pa.float64()
        assert out.schema.field(f"rides__{name}").type == want_type
    for (entity, t), row in zip(labels, out.to_pylist(), strict=True):
        assert_row_matches(row, expected(group, events, entity, t), group)


def _driver() -> Any:
    from carrara.feature_cache import Entity

    return Entity(name="driver", join_key="driver_id")


# -- offline writes ---------------------------------------------------------------------------


def test_events_are_stored_with_the_event_schema(service: FeatureService, fc: Any) -> None:
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(rides_group(),)))
    g = service.group("rides")
    rows = pa.table(
        {
            "driver_id": ["d1", "d2"],
            "event_timestamp": [fc.ts(0), fc.ts(1)],
            "fare": [1, None],  # integers are read as float64
            "kind": ["a", "b"],
            "unrelated": [1, 2],  # dropped, as for row groups
        }
    )
    assert service.write_offline("rides", rows) == 2
    stored = service.offline.read(g)
    assert stored.column_names == [
        "entity_id",
        "event_timestamp",
        "created_timestamp",
        "fare",
        "kind",
    ]
    assert stored.schema.field("fare").type == pa.float64()
    assert stored.schema.field("kind").type == pa.string()
    assert stored.column("fare").to_pylist() == [1.0, None]
    # NaN is a missing value: stored as null.
    nan = pa.table(
        {"driver_id": ["d3"], "event_timestamp": [fc.ts(2)], "fare": [np.nan], "kind": ["a"]}
    )
    assert service.offline.prepare(g, nan).column("fare").to_pylist() == [None]


@pytest.mark.parametrize("column", ["fare", "kind"])
def test_a_missing_event_column_is_named(service: FeatureService, fc: Any, column: str) -> None:
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(rides_group(),)))
    data = {"driver_id": ["d1"], "event_timestamp": [fc.ts(0)], "fare": [1.0], "kind": ["a"]}
    del data[column]
    with pytest.raises(InvalidArgumentError, match=rf"lack event column.*{column}"):
        service.write_offline("rides", pa.table(data))


def test_compaction_keeps_distinct_events_and_collapses_replays(
    service: FeatureService, fc: Any
) -> None:
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(rides_group(),)))
    g = service.group("rides")
    same = {"driver_id": ["d1"], "event_timestamp": [fc.ts(0)], "fare": [5.0], "kind": [None]}
    service.write_offline("rides", pa.table(same))  # two equal events, written separately:
    service.write_offline("rides", pa.table(same))  # distinct (their write times differ)
    replay = service.offline.prepare(g, pa.table(same))
    service.offline.append(g, replay)
    service.offline.append(g, replay)  # an exact replay (same write time)
    labels = pd.DataFrame({"driver_id": ["d1"], "event_timestamp": [fc.ts(10)]})
    refs = ["rides:event_count_1m", "rides:fare_sum_1m"]

    def values() -> list[Any]:
        row = service.get_training_set(labels, refs).table.to_pylist()[0]
        return [row["rides__event_count_1m"], row["rides__fare_sum_1m"]]

    assert values() == [3, 15.0]  # the replay counts once, before compaction too
    result = service.compact("rides")
    assert result.rows == 3 and result.files_after == 1
    assert values() == [3, 15.0]


# -- training sets ----------------------------------------------------------------------------


def test_mixed_training_set(service: FeatureService, fc: Any) -> None:
    trips = fc.trips_group()
    rides = rides_group()
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(trips, rides)))
    service.write_offline(
        "trips",
        pd.DataFrame(
            {
                "driver_id": ["d1", "d2"],
                "event_timestamp": [fc.ts(0), fc.ts(30)],
                "fare_mean": [10.0, 20.0],
                "fare_p50": [1.0, 2.0],
                "trip_count": [3, 4],
            }
        ),
    )
    t0 = int(fc.ts(0).value // 1000)
    events = [
        {"entity_id": "d1", "event_timestamp": t0, "fare": 4.0, "kind": "a"},
        {"entity_id": "d1", "event_timestamp": t0 + 50 * US, "fare": 6.0, "kind": "b"},
        {"entity_id": "d2", "event_timestamp": t0 + 5 * M, "fare": None, "kind": "b"},
    ]
    for i, e in enumerate(events):
        e["created_timestamp"] = t0 + i
    service.write_offline("rides", events_table(events))
    label_times = [t0 + 55 * US, t0 + 2 * M, t0 + 6 * M, t0 - US]
    labels = pd.DataFrame(
        {
            "driver_id": ["d1", "d1", "d2", "d1"],
            "event_timestamp": pd.to_datetime(label_times, unit="us", utc=True),
            "label": [1, 0, 1, 0],
        }
    )
    out = service.get_training_set(
        labels, ["trips:fare_mean", "rides:fare_sum_3m", "rides:*", "trips:trip_count"]
    ).table
    assert out.column_names[:3] == ["driver_id", "event_timestamp", "label"]
    assert out.column_names[3:6] == ["trips__fare_mean", "trips__trip_count", "rides__fare_sum_3m"]
    assert out.column("trips__fare_mean").to_pylist() == [10.0, 10.0, 20.0, None]
    assert out.column("label").to_pylist() == [1, 0, 1, 0]
    rows = out.to_pylist()
    for (entity, t), row in zip(
        zip(labels["driver_id"], label_times, strict=True), rows, strict=True
    ):
        assert_row_matches(row, expected(rides, events, entity, t), rides)
    assert rows[0]["rides__fare_sum_1m"] == 10.0 and rows[0]["rides__event_count_1m"] == 2
    assert rows[2]["rides__fare_mean_3m"] is None and rows[2]["rides__event_count_3m"] == 1


def test_unknown_output_is_explained(service: FeatureService, fc: Any) -> None:
    from carrara.errors import NotFoundError

    service.apply(Definitions(entities=(fc.DRIVER,), groups=(rides_group(),)))
    labels = pd.DataFrame({"driver_id": ["d1"], "event_timestamp": [fc.ts(0)]})
    with pytest.raises(NotFoundError, match=r"no feature 'fare_sum_2m'.*fare_sum_1m"):
        service.get_training_set(labels, ["rides:fare_sum_2m"])


# -- online -----------------------------------------------------------------------------------


def _stored_time(service: FeatureService, group: str, entity: str) -> int:
    g = service.group(group)
    raw = service.online.read(group, g.version, [entity])[0]
    assert raw is not None
    return int(decode_feature_vector(raw).event_timestamp_us)


def _assert_online(
    service: FeatureService, group: FeatureGroup, events: list[dict[str, Any]], entity: str, t: int
) -> None:
    got = service.get_online(group.name, [entity]).to_dicts()[0]
    for name, value in expected(group, events, entity, t).items():
        if value is None:
            assert got[name] is None, name
        else:  # online values are float32
            assert got[name] is not None and np.float32(got[name]) == np.float32(value), name


def test_ingest_refreshes_the_entities_online(service: FeatureService, fc: Any) -> None:
    group = rides_group(tile="1h", aggregations=_hourly())
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(group,)))
    now = time.time_ns() // 1000
    events = [
        {"entity_id": "d1", "event_timestamp": now - 30 * US, "fare": 2.5, "kind": "a"},
        {"entity_id": "d1", "event_timestamp": now - 3 * H, "fare": 4.0, "kind": "b"},
        {"entity_id": "d1", "event_timestamp": now - 2 * 24 * H, "fare": 100.0, "kind": "a"},
        {"entity_id": "d2", "event_timestamp": now - 10 * US, "fare": None, "kind": "b"},
    ]
    for i, e in enumerate(events):
        e["created_timestamp"] = now + i
    assert service.ingest("rides", events_table(events)) == 4
    for entity in ("d1", "d2"):
        t = _stored_time(service, "rides", entity)
        assert now <= t <= time.time_ns() // 1000
        _assert_online(service, group, events, entity, t)
    d2 = service.get_online("rides", ["d2"]).to_dicts()[0]
    assert d2["event_count_1d"] == 1.0 and d2["fare_mean_1d"] is None  # count 0/1, mean missing
    assert not service.get_online("rides", ["d3"]).found[0]


def _hourly() -> tuple[Aggregation, ...]:
    return (
        Aggregation(function="count", windows=("1h", "1d")),
        Aggregation(function="sum", column="fare", windows=("1h", "1d", "7d")),
        Aggregation(function="mean", column="fare", windows=("1d",)),
        Aggregation(function="last", column="fare", windows=("1d",)),
        Aggregation(function="count_distinct", column="fare", windows=("7d",)),
        Aggregation(function="count", windows=("1d",), bucket_column="kind", buckets=("a", "b")),
    )


def test_materialize_writes_values_at_now(service: FeatureService, fc: Any) -> None:
    group = rides_group(tile="1h", aggregations=_hourly())
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(group,)))
    g = service.group("rides")
    at = BASE_US + 10 * H + 20 * M
    events = [
        {"entity_id": "d1", "event_timestamp": at - 5 * M, "fare": 1.0, "kind": "a"},
        {"entity_id": "d1", "event_timestamp": at - 5 * M, "fare": 3.0, "kind": "a"},
        {"entity_id": "d1", "event_timestamp": at - 30 * M, "fare": 7.0, "kind": "b"},
        {"entity_id": "d1", "event_timestamp": at + 5 * M, "fare": 50.0, "kind": "b"},  # future
        {"entity_id": "d2", "event_timestamp": at - 3 * 24 * H, "fare": 8.0, "kind": "a"},
        {"entity_id": "d3", "event_timestamp": at - 30 * 24 * H, "fare": 9.0, "kind": "a"},
    ]
    for i, e in enumerate(events):
        e["created_timestamp"] = BASE_US + i
    # Straight into the offline store: nothing online until materialized.
    service.offline.append(g, events_table(events))
    assert not service.get_online("rides", ["d1", "d2", "d3"]).found.any()
    result = materialize_batch(service.catalog, service.offline, service.online, g, now_us=at)
    assert (result.entities, result.written) == (3, 3)
    for entity in ("d1", "d2", "d3"):
        _assert_online(service, group, events, entity, at)
    d3 = service.get_online("rides", ["d3"]).to_dicts()[0]
    assert d3["event_count_1d"] == 0.0 and d3["fare_sum_7d"] == 0.0 and d3["fare_last_1d"] is None
    # A later run (the windows slid: d1's events are in the 1d window only) rewrites them.
    later = at + 2 * H
    materialize_batch(service.catalog, service.offline, service.online, g, now_us=later)
    _assert_online(service, group, events, "d1", later)
    # Through the service at the real now, too.
    [run] = service.materialize("rides")
    assert run.entities == 3 and run.written == 3


# -- transforms -------------------------------------------------------------------------------


@transform("test_rides_from_payments")
def _rides_from_payments(df: pd.DataFrame) -> pd.DataFrame:
    """Source rows in cents, with a method code -> events (fare in units, kind as a bucket)."""
    return pd.DataFrame(
        {
            "driver_id": df["driver"],
            "event_timestamp": pd.to_datetime(df["at_us"], unit="us", utc=True),
            "fare": df["cents"] / 100,
            "kind": df["method"].map({1: "a", 2: "b"}),
        }
    )


def test_a_transform_produces_events(service: FeatureService, fc: Any) -> None:
    group = rides_group(transform="test_rides_from_payments")
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(group,)))
    t0 = BASE_US
    source = pd.DataFrame(
        {
            "driver": ["d1", "d1", "d2"],
            "at_us": [t0, t0 + 30 * US, t0 + 90 * US],
            "cents": [250, 150, 1000],
            "method": [1, 2, 2],
        }
    )
    assert service.ingest("rides", source) == 3
    stored = service.offline.read(service.group("rides")).sort_by("event_timestamp")
    assert stored.column("fare").to_pylist() == [2.5, 1.5, 10.0]
    assert stored.column("kind").to_pylist() == ["a", "b", "b"]
    events = [
        {
            "entity_id": r["entity_id"],
            "event_timestamp": int(pd.Timestamp(r["event_timestamp"]).value // 1000),
            "created_timestamp": int(pd.Timestamp(r["created_timestamp"]).value // 1000),
            "fare": r["fare"],
            "kind": r["kind"],
        }
        for r in stored.to_pylist()
    ]
    times = [t0 + 40 * US, t0 + 2 * M]
    labels = pd.DataFrame(
        {
            "driver_id": ["d1", "d2"],
            "event_timestamp": pd.to_datetime(times, unit="us", utc=True),
        }
    )
    rows = service.get_training_set(labels, ["rides:*"]).table.to_pylist()
    for entity, t, row in zip(["d1", "d2"], times, rows, strict=True):
        assert_row_matches(row, expected(group, events, entity, t), group)
    assert rows[0]["rides__fare_sum_1m"] == 4.0


# -- catalog ----------------------------------------------------------------------------------


def test_catalog_stores_and_versions_aggregated_groups(service: FeatureService, fc: Any) -> None:
    group = rides_group()
    service.apply(Definitions(entities=(fc.DRIVER,), groups=(group,)))
    g = service.catalog.get_group("rides")
    assert g.definition == group and g.definition.is_aggregated
    assert g.definition.feature_names == group.feature_names
    [_, change] = service.apply(
        Definitions(entities=(fc.DRIVER,), groups=(rides_group(tile="30s"),))
    )
    assert (change.action, change.version) == ("new_version", 2)
    assert "tile '1m'->'30s'" in change.detail
    renamed = (
        *AGGREGATIONS[:-1],
        Aggregation(
            function="max",
            column="fare",
            windows=("10m",),
            name="fare_last",
            bucket_column="kind",
            buckets=("b",),
        ),
    )
    [_, change] = service.apply(
        Definitions(entities=(fc.DRIVER,), groups=(rides_group(aggregations=renamed),))
    )
    assert change.action == "new_version" and "aggregations" in change.detail
    [_, change] = service.apply(
        Definitions(
            entities=(fc.DRIVER,), groups=(rides_group(aggregations=renamed, description="x"),)
        )
    )
    assert change.action == "updated"
    assert service.catalog.get_group("rides", 1).definition == group
