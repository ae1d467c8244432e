"""Point-in-time joins against a brute-force reference on randomized data."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.feature_cache import Definitions

US = 1_000_000
HOUR = 3600 * US
BASE_US = 1_709_251_200 * US  # 2024-03-01 UTC


def _to_ts(us: list[int]) -> pa.Array:
    return pa.array(us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def _random_rows(
    rng: random.Random, entities: list[str], n: int, features: dict[str, str]
) -> list[dict[str, Any]]:
    """Rows on a coarse hourly grid (many duplicate event times), unique created times."""
    created = rng.sample(range(1, 50 * n), n)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "entity_id": rng.choice(entities),
            "event_timestamp": BASE_US + rng.randrange(0, 24 * 8) * HOUR,
            "created_timestamp": BASE_US + created[i] * US,
        }
        for name, dtype in features.items():
            if rng.random() < 0.1:
                row[name] = None
            elif dtype == "int64":
                row[name] = rng.randrange(-1000, 1000)
            elif dtype == "bool":
                row[name] = rng.random() < 0.5
            else:
                row[name] = round(rng.uniform(-100, 100), 3)
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]], features: dict[str, str]) -> pa.Table:
    types = {
        "float64": pa.float64(),
        "float32": pa.float32(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
    }
    cols: dict[str, pa.Array] = {
        "entity_id": pa.array([r["entity_id"] for r in rows], pa.string()),
        "event_timestamp": _to_ts([r["event_timestamp"] for r in rows]),
        "created_timestamp": _to_ts([r["created_timestamp"] for r in rows]),
    }
    for name, dtype in features.items():
        cols[name] = pa.array([r[name] for r in rows], types[dtype])
    return pa.table(cols)


def _brute_force(
    label_key: str, ts_us: int, rows: list[dict[str, Any]], ttl_us: int, names: list[str]
) -> list[Any]:
    best = None
    for r in rows:
        if r["entity_id"] != label_key or r["event_timestamp"] > ts_us:
            continue
        if ttl_us and r["event_timestamp"] < ts_us - ttl_us:
            continue
        if best is None or (r["event_timestamp"], r["created_timestamp"]) > (
            best["event_timestamp"],
            best["created_timestamp"],
        ):
            best = r
    return [None if best is None else best[n] for n in names]


TRIPS = {"fare_mean": "float64", "fare_p50": "float32", "trip_count": "int64"}
RATINGS = {"rating": "float32", "vip": "bool"}


def _norm(value: Any, dtype: str) -> Any:
    if value is None:
        return None
    if dtype == "float32":
        return float(np.float32(value))
    return value


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_brute_force_on_random_data(
    service: Any, definitions: Definitions, fc: Any, seed: int
) -> None:
    rng = random.Random(seed)
    service.apply(definitions)
    drivers = [f"d{i}" for i in range(12)]
    riders = [f"r{i}" for i in range(8)]
    trips = _random_rows(rng, drivers, 600, TRIPS)
    ratings = _random_rows(rng, riders, 300, RATINGS)
    # Appended in several files; later files hold "late" rows with older event times.
    trips_sorted = sorted(trips, key=lambda r: r["created_timestamp"])
    for chunk in (trips_sorted[:200], trips_sorted[200:450], trips_sorted[450:]):
        service.write_offline("trips", _table(chunk, TRIPS))
    service.write_offline("ratings", _table(ratings, RATINGS))

    ttl = service.group("trips").definition.ttl_us
    label_ts: list[int] = []
    for _ in range(300):
        r = rng.choice(trips)
        # exact event times, exact TTL edges (in and just out), one microsecond before, random
        label_ts.append(
            rng.choice(
                [
                    r["event_timestamp"],
                    r["event_timestamp"] + ttl,
                    r["event_timestamp"] + ttl + 1,
                    r["event_timestamp"] - 1,
                    BASE_US + rng.randrange(-24, 24 * 10) * HOUR + rng.randrange(0, HOUR),
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
    result = service.get_training_set(entity_df, ["trips:*", "ratings:rating", "ratings:vip"])
    got = result.table.to_pylist()
    assert len(got) == n
    differences = found = 0
    for i, row in enumerate(got):
        assert row["driver_id"] == entity_df["driver_id"][i]  # input order kept
        assert row["label"] == entity_df["label"][i]
        want_t = _brute_force(row["driver_id"], label_ts[i], trips, ttl, list(TRIPS))
        want_r = _brute_force(row["rider_id"], label_ts[i], ratings, 0, list(RATINGS))
        have_t = [row[f"trips__{f}"] for f in TRIPS]
        have_r = [row[f"ratings__{f}"] for f in RATINGS]
        want = [
            _norm(v, d)
            for v, d in zip(want_t + want_r, [*TRIPS.values(), *RATINGS.values()], strict=True)
        ]
        differences += have_t + have_r != want
        found += want_t[0] is not None
    assert differences == 0
    assert n // 4 < found < n  # the data exercise both hits and misses (TTL, unknown ids)
    assert result.snapshot_ref.startswith("ds-")
    assert msgspec.json.decode(service.catalog.snapshot(result.snapshot_ref))["groups"][0] == {
        "group": "trips",
        "version": 1,
        "fingerprint": service.group("trips").fingerprint,
        "features": list(TRIPS),
        "entity_column": "driver_id",
        "ttl_days": 2.0,
    }


def test_no_future_value_leaks_and_ties_go_to_the_latest_write(
    service: Any, definitions: Definitions, fc: Any
) -> None:
    service.apply(definitions)
    rows = pd.DataFrame(
        {
            "entity_id": ["d1", "d1", "d1"],
            "event_timestamp": [fc.ts(0), fc.ts(0), fc.ts(10)],
            "created_timestamp": [fc.ts(5), fc.ts(6), fc.ts(11)],
            "fare_mean": [1.0, 2.0, 3.0],
            "fare_p50": [0.0, 0.0, 0.0],
            "trip_count": [1, 2, 3],
        }
    )
    service.write_offline("trips", rows)
    labels = pd.DataFrame(
        {
            "driver_id": ["d1", "d1", "d1", "d1"],
            "event_timestamp": [fc.ts(-1), fc.ts(0), fc.ts(9.999999), fc.ts(10)],
        }
    )
    out = service.get_training_set(labels, ["trips:fare_mean"]).to_pandas()
    assert out["trips__fare_mean"].tolist()[1:] == [2.0, 2.0, 3.0]
    assert pd.isna(out["trips__fare_mean"][0])


def test_input_types_give_the_same_table(service: Any, definitions: Definitions, fc: Any) -> None:
    service.apply(definitions)
    service.write_offline(
        "trips",
        pd.DataFrame(
            {
                "entity_id": ["d1", "d2"],
                "event_timestamp": [fc.ts(0), fc.ts(0)],
                "fare_mean": [1.5, 2.5],
                "fare_p50": [1.0, 2.0],
                "trip_count": [3, 4],
            }
        ),
    )
    labels = pd.DataFrame(
        {"driver_id": ["d2", "d1", "d3"], "event_timestamp": [fc.ts(1), fc.ts(2), fc.ts(3)]}
    )
    a = service.get_training_set(labels, ["trips:*"])
    b = service.get_training_set(pl.from_pandas(labels), ["trips:*"])
    c = service.get_training_set(pa.Table.from_pandas(labels, preserve_index=False), ["trips:*"])
    assert a.table.to_pylist() == b.table.to_pylist() == c.table.to_pylist()
    assert a.snapshot_ref == c.snapshot_ref  # same inputs, same reference
    assert a.table.column("trips__fare_mean").to_pylist() == [2.5, 1.5, None]
    # naive datetimes and integer microseconds are UTC too
    naive = labels.assign(event_timestamp=labels["event_timestamp"].dt.tz_localize(None))
    assert service.get_training_set(naive, ["trips:*"]).table.column(
        "trips__fare_mean"
    ).to_pylist() == [2.5, 1.5, None]


def test_bad_requests_explain_the_fix(service: Any, definitions: Definitions, fc: Any) -> None:
    service.apply(definitions)
    labels = pd.DataFrame({"driver_id": ["d1"], "event_timestamp": [fc.ts(0)]})
    with pytest.raises(NotFoundError, match="has no feature 'fare_p95'; known: fare_mean"):
        service.get_training_set(labels, ["trips:fare_p95"])
    with pytest.raises(InvalidArgumentError, match="needs a column 'rider_id'"):
        service.get_training_set(labels, ["ratings:rating"])
    with pytest.raises(InvalidArgumentError, match="'group:feature'"):
        service.get_training_set(labels, ["fare_mean"])
    with pytest.raises(NotFoundError, match="unknown feature group 'nope'"):
        service.get_training_set(labels, ["nope:x"])
    with pytest.raises(InvalidArgumentError, match="no column 'ts'"):
        service.get_training_set(labels, ["trips:fare_mean"], timestamp_column="ts")


def test_groups_without_data_and_column_clashes(
    service: Any, definitions: Definitions, fc: Any
) -> None:
    service.apply(definitions)
    labels = pd.DataFrame({"driver_id": ["d1", "d2"], "event_timestamp": [fc.ts(0), fc.ts(1)]})
    out = service.get_training_set(labels, ["trips:fare_mean", "trips:trip_count"])
    assert out.table.column("trips__fare_mean").to_pylist() == [None, None]
    assert out.table.column_names == [
        "driver_id",
        "event_timestamp",
        "trips__fare_mean",
        "trips__trip_count",
    ]
    empty = service.get_training_set(labels.iloc[:0], ["trips:fare_mean"])
    assert empty.table.num_rows == 0
    with pytest.raises(InvalidArgumentError, match="trips__fare_mean would appear twice"):
        service.get_training_set(labels.assign(trips__fare_mean=1.0), ["trips:fare_mean"])
    with pytest.raises(InvalidArgumentError, match="reserved"):
        service.get_training_set(labels.assign(__x=1), ["trips:fare_mean"])


def test_times_before_1970(service: Any, definitions: Definitions) -> None:
    service.apply(definitions)
    t = pd.Timestamp("1969-12-31 23:00", tz="UTC")
    service.write_offline(
        "trips",
        pd.DataFrame(
            {
                "entity_id": ["d1", "d1", "d1"],
                "event_timestamp": [t, t, t + pd.Timedelta(minutes=30)],
                "created_timestamp": [t, t + pd.Timedelta(seconds=1), t],
                "fare_mean": [1.0, 2.0, 3.0],
                "fare_p50": [0.0, 0.0, 0.0],
                "trip_count": [1, 2, 3],
            }
        ),
    )
    labels = pd.DataFrame(
        {
            "driver_id": ["d1", "d1", "d1"],
            "event_timestamp": [
                t - pd.Timedelta(seconds=1),
                t + pd.Timedelta(minutes=1),
                t + pd.Timedelta(hours=2),
            ],
        }
    )
    out = service.get_training_set(labels, ["trips:fare_mean"]).table
    assert out.column("trips__fare_mean").to_pylist() == [None, 2.0, 3.0]


@st.composite
def _pit_case(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[str, int]], int]:
    n = draw(st.integers(0, 25))
    created = draw(st.permutations(range(n)))  # distinct write times: ties fully resolved
    rows = [
        {
            "entity_id": draw(st.sampled_from(["a", "b", "c"])),
            "event_timestamp": BASE_US + draw(st.integers(-3, 12)) * US,
            "created_timestamp": BASE_US + created[i] * US,
            "fare_mean": draw(st.one_of(st.none(), st.floats(-10, 10, allow_nan=False))),
            "fare_p50": 0.0,
            "trip_count": i,
        }
        for i in range(n)
    ]
    labels = draw(
        st.lists(st.tuples(st.sampled_from(["a", "b", "c", "z"]), st.integers(-5, 15)), min_size=1)
    )
    ttl_s = draw(st.sampled_from([0, 1, 2, 5]))
    return rows, [(e, BASE_US + t * US) for e, t in labels], ttl_s


def check_pit_case(case: Any, open_store: Any) -> None:
    """Run one generated case (rows in two appends, the second "late") through
    ``point_in_time_join`` on the store ``open_store(root)`` gives, and compare every label
    row with the brute force. Shared by every offline engine's property test."""
    import tempfile

    from carrara.feature_cache import Catalog, Entity, Feature, FeatureGroup
    from carrara.feature_cache.pit_join import FeatureRequest, point_in_time_join

    rows, labels, ttl_s = case
    group = FeatureGroup(
        name="trips",
        entity="driver",
        features=(
            Feature(name="fare_mean", dtype="float64"),
            Feature(name="fare_p50"),
            Feature(name="trip_count", dtype="int64"),
        ),
        ttl_days=ttl_s / 86_400,
    )
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(f"sqlite:///{tmp}/c.db")
        offline = open_store(f"{tmp}/offline")
        try:
            catalog.apply(Definitions(entities=(Entity(name="driver"),), groups=(group,)))
            g = catalog.get_group("trips")
            half = len(rows) // 2  # two appends: the second holds "late" rows
            for part in (rows[half:], rows[:half]):
                if part:
                    offline.append(g, _table(part, TRIPS))
            entity_df = pa.table(
                {
                    "driver_id": [e for e, _ in labels],
                    "event_timestamp": _to_ts([t for _, t in labels]),
                }
            )
            out = point_in_time_join(
                entity_df, [FeatureRequest(g, ("fare_mean", "trip_count"), "driver_id")], offline
            ).table.to_pylist()
        finally:
            offline.close()
            catalog.close()
    for (entity, t), row in zip(labels, out, strict=True):
        want = _brute_force(entity, t, rows, g.definition.ttl_us, ["fare_mean", "trip_count"])
        assert [row["trips__fare_mean"], row["trips__trip_count"]] == want


