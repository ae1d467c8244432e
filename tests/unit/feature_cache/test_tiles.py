"""Tiled partial aggregates (the streaming side of windowed aggregations) against the
reference semantics: random events (ties, nulls, buckets, any arrival order), values at
random times, the next change, the lateness bound and eviction."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carrara.errors import FailedPreconditionError, InvalidArgumentError
from carrara.feature_cache import Aggregation, FeatureGroup
from carrara.feature_cache.aggregations import outputs, reference_values
from carrara.feature_cache.tiles import TileAggregator

M = 60_000_000
S = 1_000_000
TILE = M
HUGE = 10**15  # a lateness that never drops anything

AGGS = (
    Aggregation(function="count", windows=("1m", "3m")),
    Aggregation(function="count", column="x", windows=("2m",)),
    Aggregation(function="sum", column="x", windows=("1m", "2m", "5m")),
    Aggregation(function="mean", column="x", windows=("3m",)),
    Aggregation(function="min", column="x", windows=("2m", "5m")),
    Aggregation(function="max", column="x", windows=("2m",)),
    Aggregation(function="last", column="x", windows=("1m", "5m")),
    Aggregation(function="count_distinct", column="x", windows=("3m",)),
    Aggregation(function="sum", column="y", windows=("2m",), bucket_column="k", buckets=("a", "b")),
    Aggregation(function="last", column="y", windows=("3m",), bucket_column="k", buckets=("b",)),
    Aggregation(function="count", windows=("2m",), bucket_column="k", buckets=("a", "c")),
    Aggregation(
        function="count_distinct", column="x", windows=("5m",), bucket_column="k", buckets=("c",)
    ),
)
OUTS = outputs(AGGS)
ENTITIES = ("e1", "e2", "e3")

values = st.one_of(
    st.none(),
    st.just(math.nan),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0]),  # repeats: distinct counts and min/max ties
    st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False),
)
event = st.tuples(
    st.sampled_from(ENTITIES),
    st.integers(0, 60).map(lambda k: k * 10 * S),  # on a 10 s grid: event-time ties, boundaries
    values,
    values,
    st.sampled_from(["a", "b", "c", None]),
)


def as_events(drawn: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Events with unique write times (the tie-break of ``last``)."""
    return [
        {
            "entity_id": e,
            "event_timestamp": ts,
            "created_timestamp": 1_000 + i,
            "x": x,
            "y": y,
            "k": k,
        }
        for i, (e, ts, x, y, k) in enumerate(drawn)
    ]


def add(agg: TileAggregator, events: list[dict[str, Any]], **kw: Any) -> Any:
    return agg.add(
        [e["entity_id"] for e in events],
        [e["event_timestamp"] for e in events],
        [e["created_timestamp"] for e in events],
        {c: [e[c] for e in events] for c in ("x", "y", "k")},
        **kw,
    )


