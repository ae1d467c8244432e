"""Registry fixtures: every test here runs once on SQLite and once on the real PostgreSQL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from carrara.registry import ModelRegistry, Principal
from carrara.registry.migrations import TABLES

ADMIN = Principal("alice", frozenset({"admin"}))
PUBLISHER = Principal("trainer", frozenset({"publisher"}))
DEPLOYER = Principal("ops", frozenset({"deployer"}))
APPROVER = Principal("bob", frozenset({"approver"}))
READER = Principal("viewer", frozenset({"reader"}))

ONNX_BYTES = b"\x08\x07fake-onnx-model"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def registry(db_url: str, tmp_path: Path) -> Iterator[ModelRegistry]:
    reg = ModelRegistry.open(db_url, tmp_path / "artifacts")
    try:
        yield reg
    finally:
        reg.close()


def snapshot(reg: ModelRegistry) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every registry table, to prove a refused call changed nothing."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with reg.db.transaction() as tx:
        for table in TABLES:
            out[table] = sorted(tuple(r) for r in tx.fetchall(f"SELECT * FROM {table}"))
    return out


def register(reg: ModelRegistry, name: str = "fraud", **kw: Any) -> Any:
    """Register a version with sensible defaults (tests override what they check)."""
    args: dict[str, Any] = {
        "actor": PUBLISHER,
        "serving_artifact": ONNX_BYTES,
        "framework": "sklearn",
        "framework_version": "1.5.0",
    }
    args.update(kw)
    return reg.register(name, **args)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("registry API server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
