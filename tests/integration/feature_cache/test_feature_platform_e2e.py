"""The feature platform end to end on the real servers: PostgreSQL catalog, Redis online
store and Redis Streams event log, driven through the CLI and read through the HTTP API."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from carrara.cli import main
from carrara.config import load_settings
from carrara.feature_cache import FeatureService
from carrara.feature_cache.api import create_app

DEFS = """
from carrara.feature_cache import Entity, Feature, FeatureGroup

driver = Entity(name="driver", join_key="driver_id")
trips = FeatureGroup(
    name="trips",
    entity="driver",
    ttl_days=1,
    features=tuple(Feature(name=f"f{i}") for i in range(32)),
)
"""


@pytest.mark.integration
def test_cli_stream_and_http_on_real_servers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_url: str,
    redis_url: str,
    redis_namespace: str,
) -> None:
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path))
    monkeypatch.setenv("CARRARA_REGISTRY_URL", postgres_url)
    monkeypatch.setenv("CARRARA_ONLINE_STORE_URL", f"{redis_url}?namespace={redis_namespace}")
    monkeypatch.setenv("CARRARA_EVENT_LOG_URL", f"{redis_url}?prefix={redis_namespace}:ev")
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS)
    assert main(["apply", str(defs)]) == 0
    now_us = time.time_ns() // 1000
    rows = [
        {
            "driver_id": f"d{i}",
            "event_timestamp": now_us,
            **{f"f{j}": i + j / 100 for j in range(32)},
        }
        for i in range(50)
    ]
    with FeatureService.from_settings(load_settings()) as svc:
        svc.ingest("trips", pd.DataFrame(rows[:25]))
        svc.publish("trips", rows[25:])
    assert main(["materialize", "--quiet"]) == 0
    assert main(["materialize", "--stream", "--until-idle"]) == 0

    with FeatureService.from_settings(load_settings()) as svc:
        assert svc.offline.read(svc.group("trips")).num_rows == 50

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=create_app(svc))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post(
                    "/features/groups/trips/get-online",
                    json={"entity_ids": ["d0", "d49", "d50"], "features": ["f0", "f31"]},
                )

        body = asyncio.run(call()).json()
    assert [r["found"] for r in body["results"]] == [True, True, False]
    assert body["results"][1]["values"] == pytest.approx([49.0, 49.31])
