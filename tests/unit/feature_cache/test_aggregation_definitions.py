"""Windowed-aggregation definitions: generated features, validation, versioning, and the
reference semantics (sawtooth windows over tiles) on hand-computed cases."""

from __future__ import annotations

import msgspec
import pytest

from carrara.errors import InvalidArgumentError
from carrara.feature_cache import Aggregation, FeatureGroup
from carrara.feature_cache.aggregations import (
    outputs,
    parse_duration,
    reference_values,
    window_start,
)

H = 3_600_000_000
M = 60_000_000


def group(**kw: object) -> FeatureGroup:
    base: dict[str, object] = {
        "name": "trips",
        "entity": "rider",
        "tile": "1h",
        "aggregations": (
            Aggregation(function="sum", column="fare", windows=("1h", "1d")),
            Aggregation(
                function="count", windows=("1d",), bucket_column="kind", buckets=("card", "cash")
            ),
        ),
    }
    base.update(kw)
    return FeatureGroup(**base)  # type: ignore[arg-type]


def test_features_are_the_generated_outputs() -> None:
    g = group()
    assert g.feature_names == (
        "fare_sum_1h",
        "fare_sum_1d",
        "event_count_card_1d",
        "event_count_cash_1d",
    )
    assert [f.dtype for f in g.features] == ["float64", "float64", "int64", "int64"]
    assert g.event_columns == {"fare": "float64", "kind": "string"}
    assert g.is_aggregated and g.tile_us == H
    # Stored as JSON in the catalog, read back equal (the generated features included).
    assert msgspec.json.decode(msgspec.json.encode(g), type=FeatureGroup) == g


def test_versioning_sees_windows_tile_and_functions() -> None:
    base = group().schema_fingerprint()
    assert group(tile="30m").schema_fingerprint() != base
    other = (Aggregation(function="mean", column="fare", windows=("1h", "1d")),)
    assert group(aggregations=other).schema_fingerprint() != base
    assert group(description="edited").schema_fingerprint() == base


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tile": "7m"}, "not a whole number of tiles of 7m"),
        ({"tile": "1x"}, "invalid tile '1x'"),
        ({"ttl_days": 3.0}, "ttl_days does not apply"),
        (
            {
                "aggregations": (Aggregation(function="sum", column="fare", windows=("1h",)),),
                "features": (),
            },
            None,
        ),
    ],
)
def test_group_checks(kw: dict[str, object], message: str | None) -> None:
    if message is None:
        assert group(**kw).feature_names == ("fare_sum_1h",)
        return
    with pytest.raises(InvalidArgumentError, match=message):
        group(**kw)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"function": "median", "column": "x", "windows": ("1h",)}, "unknown aggregation function"),
        ({"function": "sum", "windows": ("1h",)}, "needs a column"),
        ({"function": "sum", "column": "x", "windows": ()}, "declares no windows"),
        ({"function": "sum", "column": "x", "windows": ("1h", "1h")}, "repeats a window"),
        ({"function": "sum", "column": "x", "windows": ("1 h",)}, "invalid window"),
        (
            {"function": "sum", "column": "x", "windows": ("1h",), "buckets": ("a",)},
            "both bucket_column",
        ),
        (
            {
                "function": "sum",
                "column": "x",
                "windows": ("1h",),
                "bucket_column": "x",
                "buckets": ("a",),
            },
            "cannot be the aggregated",
        ),
        (
            {"function": "count", "windows": ("1h",), "bucket_column": "k", "buckets": ("A",)},
            "lowercase",
        ),
    ],
)
def test_aggregation_checks(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Aggregation(**kw)  # type: ignore[arg-type]


def test_durations() -> None:
    assert [parse_duration(d) for d in ("30s", "15m", "1h", "7d")] == [
        30_000_000,
        15 * M,
        H,
        7 * 24 * H,
    ]


def test_sawtooth_window_start() -> None:
    # At 10:20 a 1h window over 1h tiles holds only the current tile, from 10:00; a 3h window
    # the two tiles before it too, from 08:00.
    t = 10 * H + 20 * M
    assert window_start(t, H, H) == 10 * H
    assert window_start(t, 3 * H, H) == 8 * H
    # Over 15-minute tiles, the 1h window starts at 09:30 (10:15's tile and the three before).
    assert window_start(t, H, 15 * M) == 9 * H + 30 * M


def test_reference_values_by_hand() -> None:
    aggs = (
        Aggregation(function="count", windows=("1h", "3h")),
        Aggregation(function="sum", column="fare", windows=("1h", "3h")),
        Aggregation(function="mean", column="fare", windows=("1h",)),
        Aggregation(function="min", column="fare", windows=("3h",)),
        Aggregation(function="max", column="fare", windows=("3h",)),
        Aggregation(function="last", column="fare", windows=("3h",)),
        Aggregation(function="count_distinct", column="fare", windows=("3h",)),
        Aggregation(
            function="sum", column="fare", windows=("3h",), bucket_column="kind", buckets=("card",)
        ),
    )
    events = [
        {
            "event_timestamp": 7 * H + 59 * M,
            "created_timestamp": 1,
            "fare": 100.0,
            "kind": "card",
        },  # before 08:00
        {"event_timestamp": 8 * H, "created_timestamp": 1, "fare": 4.0, "kind": "card"},
        {"event_timestamp": 9 * H + 30 * M, "created_timestamp": 1, "fare": 6.0, "kind": "cash"},
        {"event_timestamp": 10 * H + 5 * M, "created_timestamp": 2, "fare": 2.0, "kind": "card"},
        {"event_timestamp": 10 * H + 5 * M, "created_timestamp": 1, "fare": 9.0, "kind": "cash"},
        {"event_timestamp": 10 * H + 6 * M, "created_timestamp": 1, "fare": None, "kind": "card"},
        {
            "event_timestamp": 10 * H + 30 * M,
            "created_timestamp": 1,
            "fare": 50.0,
            "kind": "card",
        },  # after t
    ]
    values = reference_values(events, 10 * H + 20 * M, outputs(aggs), H)
    assert values == {
        "event_count_1h": 3,  # 10:05, 10:05, 10:06 (count without a column counts events)
        "event_count_3h": 5,
        "fare_sum_1h": 11.0,
        "fare_sum_3h": 21.0,
        "fare_mean_1h": 5.5,
        "fare_min_3h": 2.0,
        "fare_max_3h": 9.0,
        "fare_last_3h": 2.0,  # 10:05 twice: the later write wins; 10:06 has no fare
        "fare_count_distinct_3h": 4,
        "fare_sum_card_3h": 6.0,
    }
    empty = reference_values([], 10 * H, outputs(aggs), H)
    assert empty["event_count_1h"] == 0 and empty["fare_sum_1h"] == 0.0
    assert empty["fare_mean_1h"] is None and empty["fare_last_3h"] is None
