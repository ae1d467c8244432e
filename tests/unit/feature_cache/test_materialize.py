"""Batch and streaming materialization, on the embedded and the real backends."""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pandas as pd
import pytest

from carrara.feature_cache import Definitions, FeatureService, transform

DAY_S = 86_400


@transform("test_trip_stats")
def trip_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Source trips -> features; shared by batch ingestion and the stream consumer."""
    return pd.DataFrame(
        {
            "driver_id": df["driver_id"],
            "event_timestamp": df["event_timestamp"],
            "fare_mean": df["fare"] / df["trips"].clip(lower=1),
            "fare_p50": df["fare"] / 2,
            "trip_count": df["trips"],
        }
    )


def _defs(fc: Any) -> Definitions:
    return Definitions(
        entities=(fc.DRIVER,),
        groups=(fc.trips_group(transform="test_trip_stats", source="stream:trips"),),
    )


def _source_rows(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    now_us = time.time_ns() // 1000
    return [
        {
            "driver_id": f"d{rng.randrange(15)}",
            # within the last day on a 5-minute grid: event-time ties and out-of-order times
            "event_timestamp": now_us - rng.randrange(0, DAY_S // 300) * 300 * 1_000_000,
            "fare": round(rng.uniform(1, 100), 2),
            "trips": rng.randrange(0, 20),
        }
        for _ in range(n)
    ]


def _latest_reference(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Latest transformed row per driver (later-published rows win event-time ties)."""
    best: dict[str, tuple[int, int, list[float]]] = {}
    for i, r in enumerate(rows):
        values = [r["fare"] / max(r["trips"], 1), r["fare"] / 2, float(r["trips"])]
        key = (r["event_timestamp"], i)
        if r["driver_id"] not in best or key > best[r["driver_id"]][:2]:
            best[r["driver_id"]] = (*key, values)
    return {k: v[2] for k, v in best.items()}


def _online(service: FeatureService, ids: list[str]) -> dict[str, list[float] | None]:
    got = service.get_online("trips", ids)
    return {e: (got.values[i].tolist() if got.found[i] else None) for i, e in enumerate(ids)}


def _close(a: dict[str, list[float] | None], b: dict[str, list[float]]) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(
        v is not None and np.allclose(v, b[k], rtol=1e-6) for k, v in a.items()
    )


def test_batch_materialization_is_incremental_and_idempotent(
    service: FeatureService, fc: Any
) -> None:
    service.apply(_defs(fc))
    rows = _source_rows(1, 200)
    service.ingest("trips", pd.DataFrame(rows))
    (first,) = service.materialize("trips", progress=True, overlap_s=0)
    want = _latest_reference(rows)
    assert first.entities == first.written == len(want)
    assert _close(_online(service, sorted(want)), want)
    # nothing new: nothing considered
    (again,) = service.materialize("trips", overlap_s=0)
    assert (again.entities, again.written) == (0, 0)
    # a late row (older event) for d0 changes nothing; a newer one for d1 does
    now_us = time.time_ns() // 1000
    late = {
        "driver_id": "d0",
        "event_timestamp": now_us - 2 * DAY_S * 10**6 + 10**9,
        "fare": 1.0,
        "trips": 1,
    }
    newer = {"driver_id": "d1", "event_timestamp": now_us, "fare": 50.0, "trips": 5}
    service.ingest("trips", pd.DataFrame([late, newer]))
    (inc,) = service.materialize("trips", overlap_s=0)
    assert (inc.entities, inc.written) == (2, 1)
    want = _latest_reference([*rows, late, newer])
    assert _close(_online(service, sorted(want)), want)
    # a full re-run rewrites nothing: values are already the latest
    (full,) = service.materialize("trips", full=True)
    assert full.entities == len(want) and full.written == 0


def test_recent_rows_are_looked_at_again_and_not_rewritten(
    service: FeatureService, fc: Any
) -> None:
    service.apply(_defs(fc))
    rows = _source_rows(3, 50)
    service.ingest("trips", pd.DataFrame(rows))
    n = len(_latest_reference(rows))
    (first,) = service.materialize()
    (second,) = service.materialize()  # within the default 60 s overlap
    assert (first.entities, first.written) == (n, n)
    assert (second.entities, second.written) == (n, 0)


def test_rows_older_than_the_ttl_are_not_served(service: FeatureService, fc: Any) -> None:
    service.apply(_defs(fc))
    now_us = time.time_ns() // 1000
    service.ingest(
        "trips",
        pd.DataFrame(
            [
                {
                    "driver_id": "old",
                    "event_timestamp": now_us - 3 * DAY_S * 10**6,
                    "fare": 1.0,
                    "trips": 1,
                },
                {"driver_id": "new", "event_timestamp": now_us, "fare": 1.0, "trips": 1},
            ]
        ),
    )
    (r,) = service.materialize()
    assert (r.entities, r.written) == (2, 1)
    assert service.get_online("trips", ["old", "new"]).found.tolist() == [False, True]


