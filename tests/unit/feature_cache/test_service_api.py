"""Online reads through the SDK (``FeatureService.get_online``) and the HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from carrara.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from carrara.feature_cache import Definitions, FeatureService
from carrara.feature_cache.api import create_app


@pytest.fixture
def loaded(service: FeatureService, definitions: Definitions) -> FeatureService:
    service.apply(definitions)
    now = pd.Timestamp.now(tz="UTC")
    service.write_offline(
        "trips",
        pd.DataFrame(
            {
                "entity_id": ["d1", "d2", "d1"],
                "event_timestamp": [now - pd.Timedelta(hours=2), now, now - pd.Timedelta(hours=1)],
                "fare_mean": [1.5, 2.5, 3.5],
                "fare_p50": [0.25, None, 0.75],
                "trip_count": [1, 2, 3],
            }
        ),
    )
    service.materialize()
    return service


def test_get_online_returns_values_missing_and_found(loaded: FeatureService) -> None:
    r = loaded.get_online("trips", ["d1", "zz", "d2"])
    assert (r.group, r.version, r.features) == ("trips", 1, ["fare_mean", "fare_p50", "trip_count"])
    assert r.found.tolist() == [True, False, True]
    assert r.values.dtype == np.float32 and r.values.shape == (3, 3)
    assert r.values[0].tolist() == [3.5, 0.75, 3.0]
    assert r.missing.tolist() == [[False] * 3, [True] * 3, [False, True, False]]
    assert r.to_dicts()[2] == {"fare_mean": 2.5, "fare_p50": None, "trip_count": 2.0}
    assert r.to_pandas()["entity_id"].tolist() == ["d1", "zz", "d2"]
    sub = loaded.get_online("trips", ["d2", "d1"], ["trip_count", "fare_mean"])
    assert sub.values.tolist() == [[2.0, 2.5], [3.0, 3.5]]
    assert loaded.get_online("trips", []).values.shape == (0, 3)


def test_get_online_errors_name_the_fix(loaded: FeatureService) -> None:
    with pytest.raises(NotFoundError, match="unknown feature group 'trip'; known: ratings, trips"):
        loaded.get_online("trip", ["d1"])
    with pytest.raises(NotFoundError, match="no feature 'fare_p95'; known: fare_mean, fare_p50"):
        loaded.get_online("trips", ["d1"], ["fare_p95"])
    with pytest.raises(ResourceExhaustedError, match="limit is 10000: split the batch"):
        loaded.get_online("trips", ["d"] * 10_001)
    with pytest.raises(InvalidArgumentError, match="not one string"):
        loaded.get_online("trips", "d1")
    with pytest.raises(NotFoundError, match="no version 4"):
        loaded.get_online("trips", ["d1"], version=4)


def test_online_reads_are_one_store_call(
    loaded: FeatureService, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = loaded.online.get_many

    def counting(keys: Any) -> Any:
        calls.append(len(keys))
        return original(keys)

    monkeypatch.setattr(loaded.online, "get_many", counting)
    loaded.get_online("trips", [f"d{i}" for i in range(1000)])
    assert calls == [1000]


class Client:
    """A synchronous client over the ASGI app (httpx's ASGI transport, no server)."""

    def __init__(self, app: Any) -> None:
        self._app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self._app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.request(method, path, **kwargs)

        return asyncio.run(go())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.fixture
def client(loaded: FeatureService) -> Iterator[Client]:
    yield Client(create_app(loaded))


def test_http_get_online(client: Client) -> None:
    r = client.post("/features/groups/trips/get-online", json={"entity_ids": ["d2", "nobody"]})
    assert r.status_code == 200
    assert r.json() == {
        "group": "trips",
        "version": 1,
        "features": ["fare_mean", "fare_p50", "trip_count"],
        "results": [
            {"entity_id": "d2", "found": True, "values": [2.5, None, 2.0], "missing": ["fare_p50"]},
            {"entity_id": "nobody", "found": False, "values": [None, None, None]},
        ],
    }
    r = client.post(
        "/features/groups/trips/get-online",
        json={"entity_ids": ["d1"], "features": ["trip_count"], "version": 1},
    )
    assert r.json()["results"] == [{"entity_id": "d1", "found": True, "values": [3.0]}]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "trip",
            {"entity_ids": ["d1"]},
            404,
            "unknown feature group 'trip'; known: ratings, trips",
        ),
        ("trips", {"entity_ids": ["d1"], "features": ["x"]}, 404, "has no feature 'x'; known"),
        ("trips", {"entity_ids": ["d"] * 10_001}, 413, "split the batch"),
        ("trips", {"entity_ids": [1]}, 400, "Expected `str`"),
        ("trips", {"ids": ["d1"]}, 400, "entity_ids"),
        ("trips", None, 400, "invalid request body"),
        (
            "trips",
            {"entity_ids": ["d1", "ghost"], "require_found": True},
            404,
            "no online values for entity id(s) 'ghost'",
        ),
    ],
)
def test_http_errors(client: Client, path: str, body: Any, status: int, message: str) -> None:
    if body is None:
        r = client.post(f"/features/groups/{path}/get-online", content=b"{not json")
    else:
        r = client.post(f"/features/groups/{path}/get-online", json=body)
    assert r.status_code == status
    assert message in r.json()["message"]


