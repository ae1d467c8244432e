"""Zero training/serving skew for windowed aggregations.

Random events for random entities go through the real event log (local) and the streaming
materializer (tiles, injected clock), arriving out of order within the lateness bound. At
random read times ``t`` (the clock at ``t``, every event dated up to ``t`` delivered,
``refresh(t)`` run), the online value of every entity, function, window and bucket equals,
as float32, (a) the reference semantics over the stored events and (b) the offline engine's
value for a label at ``t`` (a training set) — on every offline engine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from carrara.feature_cache import (
    Aggregation,
    Definitions,
    Entity,
    FeatureGroup,
    FeatureService,
)
from carrara.feature_cache.aggregations import reference_values
from carrara.feature_cache.streaming import StreamingMaterializer, publish_rows
from carrara.feature_cache.tiles import TileAggregator

S = 1_000_000
M = 60 * S
T0 = 1_709_251_200 * S  # 2024-03-01T00:00:00Z
LATENESS = 90 * S
ENTITIES = [f"r{i}" for i in range(6)]

GROUP = FeatureGroup(
    name="rides",
    entity="rider",
    tile="1m",
    aggregations=(
        Aggregation(function="count", windows=("1m", "5m")),
        Aggregation(function="count", column="fare", windows=("3m",)),
        Aggregation(function="sum", column="fare", windows=("1m", "3m", "10m")),
        Aggregation(function="mean", column="fare", windows=("5m",)),
        Aggregation(function="min", column="fare", windows=("3m",)),
        Aggregation(function="max", column="fare", windows=("10m",)),
        Aggregation(function="last", column="fare", windows=("2m", "10m")),
        Aggregation(function="count_distinct", column="fare", windows=("5m",)),
        Aggregation(
            function="sum",
            column="fare",
            windows=("2m", "5m"),
            bucket_column="kind",
            buckets=("card", "cash"),
        ),
        Aggregation(
            function="count", windows=("3m",), bucket_column="kind", buckets=("card", "cash")
        ),
        Aggregation(
            function="last", column="tip", windows=("5m",), bucket_column="kind", buckets=("card",)
        ),
    ),
)
DEFINITIONS = Definitions(entities=(Entity(name="rider", join_key="rider_id"),), groups=(GROUP,))

#: Offline engines the skew test runs on (another engine is added here by its name).
ENGINES = ["duckdb", "spark"]


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


@pytest.fixture(params=ENGINES)
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeatureService]:
    if request.param == "spark":
        request.getfixturevalue("spark_session")  # Java + pyspark, one session per run
    svc = FeatureService.open(
        catalog_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        offline_path=str(tmp_path / "offline"),
        online_url="memory://",
        event_log_url=f"local:///{tmp_path / 'events.db'}",
        offline_engine=request.param,
    )
    svc.apply(DEFINITIONS)
    yield svc
    svc.close()


def materializer(svc: FeatureService, clock: Clock, name: str = "skew") -> StreamingMaterializer:
    assert svc.event_log is not None
    return StreamingMaterializer(
        svc.event_log,
        svc.offline,
        svc.online,
        svc.group,
        svc.transform_rows,
        consumer_group=name,
        now_us=clock,
        allowed_lateness_us=LATENESS,
        groups=svc.list_groups,
    )


def random_events(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Source rows over 30 minutes: integer-valued fares (exact float32 sums), nulls, ties on
    event time, three bucket values and none."""

    def value() -> float | None:
        return None if rng.random() < 0.15 else float(rng.randint(-20, 40))

    rows = []
    for _ in range(n):
        ts = T0 + rng.randrange(0, 30 * M, rng.choice([S, 15 * S, M]))
        rows.append(
            {
                "rider_id": rng.choice(ENTITIES),
                "event_timestamp": ts,
                "fare": value(),
                "tip": value(),
                "kind": rng.choice(["card", "cash", "other", None]),
            }
        )
    return rows


