"""Shared fixtures: real PostgreSQL and Redis servers, each test isolated from the others.

Integration tests use the servers on 127.0.0.1 (scripts/start-services.sh starts them). When a
server is absent they are skipped with a loud reason, except under CI (``CI`` set), where an
absent server is a failure: CI must exercise the real backends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "CARRARA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CARRARA_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc}); start it with scripts/start-services.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    import psycopg

    name = f"carrara_t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis server (check it answers)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        _unavailable("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A unique key prefix on the real Redis; every key under it is deleted afterwards."""
    import redis

    prefix = f"carrara-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        # Keys may also embed the prefix after a hash tag or group name.
        keys += list(client.scan_iter(match=f"*{{{prefix}}}*", count=1000))
        if keys:
            client.delete(*set(keys))
    finally:
        client.close()