@settings(max_examples=40, deadline=None)
@given(case=_pit_case())
def test_property_matches_brute_force(case: Any) -> None:
    from carrara.feature_cache.offline_store import DuckDBOfflineStore

    check_pit_case(case, DuckDBOfflineStore)


def test_star_mixes_with_explicit_refs(service: Any, definitions: Definitions, fc: Any) -> None:
    service.apply(definitions)
    service.write_offline(
        "trips",
        pd.DataFrame(
            {
                "entity_id": ["d1"],
                "event_timestamp": [fc.ts(0)],
                "fare_mean": [1.5],
                "fare_p50": [1.0],
                "trip_count": [3],
            }
        ),
    )
    labels = pd.DataFrame({"driver_id": ["d1"], "event_timestamp": [fc.ts(1)]})
    # as docs/features.md shows: an explicit feature, then the rest of the group; each once
    out = service.get_training_set(labels, ["trips:trip_count", "trips:*", "trips:fare_mean"])
    assert out.table.column_names == [
        "driver_id",
        "event_timestamp",
        "trips__trip_count",
        "trips__fare_mean",
        "trips__fare_p50",
    ]
    assert out.table.to_pylist()[0]["trips__trip_count"] == 3
    assert service.get_training_set(labels, ["trips:*", "trips:*"]).table.column_names == [
        "driver_id",
        "event_timestamp",
        "trips__fare_mean",
        "trips__fare_p50",
        "trips__trip_count",
    ]


@pytest.mark.parametrize(("scale", "unit"), [(1, '"s"'), (1000, '"ms"'), (1000 * US, '"ns"')])
def test_integer_label_times_in_another_unit_are_refused(
    service: Any, definitions: Definitions, scale: int, unit: str
) -> None:
    service.apply(definitions)
    seconds = BASE_US // US
    labels = pd.DataFrame({"driver_id": ["d1", "d2"], "event_timestamp": [seconds, seconds + 60]})
    labels["event_timestamp"] *= scale
    with pytest.raises(InvalidArgumentError, match=rf"pd.to_datetime\(.*unit={unit}"):
        service.get_training_set(labels, ["trips:fare_mean"])
    # integer microseconds (the documented unit) still work
    micros = labels.assign(event_timestamp=[BASE_US, BASE_US + 60 * US])
    out = service.get_training_set(micros, ["trips:fare_mean"])
    assert out.table.num_rows == 2