def arrival_order(rng: random.Random, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Out of order within the lateness: sorted by event time plus a delay below it (a later
    arrival is never more than the lateness behind an earlier one)."""
    keyed = [(r["event_timestamp"] + rng.randrange(LATENESS), i, r) for i, r in enumerate(rows)]
    return [r for _, _, r in sorted(keyed, key=lambda k: (k[0], k[1]))]


def read_times(rng: random.Random) -> list[int]:
    """Increasing read times over the events and after them (windows sliding to empty),
    with tile boundaries and the instants around them."""
    times = {T0 + rng.randrange(0, 45 * M) for _ in range(14)}
    for k in rng.sample(range(0, 45), 4):
        times |= {T0 + k * M - 1, T0 + k * M, T0 + k * M + 1}
    return sorted(times)


def stored_events(svc: FeatureService) -> list[dict[str, Any]]:
    table = svc.offline.read(svc.group(GROUP.name))
    events = []
    for row in table.to_pylist():
        row["event_timestamp"] = _us(row["event_timestamp"])
        row["created_timestamp"] = _us(row["created_timestamp"])
        events.append(row)
    return events


def _us(t: Any) -> int:
    return int(pa.scalar(t, pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py())


def f32(v: Any) -> float | None:
    return None if v is None else float(np.float32(v))


def online_values(svc: FeatureService) -> dict[str, dict[str, float | None] | None]:
    got = svc.get_online(GROUP.name, ENTITIES)
    out: dict[str, dict[str, float | None] | None] = {}
    for i, entity in enumerate(ENTITIES):
        if not got.found[i]:
            out[entity] = None
            continue
        out[entity] = {
            name: None if got.missing[i, j] else float(got.values[i, j])
            for j, name in enumerate(got.features)
        }
    return out


def offline_values(svc: FeatureService, t: int) -> dict[str, dict[str, float | None]]:
    labels = pa.table(
        {
            "rider_id": ENTITIES,
            "event_timestamp": pa.array([t] * len(ENTITIES), pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
        }
    )
    table = svc.get_training_set(labels, [f"{GROUP.name}:*"]).to_arrow()
    out = {}
    for row in table.to_pylist():
        out[row["rider_id"]] = {
            name: f32(row[f"{GROUP.name}__{name}"]) for name in GROUP.feature_names
        }
    return out


# Each read is a Spark job (~1 s on local[2]): one seed on Spark keeps the run within CI's
# budget; DuckDB runs three.
@pytest.mark.parametrize(
    ("service", "seed"),
    [("duckdb", 1), ("duckdb", 2), ("duckdb", 3), ("spark", 1)],
    indirect=["service"],
)
def test_online_equals_offline_equals_reference(service: FeatureService, seed: int) -> None:
    rng = random.Random(seed)
    rows = arrival_order(rng, random_events(rng, 220))
    clock = Clock(T0)
    m = materializer(service, clock)
    assert service.event_log is not None
    outs = service.group(GROUP.name).definition.outputs
    delivered = 0
    checked = 0
    for t in read_times(rng):
        clock.t = t
        # Deliver (in arrival order) up to the last event dated at or before t: later ones
        # that arrived before it come along (events "from the future" for the clock).
        last = max((i for i, r in enumerate(rows) if r["event_timestamp"] <= t), default=-1)
        batch = rows[delivered : last + 1]
        delivered = max(delivered, last + 1)
        while batch:
            k = rng.randint(1, len(batch))
            publish_rows(service.event_log, GROUP.name, batch[:k], batch=rng.randint(1, 40))
            batch = batch[k:]
        r = m.run(stop_when_idle=True, count=rng.choice([1, 7, 100]))
        assert r.late_events == 0 and r.skipped_events == 0
        m.refresh(t)

        events = stored_events(service)
        assert len(events) == delivered  # every event delivered is stored, once
        online = online_values(service)
        offline = offline_values(service, t)
        for entity in ENTITIES:
            mine = [e for e in events if e["entity_id"] == entity]
            want = {k: f32(v) for k, v in reference_values(mine, t, outs, GROUP.tile_us).items()}
            assert offline[entity] == want, (t - T0, entity)
            if online[entity] is None:  # nothing delivered for it yet: the empty values
                assert not mine and want == empty_values(outs), (t - T0, entity)
                continue
            assert online[entity] == want, (t - T0, entity, online[entity], want)
            checked += 1
    assert delivered == len(rows) and checked > 30


def empty_values(outs: Any) -> dict[str, float | None]:
    return {k: f32(v) for k, v in reference_values([], 0, outs, GROUP.tile_us).items()}


def test_too_late_events_are_dropped_from_both_stores(service: FeatureService) -> None:
    clock = Clock(T0 + 20 * M)
    m = materializer(service, clock)
    assert service.event_log is not None
    row = {"rider_id": "r0", "fare": 5.0, "tip": 1.0, "kind": "card"}
    publish_rows(service.event_log, GROUP.name, [{**row, "event_timestamp": T0 + 20 * M}])
    publish_rows(
        service.event_log,
        GROUP.name,
        [
            {**row, "event_timestamp": T0 + 20 * M - LATENESS - 1, "fare": 100.0},  # too late
            {**row, "event_timestamp": T0 + 20 * M - LATENESS, "fare": 7.0},  # just in time
        ],
    )
    r = m.run(stop_when_idle=True)
    assert (r.events, r.rows, r.late_events, r.offline_rows) == (2, 2, 1, 2)
    assert sorted(e["fare"] for e in stored_events(service)) == [5.0, 7.0]
    values = online_values(service)["r0"]
    assert values is not None
    assert values["fare_sum_3m"] == 12.0 and values["fare_max_10m"] == 7.0
    assert offline_values(service, clock.t)["r0"] == values


def test_a_restarted_materializer_serves_exact_values(service: FeatureService) -> None:
    """The tiles come back from the offline store's events: after a restart (and windows
    sliding meanwhile) the values equal the offline engine's, and later events add to them."""
    rng = random.Random(7)
    rows = sorted(random_events(rng, 80), key=lambda r: r["event_timestamp"])
    clock = Clock(T0 + 30 * M)
    assert service.event_log is not None
    publish_rows(service.event_log, GROUP.name, rows)
    first = materializer(service, clock)
    assert first.run(stop_when_idle=True).rows == 80

    clock.t = T0 + 33 * M + 5 * S  # down for a while: windows slid, nothing refreshed them
    service.online.delete_many(service.online.keys(GROUP.name, 1, ENTITIES))
    second = materializer(service, clock)
    assert second.start() == 1
    online = online_values(service)
    offline = offline_values(service, clock.t)
    for entity in ENTITIES:
        if online[entity] is not None:
            assert online[entity] == offline[entity], entity
    assert any(online[e] is not None for e in ENTITIES)
    # the next event after the restart
    publish_rows(
        service.event_log,
        GROUP.name,
        [{"rider_id": "r1", "event_timestamp": clock.t, "fare": 3.0, "tip": None, "kind": "cash"}],
    )
    second.run(stop_when_idle=True)
    clock.t += 4 * M
    second.refresh(clock.t)
    online, offline = online_values(service), offline_values(service, clock.t)
    assert online["r1"] == offline["r1"]
    for entity in ENTITIES:
        if online[entity] is not None:
            assert online[entity] == offline[entity], entity