def test_http_refuses_huge_bodies(client: Client) -> None:
    r = client.post(
        "/features/groups/trips/get-online",
        content=b"x" * (5 << 20),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_http_listing_health_and_openapi(client: Client) -> None:
    groups = client.get("/features/groups").json()
    assert [g["name"] for g in groups] == ["ratings", "trips"]
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    post = spec["paths"]["/features/groups/{group}/get-online"]["post"]
    assert set(post["responses"]) >= {"200", "400", "404", "413"}
    assert "GetOnlineRequest" in spec["components"]["schemas"]


def test_group_definition_changes_reach_readers(
    loaded: FeatureService, definitions: Definitions, fc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carrara.feature_cache import Feature

    v2 = fc.trips_group(features=(*fc.trips_group().features, Feature(name="tip")))
    loaded.apply(Definitions(entities=definitions.entities, groups=(v2,)))
    r = loaded.get_online("trips", ["d1"])
    assert r.version == 2 and r.features[-1] == "tip" and not r.found[0]
    assert loaded.get_online("trips", ["d1"], version=1).found[0]


def test_online_values_are_the_shortest_float32_text(
    service: FeatureService, definitions: Definitions
) -> None:
    service.apply(definitions)
    now = pd.Timestamp.now(tz="UTC")
    service.ingest(
        "trips",
        pd.DataFrame(
            {
                "driver_id": ["d1"],
                "event_timestamp": [now],
                "fare_mean": [14.2],
                "fare_p50": [0.1],
                "trip_count": [7],
            }
        ),
    )
    service.materialize()
    r = service.get_online("trips", ["d1"])
    assert r.to_dicts() == [{"fare_mean": 14.2, "fare_p50": 0.1, "trip_count": 7.0}]
    assert repr(r.to_dicts()[0]["fare_mean"]) == "14.2"
    body = Client(create_app(service)).post(
        "/features/groups/trips/get-online", json={"entity_ids": ["d1"]}
    )
    assert b"[14.2,0.1,7.0]" in body.content
    assert body.json()["results"][0]["values"] == [14.2, 0.1, 7.0]


def test_float32_rows_round_trips_every_value() -> None:
    from carrara.feature_cache.service import float32_rows

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((200, 5)) * 10.0 ** rng.integers(-40, 38, (200, 5))).astype(
        np.float32
    )
    values[0] = [14.2, 0.0, np.inf, 1e-45, np.nan]
    missing = np.zeros(values.shape, dtype=np.bool_)
    missing[1, 1] = True
    rows = float32_rows(values, missing)
    assert rows[0][:2] == [14.2, 0.0] and rows[0][4] is None and rows[1][1] is None
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is None or (i, j) == (0, 2):
                continue
            assert np.float32(v) == values[i, j]
            assert repr(v) == repr(float(str(values[i, j])))  # numpy's shortest form


def test_get_online_accepts_integer_ids(loaded: FeatureService) -> None:
    loaded.write_offline(
        "trips",
        pd.DataFrame(
            {
                "driver_id": [1, 2],
                "event_timestamp": [pd.Timestamp.now(tz="UTC")] * 2,
                "fare_mean": [1.0, 2.0],
                "fare_p50": [0.5, 0.5],
                "trip_count": [1, 2],
            }
        ),
    )
    loaded.materialize()
    r = loaded.get_online("trips", [1, np.int64(2), "d1"])
    assert r.entity_ids == ["1", "2", "d1"]
    assert r.found.tolist() == [True, True, True]
    assert r.values[:, 0].tolist() == [1.0, 2.0, 3.5]
    with pytest.raises(InvalidArgumentError, match=r"strings \(or integers\); got float 1\.5"):
        loaded.get_online("trips", [1.5])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="got NoneType"):
        loaded.get_online("trips", [None])  # type: ignore[list-item]


def test_write_offline_takes_the_same_frame_as_ingest(
    service: FeatureService, definitions: Definitions
) -> None:
    service.apply(definitions)
    frame = pd.DataFrame(
        {
            "driver_id": ["d1"],
            "event_timestamp": [pd.Timestamp.now(tz="UTC")],
            "fare_mean": [1.0],
            "fare_p50": [0.5],
            "trip_count": [1],
        }
    )
    assert service.ingest("trips", frame) == 1
    assert service.write_offline("trips", frame) == 1
    assert service.write_offline("trips", frame.rename(columns={"driver_id": "entity_id"})) == 1
    with pytest.raises(InvalidArgumentError, match=r"no 'driver_id' \(join key\) or 'entity_id'"):
        service.write_offline("trips", frame.drop(columns=["driver_id"]))
