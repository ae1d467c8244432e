"""Fixtures for the feature platform: every store test runs against the embedded backends
(SQLite catalog, in-process online store, local event log) and the real servers
(PostgreSQL catalog, Redis online store, Redis Streams), the latter marked ``integration``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pandas as pd
import pytest

from carrara.feature_cache import (
    Definitions,
    Entity,
    Feature,
    FeatureGroup,
    FeatureService,
    OnlineStore,
    open_online_store,
)


class Backend(msgspec.Struct, frozen=True):
    name: str
    catalog_url: str
    online_url: str
    namespace: str
    event_log_url: str
    offline_path: str


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    offline = str(tmp_path / "offline")
    if request.param == "embedded":
        return Backend(
            "embedded",
            f"sqlite:///{tmp_path / 'catalog.db'}",
            "memory://",
            "",
            f"local:///{tmp_path / 'events.db'}?visibility_timeout_ms=500",
            offline,
        )
    pg = request.getfixturevalue("postgres_url")
    redis_url = request.getfixturevalue("redis_url")
    ns = request.getfixturevalue("redis_namespace")
    return Backend(
        "real",
        pg,
        redis_url,
        ns,
        f"{redis_url}?prefix={ns}:events&visibility_timeout_ms=500",
        offline,
    )


def open_service(b: Backend) -> FeatureService:
    return FeatureService.open(
        catalog_url=b.catalog_url,
        offline_path=b.offline_path,
        online_url=b.online_url,
        event_log_url=b.event_log_url,
        namespace=b.namespace,
    )


@pytest.fixture
def service(backend: Backend) -> Iterator[FeatureService]:
    svc = open_service(backend)
    yield svc
    svc.close()


DRIVER = Entity(name="driver", join_key="driver_id", description="a driver")
RIDER = Entity(name="rider", join_key="rider_id")


def trips_group(**changes: object) -> FeatureGroup:
    base = FeatureGroup(
        name="trips",
        entity="driver",
        features=(
            Feature(
                name="fare_mean", dtype="float64", description="mean fare", owner_team="pricing"
            ),
            Feature(name="fare_p50", dtype="float32"),
            Feature(name="trip_count", dtype="int64"),
        ),
        ttl_days=2.0,
        source="warehouse.trips",
        owner_team="pricing",
    )
    return msgspec.structs.replace(base, **changes)


def ratings_group() -> FeatureGroup:
    return FeatureGroup(
        name="ratings",
        entity="rider",
        features=(Feature(name="rating", dtype="float32"), Feature(name="vip", dtype="bool")),
        ttl_days=0.0,
    )


@pytest.fixture
def definitions() -> Definitions:
    return Definitions(entities=(DRIVER, RIDER), groups=(trips_group(), ratings_group()))


def ts(seconds: float) -> pd.Timestamp:
    return pd.Timestamp("2024-03-01", tz="UTC") + pd.Timedelta(seconds=seconds)


class Helpers:
    """Shared helpers, handed to tests as the ``fc`` fixture (test modules cannot import
    conftest under ``--import-mode=importlib``)."""

    DRIVER = DRIVER
    RIDER = RIDER
    open_service = staticmethod(open_service)
    trips_group = staticmethod(trips_group)
    ratings_group = staticmethod(ratings_group)
    ts = staticmethod(ts)


@pytest.fixture
def fc() -> type[Helpers]:
    return Helpers


@pytest.fixture(scope="session")
def spark_session() -> Iterator[object]:
    """One local[2] SparkSession for the whole test run (starting one takes seconds); stores
    opened meanwhile share it and never stop it. Skipped loudly without Java or pyspark,
    except under CI, which must run the Spark engine's tests."""
    import os
    import shutil

    problem = ""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        problem = "no Java runtime (install openjdk-17-jre-headless)"
    else:
        try:
            import pyspark  # noqa: F401
        except ImportError:
            problem = "pyspark is not installed (pip install 'carrara[spark]')"
    if problem:
        message = f"Spark engine tests need {problem}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from carrara.feature_cache.spark_store import hold_spark_session

    with hold_spark_session("local[2]") as session:
        yield session


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    """An online store: in process, and on the real Redis (a fresh namespace)."""
    if request.param == "embedded":
        s = open_online_store("memory://", namespace="ns")
    else:
        redis_url = request.getfixturevalue("redis_url")
        s = open_online_store(redis_url, namespace=request.getfixturevalue("redis_namespace"))
    yield s
    s.close()