@pytest.mark.parametrize("count", [1, 100])
def test_streaming_matches_batch(
    backend: Any, service: FeatureService, fc: Any, tmp_path: Any, count: int
) -> None:
    """Events through the log reach both stores with exactly the values batch produces."""
    service.apply(_defs(fc))
    rows = _source_rows(7, 400)
    keys = [(r["driver_id"], r["event_timestamp"]) for r in rows]
    assert len(set(keys)) < len(keys)  # the data hold event-time ties
    ids = service.publish("trips", rows[:250])
    service.publish("trips", rows[250:])
    assert len(ids) == 1  # 250 rows in one event (500 per event)
    consumer = service.stream_materializer(consumer_group="test-stream")
    total = consumer.run(stop_when_idle=True, count=count)
    assert (total.events, total.rows, total.offline_rows) == (2, 400, 400)
    assert total.skipped_events == 0

    # The batch path, on stores of its own.
    batch_backend = msgspec.structs.replace(
        backend,
        catalog_url=f"sqlite:///{tmp_path / 'batch.db'}",
        offline_path=str(tmp_path / "batch-offline"),
        namespace=f"{backend.namespace}-batch" if backend.namespace else "",
    )
    with fc.open_service(batch_backend) as batch:
        batch.apply(_defs(fc))
        batch.ingest("trips", pd.DataFrame(rows[:250]))
        batch.ingest("trips", pd.DataFrame(rows[250:]))
        batch.materialize()
        drivers = sorted({r["driver_id"] for r in rows})
        streamed = service.get_online("trips", drivers)
        batched = batch.get_online("trips", drivers)
        assert streamed.values.tobytes() == batched.values.tobytes()
        assert streamed.found.all() and batched.found.all()
        assert _close(_online(service, drivers), _latest_reference(rows))

        def offline(s: FeatureService) -> pd.DataFrame:
            t = s.offline.read(s.group("trips")).to_pandas().drop(columns=["created_timestamp"])
            return t.sort_values(list(t.columns)).reset_index(drop=True)

        pd.testing.assert_frame_equal(offline(service), offline(batch))
    # Everything was acked: nothing is redelivered after the visibility timeout.
    time.sleep(0.6)
    assert consumer.run_once().events == 0


def test_stream_sets_aside_events_it_can_never_write(service: FeatureService, fc: Any) -> None:
    service.apply(_defs(fc))
    log = service.event_log
    assert log is not None
    from carrara.feature_cache.streaming import publish_rows
    from carrara.types import Topic

    log.append("feature-updates", b"\xff not msgpack")
    publish_rows(log, "nope", [{"driver_id": "x"}])
    good = {"driver_id": "y", "event_timestamp": time.time_ns() // 1000, "fare": 2.0, "trips": 1}
    publish_rows(log, "trips", [good])
    publish_rows(log, "trips", [{**good, "event_timestamp": "yesterday"}])  # unusable
    publish_rows(log, "trips", [{"driver_id": "z", "event_timestamp": 1}])  # transform fails
    publish_rows(log, "trips", [good])
    r = service.stream_materializer().run(stop_when_idle=True)
    # bad events share a batch with good ones: only the bad ones are set aside
    assert (r.events, r.skipped_events, r.rows) == (6, 4, 2)
    dead = log.read(Topic.FEATURE_UPDATES_DEAD, "inspect", "me", count=10)
    assert len(dead) == 4 and dead[0].payload == b"\xff not msgpack"
    publish_rows(log, "trips", [good])
    r = service.stream_materializer().run(stop_when_idle=True, count=1)
    assert (r.events, r.skipped_events, r.rows, r.online_written) == (1, 0, 1, 1)
    with pytest.raises(Exception, match="unknown feature group 'nope'"):
        service.publish("nope", [])


def test_materialize_says_why_nothing_was_written(service: FeatureService, fc: Any) -> None:
    service.apply(_defs(fc))
    old_us = time.time_ns() // 1000 - 5 * DAY_S * 10**6
    service.ingest(
        "trips",
        pd.DataFrame(
            [
                {"driver_id": d, "event_timestamp": old_us - i, "fare": 1.0, "trips": 1}
                for i, d in enumerate(["a", "b", "c"])
            ]
        ),
    )
    (r,) = service.materialize(full=True)
    assert (r.entities, r.written, r.expired, r.ttl_days) == (3, 0, 3, 2.0)
    assert r.newest_event_us == old_us
    newest = pd.Timestamp(old_us, unit="us", tz="UTC").isoformat(timespec="seconds")
    assert r.summary() == (
        "trips v1: 3 entities, 0 written, 3 expired: every row is older than the group's TTL"
        f" of 2 days (newest event at {newest}); reads will find nothing. Ingest recent rows,"
        " or raise ttl_days (0: never expire)"
    )
    # a partly expired run only counts them
    service.ingest(
        "trips",
        pd.DataFrame(
            [
                {
                    "driver_id": "n",
                    "event_timestamp": old_us + 5 * DAY_S * 10**6,
                    "fare": 1.0,
                    "trips": 1,
                }
            ]
        ),
    )
    (r,) = service.materialize(full=True)
    assert r.summary() == "trips v1: 4 entities, 1 written, 3 expired"
