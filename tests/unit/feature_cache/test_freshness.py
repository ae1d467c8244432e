"""Online freshness per feature group: what the online store records on every write, what
``FeatureService.freshness`` / ``GET /features/freshness`` answer, and the catalog listing
``GET /features/groups`` (the console's Features page). On the in-process store and real
Redis (and the PostgreSQL catalog), like every feature store test."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from carrara.client import RemoteFeatures
from carrara.core import FeatureVector
from carrara.feature_cache import Definitions, FeatureService, OnlineStore, open_online_store
from carrara.feature_cache.api import create_app
from carrara.feature_cache.online_store import WriteRecord
from carrara.transport import Transport
from tests.servers import serve_app

HOUR_US = 3_600 * 1_000_000


def _vec(entity: str, event_us: int, version: int = 3) -> FeatureVector:
    return FeatureVector(entity, "trips", version, np.array([1.0], np.float32), None, event_us, 0)


def _now_us() -> int:
    return time.time_ns() // 1000


def test_every_write_records_time_newest_event_and_rows(store: OnlineStore) -> None:
    assert store.write_records() == {}
    now = _now_us()
    before_ms = store.now_ms()
    assert store.write_vectors([_vec("a", now - HOUR_US), _vec("b", now - 2 * HOUR_US)], 0) == 2
    rec = store.write_records()[("trips", 3)]
    assert rec.newest_event_us == now - HOUR_US and rec.rows_last_write == 2
    assert before_ms <= rec.last_write_ms <= store.now_ms()

    # An older event (a late one, a backfill) is counted but never moves the newest back.
    assert store.write_vectors([_vec("c", now - 5 * HOUR_US)], 0) == 1
    rec = store.write_records()[("trips", 3)]
    assert rec.newest_event_us == now - HOUR_US and rec.rows_last_write == 1
    # A write that stores nothing (a replay) is not a write.
    assert store.write_vectors([_vec("c", now - 5 * HOUR_US)], 0) == 0
    assert store.write_records()[("trips", 3)] == rec
    # Newer events move it forward; versions are separate records.
    store.write_vectors([_vec("a", now)], 0)
    store.write_vectors([_vec("a", now - 3 * HOUR_US, version=4)], 0)
    records = store.write_records()
    assert records[("trips", 3)].newest_event_us == now
    assert records[("trips", 4)] == WriteRecord(
        records[("trips", 4)].last_write_ms, now - 3 * HOUR_US, 1
    )
    # The records are not feature vectors: reads of the group do not see them.
    assert store.read("trips", 3, ["a", "b", "c"]).count(None) == 0


@pytest.mark.integration
def test_redis_keeps_the_records_in_two_keys_of_the_namespace(
    redis_url: str, redis_namespace: str
) -> None:
    import redis

    a = open_online_store(redis_url, namespace=redis_namespace)
    b = open_online_store(redis_url, namespace=f"{redis_namespace}-b")
    client = redis.Redis.from_url(redis_url)
    try:
        a.write_vectors([_vec("a", 1_780_000_000_000_000)], 0)
        assert set(a.write_records()) == {("trips", 3)} and b.write_records() == {}
        key = f"{redis_namespace}:carrara-freshness"
        assert client.type(key) == b"hash" and client.type(f"{key}-event") == b"zset"
        assert client.zscore(f"{key}-event", "trips:3") == 1_780_000_000_000_000
    finally:
        client.close()
        a.close()
        b.close()


def test_the_embedded_record_follows_the_store_clock() -> None:
    from carrara.feature_cache import EmbeddedOnlineStore

    now_ms = [1_780_000_000_000]
    store = EmbeddedOnlineStore(clock=lambda: now_ms[0])
    store.write_vectors([_vec("a", now_ms[0] * 1000 - HOUR_US)], 0)
    assert store.write_records() == {
        ("trips", 3): WriteRecord(1_780_000_000_000, now_ms[0] * 1000 - HOUR_US, 1)
    }


# -- the service and the API ------------------------------------------------------------------


@pytest.fixture
def written(service: FeatureService, definitions: Definitions) -> tuple[FeatureService, float]:
    """trips (TTL 2 days) materialized from events 3 h and 1 h old; ratings never written."""
    service.apply(definitions)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    service.write_offline(
        "trips",
        pd.DataFrame(
            {
                "entity_id": ["d1", "d2", "d1"],
                "event_timestamp": [
                    now - pd.Timedelta(hours=3),
                    now - pd.Timedelta(hours=1),
                    now - pd.Timedelta(hours=2),
                ],
                "fare_mean": [1.5, 2.5, 3.5],
                "fare_p50": [0.25, None, 0.75],
                "trip_count": [1, 2, 3],
            }
        ),
    )
    service.materialize()
    return service, (now - pd.Timedelta(hours=1)).timestamp()


def test_freshness_of_every_group(written: tuple[FeatureService, float]) -> None:
    service, newest = written
    before = time.time()
    by_name = {f.group: f for f in service.freshness()}
    assert sorted(by_name) == ["ratings", "trips"]
    trips = by_name["trips"]
    assert (trips.version, trips.online, trips.ttl_s) == (1, True, 2 * 86_400.0)
    assert trips.newest_event_ts == pytest.approx(newest)
    assert trips.age_s is not None and 3_600 <= trips.age_s < 3_600 + 60
    assert trips.last_write_at is not None and before - 60 < trips.last_write_at <= time.time()
    assert trips.rows_last_write == 2  # the latest row of d1 and of d2
    assert trips.stale is False

    ratings = by_name["ratings"]  # never written: nothing known, stale
    assert (ratings.version, ratings.ttl_s) == (1, None)
    assert ratings.last_write_at is ratings.newest_event_ts is ratings.age_s is None
    assert ratings.rows_last_write is None and ratings.stale is True


def test_a_group_goes_stale_once_its_newest_event_is_older_than_the_ttl(
    written: tuple[FeatureService, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, newest = written
    later_ms = int((newest + 2 * 86_400 + 10) * 1000)
    monkeypatch.setattr(service.online, "now_ms", lambda: later_ms)
    trips = {f.group: f for f in service.freshness()}["trips"]
    assert trips.age_s == pytest.approx(2 * 86_400 + 10)
    assert trips.stale is True


def test_freshness_over_http_and_the_remote_client(
    written: tuple[FeatureService, float],
) -> None:
    service, newest = written
    with (
        serve_app(create_app(service)) as base,
        Transport(base, service="feature API") as transport,
    ):
        raw = transport.http.get("/features/freshness")
        assert raw.status_code == 200
        body = {g["group"]: g for g in raw.json()}
        assert set(body["trips"]) == {
            "group",
            "version",
            "online",
            "ttl_s",
            "last_write_at",
            "newest_event_ts",
            "age_s",
            "rows_last_write",
            "stale",
        }
        assert body["trips"]["newest_event_ts"] == pytest.approx(newest)
        assert body["trips"]["rows_last_write"] == 2 and body["trips"]["stale"] is False
        assert body["ratings"]["last_write_at"] is None and body["ratings"]["stale"] is True
        remote = RemoteFeatures(transport).freshness()
        local = service.freshness()
        assert [(f.group, f.rows_last_write, f.stale) for f in remote] == [
            (f.group, f.rows_last_write, f.stale) for f in local
        ]
        assert remote[1].newest_event_ts == local[1].newest_event_ts

        spec = transport.http.get("/openapi.json").json()
        assert "/features/freshness" in spec["paths"]
        assert "GroupFreshness" in spec["components"]["schemas"]


def test_the_group_listing_has_what_a_catalog_page_shows(
    written: tuple[FeatureService, float],
) -> None:
    service, _ = written
    with (
        serve_app(create_app(service)) as base,
        Transport(base, service="feature API") as transport,
    ):
        groups = {g["name"]: g for g in transport.http.get("/features/groups").json()}
    trips = groups["trips"]
    assert trips["version"] == 1 and trips["entity"] == "driver"
    assert trips["entity_key"] == "driver_id"
    assert trips["features"] == ["fare_mean", "fare_p50", "trip_count"]
    assert trips["ttl_days"] == 2.0 and trips["online"] and trips["offline"]
    assert trips["owner_team"] == "pricing" and trips["source"] == "warehouse.trips"
    assert trips["description"] == "" and trips["aggregated"] is False
    assert trips["created_at_us"] > 0
    assert trips["feature_specs"] == [
        {
            "name": "fare_mean",
            "dtype": "float64",
            "description": "mean fare",
            "owner_team": "pricing",
        },
        {"name": "fare_p50", "dtype": "float32", "description": "", "owner_team": ""},
        {"name": "trip_count", "dtype": "int64", "description": "", "owner_team": ""},
    ]
    assert [f["dtype"] for f in groups["ratings"]["feature_specs"]] == ["float32", "bool"]