def reference(events: list[dict[str, Any]], entity: str, t: int) -> dict[str, Any]:
    return reference_values([e for e in events if e["entity_id"] == entity], t, OUTS, TILE)


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal values (the same types for integers; NaN equal to NaN)."""
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y or type(x) is not type(y):
            return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drawn=st.lists(event, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    times=st.lists(st.integers(-M, 12 * M), min_size=1, max_size=8),
)
def test_values_equal_the_reference(
    drawn: list[tuple[Any, ...]], cuts: list[int], times: list[int]
) -> None:
    """Any arrival order, in any batches: values at any time equal the reference."""
    events = as_events(drawn)
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=HUGE)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    for lo, hi in itertools.pairwise(bounds):
        assert add(agg, events[lo:hi]).all()
    assert agg.dropped_late == 0
    times += [e["event_timestamp"] + d for e in events[:4] for d in (-1, 0, 1)]
    for t in times:
        for entity in ENTITIES:
            got = agg.values_at(entity, t)
            want = reference(events, entity, t)
            assert same(got, want), (entity, t, got, want)


@settings(max_examples=100, deadline=None)
@given(drawn=st.lists(event, min_size=1, max_size=40), after=st.integers(-M, 12 * M))
def test_nothing_changes_before_the_next_change(drawn: list[tuple[Any, ...]], after: int) -> None:
    """Between ``after`` and the next change the reference values stay put (so a server that
    recomputes only then serves exact values), and they do change somewhere at a tile
    boundary or an event time."""
    events = as_events(drawn)
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=HUGE)
    add(agg, events)
    for entity in ENTITIES:
        nxt = agg.next_change(entity, after)
        base = reference(events, entity, after)
        end = nxt if nxt is not None else 20 * M
        assert nxt is None or nxt > after
        probes = {after, end - 1, (after + end) // 2, *range(after, end, 10 * S)}
        probes |= {e["event_timestamp"] - 1 for e in events if after <= e["event_timestamp"] <= end}
        probes |= {b - 1 for b in range((after // TILE + 1) * TILE, end + 1, TILE)}
        for t in sorted(p for p in probes if after <= p < end):
            assert same(reference(events, entity, t), base), (entity, after, nxt, t)
        if nxt is None:  # every tile with events has left every window: empty values
            assert same(base, reference([], entity, after))


@settings(max_examples=100, deadline=None)
@given(
    drawn=st.lists(event, min_size=1, max_size=60),
    lateness=st.integers(0, 4).map(lambda k: k * 25 * S),
    offsets=st.lists(st.integers(0, 4 * M), min_size=1, max_size=5),
)
def test_lateness_bound(drawn: list[tuple[Any, ...]], lateness: int, offsets: list[int]) -> None:
    """An event more than the lateness behind the newest event time seen before it is
    dropped and counted, and applied nowhere; reads from the watermark minus the lateness on
    equal the reference over the accepted events."""
    events = as_events(drawn)
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=lateness)
    newest = -(10**18)
    expected = []
    for e in events:
        newest = max(newest, e["event_timestamp"])
        expected.append(e["event_timestamp"] >= newest - lateness)
    accepted: list[bool] = []
    for i in range(0, len(events), 7):  # batches of 7: the bound holds across and within
        accepted += add(agg, events[i : i + 7]).tolist()
    assert accepted == expected
    assert agg.dropped_late == expected.count(False)
    assert agg.watermark_us == newest
    kept = [e for e, ok in zip(events, accepted, strict=True) if ok]
    for off in offsets:
        t = newest - lateness + off
        for entity in ENTITIES:
            assert same(agg.values_at(entity, t), reference(kept, entity, t))


def test_a_late_batch_is_judged_against_the_watermark() -> None:
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=30 * S)
    base = {"x": 1.0, "y": None, "k": None}
    assert add(
        agg, [{"entity_id": "e", "event_timestamp": 10 * M, "created_timestamp": 1, **base}]
    )[0]
    late = [
        {"entity_id": "e", "event_timestamp": 10 * M - 31 * S, "created_timestamp": 2, **base},
        {"entity_id": "e", "event_timestamp": 10 * M - 30 * S, "created_timestamp": 3, **base},
    ]
    assert add(agg, late).tolist() == [False, True]
    assert agg.dropped_late == 1
    assert agg.values_at("e", 10 * M)["event_count_1m"] == 1  # the one at -30 s is a tile back
    assert agg.values_at("e", 10 * M)["event_count_3m"] == 2
    # a rebuild applies stored events whatever their lateness
    assert add(agg, late[:1], check_lateness=False).all()
    assert agg.values_at("e", 10 * M)["event_count_3m"] == 3
    assert agg.dropped_late == 1


def test_eviction() -> None:
    """Tiles older than the widest window (5m) plus the lateness go; entities with none left
    are forgotten; reads that would need them are refused."""
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=M)
    old = [
        {
            "entity_id": "old",
            "event_timestamp": 0,
            "created_timestamp": 1,
            "x": 5.0,
            "y": 1.0,
            "k": "a",
        },
        {
            "entity_id": "both",
            "event_timestamp": 30 * S,
            "created_timestamp": 2,
            "x": 7.0,
            "y": None,
            "k": "b",
        },
    ]
    add(agg, old)
    assert sorted(agg.entities()) == ["both", "old"]
    new = [
        {
            "entity_id": "both",
            "event_timestamp": 6 * M,
            "created_timestamp": 3,
            "x": 1.0,
            "y": None,
            "k": None,
        }
    ]
    add(agg, new)
    # 6m - 1m lateness - 5m window = 0: tile 0 (ending at 1m) is still kept.
    assert sorted(agg.entities()) == ["both", "old"]
    add(agg, [{**new[0], "event_timestamp": 7 * M, "created_timestamp": 4}])
    assert agg.entities() == ["both"] and len(agg) == 1
    events = old + new + [{**new[0], "event_timestamp": 7 * M, "created_timestamp": 4}]
    for t in (6 * M, 7 * M, 7 * M + 59 * S, 9 * M):
        for entity in ("both", "old"):
            assert same(agg.values_at(entity, t), reference(events, entity, t))
    with pytest.raises(FailedPreconditionError, match="eviction horizon"):
        agg.values_at("both", 4 * M)
    # a rebuild's event below the horizon is not kept either
    add(agg, [{**old[0], "created_timestamp": 9}], check_lateness=False)
    assert "old" not in agg


def test_a_read_in_a_closed_tile_with_later_events_is_refused() -> None:
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=0)
    e = {"entity_id": "e", "created_timestamp": 1, "x": 1.0, "y": None, "k": None}
    add(agg, [{**e, "event_timestamp": 10 * M + 50 * S}])
    assert agg.values_at("e", 10 * M + 10 * S)["event_count_1m"] == 0  # the tile is open
    add(agg, [{**e, "event_timestamp": 11 * M, "created_timestamp": 2}])
    with pytest.raises(FailedPreconditionError, match="closed"):
        agg.values_at("e", 10 * M + 10 * S)
    assert agg.values_at("e", 11 * M)["event_count_3m"] == 2


def test_exact_duplicates_count_once() -> None:
    """A replayed event (same times and values) counts once, as the offline engines count
    it; an equal event written at another time is another event."""
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=M)
    e = {
        "entity_id": "e",
        "event_timestamp": M,
        "created_timestamp": 5,
        "x": 2.0,
        "y": 1.0,
        "k": "a",
    }
    add(agg, [e, e])
    add(agg, [e])
    assert agg.values_at("e", M)["x_sum_1m"] == 2.0
    add(agg, [{**e, "created_timestamp": 6}])
    assert agg.values_at("e", M)["x_sum_1m"] == 4.0
    assert agg.values_at("e", M)["x_count_distinct_3m"] == 1


def test_sums_are_exact() -> None:
    """Per-tile sums merged without rounding error: equal to one correctly rounded sum."""
    xs = [1e16, 1.0, -1e16, 1.0, 0.1, 0.2, 0.3, 1e-10]
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=HUGE)
    events = [
        {
            "entity_id": "e",
            "event_timestamp": i * 30 * S,
            "created_timestamp": i,
            "x": x,
            "y": None,
            "k": None,
        }
        for i, x in enumerate(xs)
    ]
    add(agg, events)
    got = agg.values_at("e", 4 * M)
    assert got["x_sum_5m"] == math.fsum(xs) and got["x_sum_5m"] != sum(xs)
    assert got["x_mean_3m"] == reference(events, "e", 4 * M)["x_mean_3m"]


def test_infinities() -> None:
    agg = TileAggregator(AGGS, TILE, allowed_lateness_us=HUGE)
    base = {"entity_id": "e", "y": None, "k": None}
    add(agg, [{**base, "event_timestamp": 0, "created_timestamp": 1, "x": math.inf}])
    add(agg, [{**base, "event_timestamp": M, "created_timestamp": 2, "x": 1.0}])
    assert agg.values_at("e", M)["x_sum_2m"] == math.inf
    add(agg, [{**base, "event_timestamp": M, "created_timestamp": 3, "x": -math.inf}])
    assert math.isnan(agg.values_at("e", M)["x_sum_2m"])  # type: ignore[arg-type]
    assert agg.values_at("e", M)["x_min_2m"] == -math.inf


def test_add_table_from_stored_events() -> None:
    """Events as the offline store holds them (timestamps, nulls) go in as a table."""
    group = FeatureGroup(name="trips", entity="rider", aggregations=AGGS, tile="1m")
    agg = TileAggregator.for_group(group, allowed_lateness_us=HUGE)
    assert [o.name for o in agg.outputs] == list(group.feature_names)
    ts = pa.timestamp("us", tz="UTC")
    table = pa.table(
        {
            "entity_id": ["a", "a", "b"],
            "event_timestamp": pa.array([0, 30 * S, M], pa.int64()).cast(ts),
            "created_timestamp": pa.array([1, 2, 3], pa.int64()).cast(ts),
            "x": pa.array([1.0, None, 4.0]),
            "y": pa.array([None, 2.0, 3.0]),
            "k": pa.array(["a", "a", None]),
        }
    )
    assert agg.add_table(table).all()
    events = table.to_pylist()
    for e in events:
        e["event_timestamp"] = int(e["event_timestamp"].timestamp() * S)
        e["created_timestamp"] = int(e["created_timestamp"].timestamp() * S)
    for t in (0, 40 * S, M, 3 * M):
        for entity in ("a", "b"):
            assert same(agg.values_at(entity, t), reference(events, entity, t))


def test_checks() -> None:
    with pytest.raises(InvalidArgumentError, match="lack column"):
        TileAggregator(AGGS, TILE).add(["e"], [0], [0], {"x": [1.0]})
    with pytest.raises(InvalidArgumentError, match="1 entity ids but 2 event times"):
        TileAggregator(AGGS, TILE).add(["e"], [0, 1], [0], {"x": [1.0], "y": [1.0], "k": ["a"]})
    with pytest.raises(InvalidArgumentError, match="whole number of tiles"):
        TileAggregator(AGGS, 7 * M)
    with pytest.raises(InvalidArgumentError, match="lateness"):
        TileAggregator(AGGS, TILE, allowed_lateness_us=-1)
    with pytest.raises(InvalidArgumentError, match="has no aggregations"):
        from carrara.feature_cache import Feature

        TileAggregator.for_group(FeatureGroup(name="g", entity="e", features=(Feature(name="f"),)))
    empty = TileAggregator(AGGS, TILE)
    assert empty.late_mask(np.array([], dtype=np.int64)).tolist() == []
    assert empty.values_at("nobody", 0)["event_count_1m"] == 0
    assert empty.next_change("nobody", 0) is None