def test_tiles_and_offline_agree_on_the_stored_events(service: FeatureService) -> None:
    """A rebuilt aggregator over the stored events answers like the offline engine at any
    time within the lateness of the newest event."""
    rng = random.Random(11)
    rows = random_events(rng, 120)
    service.ingest(GROUP.name, rows)
    events = stored_events(service)
    group = service.group(GROUP.name)
    agg = TileAggregator.for_group(group.definition, allowed_lateness_us=LATENESS)
    agg.add_table(service.offline.read(group), check_lateness=False)
    for t in sorted(rng.sample(range(T0 + 29 * M, T0 + 45 * M), 5)):
        offline = offline_values(service, t)
        for entity in ENTITIES:
            mine = {k: f32(v) for k, v in agg.values_at(entity, t).items()}
            assert mine == offline[entity]
            assert all(e["entity_id"] in ENTITIES for e in events)


def test_a_redelivered_batch_counts_once(tmp_path: Path) -> None:
    """At-least-once: the online write fails after the offline append, the events are handed
    out again and written again; they carry the write times they were published with, so the
    offline engine, the tiles and the served values count them once."""
    from carrara.errors import UnavailableError

    svc = FeatureService.open(
        catalog_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        offline_path=str(tmp_path / "offline"),
        online_url="memory://",
        event_log_url=f"local:///{tmp_path / 'events.db'}?visibility_timeout_ms=50",
    )
    try:
        svc.apply(DEFINITIONS)
        clock = Clock(T0 + 10 * M)
        m = materializer(svc, clock)
        assert svc.event_log is not None
        rows = [
            {"rider_id": "r1", "event_timestamp": T0 + 9 * M + i * S, "fare": float(i)}
            | {"tip": 1.0, "kind": "card"}
            for i in range(5)
        ]
        publish_rows(svc.event_log, GROUP.name, rows)
        m.run_once()  # the tiles and the online store start from the stored (empty) state
        real = svc.online.write_vectors
        calls = {"n": 0}

        def down_once(*args: Any, **kwargs: Any) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                raise UnavailableError("online store down")
            return real(*args, **kwargs)

        svc.online.write_vectors = down_once  # type: ignore[method-assign]
        publish_rows(
            svc.event_log, GROUP.name, [{**rows[0], "event_timestamp": T0 + 9 * M + 30 * S}]
        )
        with pytest.raises(UnavailableError):
            m.run_once()
        import time

        time.sleep(0.2)  # past the visibility timeout: the event is handed out again
        again = m.run_once()
        assert again.events == 1 and again.offline_rows == 1  # written offline a second time
        assert len(stored_events(svc)) == 7  # 5 + the replayed event twice, rows identical
        values = online_values(svc)["r1"]
        assert values is not None and values["event_count_5m"] == 6  # counted once
        assert values["fare_sum_10m"] == 0 + 1 + 2 + 3 + 4 + 0
        assert offline_values(svc, clock.t)["r1"] == values
    finally:
        svc.close()
