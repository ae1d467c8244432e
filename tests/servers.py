"""Servers for tests that need real sockets: a Starlette/ASGI app on uvicorn (``serve_app``),
the gateway's fronts on a ServerThread (``running_gateway``) over a one-model engine
(``scorer_engine``) and an in-memory online store (``DictStore``), ``carrara serve`` as a
child process (``serve_process``, ``wait_ready``), and ``free_port``."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from numpy.typing import ArrayLike

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)
from carrara.gateway.auth import FrontAuth
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.engine import ModelDeployment, OnlineReader, ServingEngine, VariantSpec
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.server import GatewayServer, ServerThread
from carrara.gateway.service import Gateway
from carrara.ports import free_port as free_port  # re-exported: tests pick ports here


@contextmanager
def serve_app(app: Any, *, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` until the block ends; yields its base URL ``http://127.0.0.1:PORT``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class DictStore:
    """The online store in a dict: ``rows`` (entity -> values) of one feature group version,
    encoded once; ``mget`` answers None for a key it does not hold."""

    def __init__(self, group: str, version: int, rows: Mapping[str, Sequence[float]]) -> None:
        self.data = {
            f"{group}:{version}:{entity}": encode_feature_vector(entity, group, version, list(v))
            for entity, v in rows.items()
        }

    @classmethod
    def users(cls, n: int) -> DictStore:
        """Entities ``u0`` … ``u{n-1}`` of group ``user`` v1, features (a, b) = (i, -i)."""
        return cls("user", 1, {f"u{i}": (float(i), float(-i)) for i in range(n)})

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.data.get(k) for k in keys]


def scorer_engine(
    tmp_dir: Path,
    spec: AssemblerSpec,
    weights: ArrayLike,
    bias: ArrayLike,
    *,
    store: OnlineReader | None = None,
    model: str = "scorer",
    version: int = 3,
    variant: str = "v3",
    cache_capacity: int = 1_000,
) -> ServingEngine:
    """An engine serving ``model`` with one variant (all the traffic): the linear ONNX model
    ``x @ weights + bias`` written to ``tmp_dir/m.onnx``, over ``store`` (by default
    ``DictStore.users(100)``) and a feature cache of ``cache_capacity``."""
    path = write_linear_model(tmp_dir / "m.onnx", weights, bias)
    engine = ServingEngine(
        DictStore.users(100) if store is None else store,
        cache=FeatureCache(capacity=cache_capacity),
    )
    engine.deploy(
        ModelDeployment(
            model=model,
            policy=RoutingPolicy(variants=(Variant(variant, 10_000),)),
            variants=(VariantSpec(name=variant, version=version, features=spec),),
        ),
        {variant: OnnxBackend(path)},
    )
    return engine


@contextmanager
def running_gateway(
    target: Gateway | ServingEngine, *, auth: FrontAuth | None = None
) -> Iterator[GatewayServer]:
    """Both fronts of ``target`` (an engine is wrapped in a ``Gateway``) on free loopback
    ports until the block ends, then a graceful stop; the gateway is closed afterwards, also
    when the servers did not start."""
    gateway = target if isinstance(target, Gateway) else Gateway(target)
    try:
        thread = ServerThread(lambda: GatewayServer(gateway, auth=auth))
        server = thread.start()
        try:
            yield server
        finally:
            thread.stop()
    finally:
        gateway.close()


def wait_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    *,
    log: Path,
    verify: ssl.SSLContext | bool = True,
    timeout_s: float = 30.0,
) -> httpx.Response:
    """Poll ``url`` until it answers 200 and return that response; fails with the child's
    ``log`` when ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            r = httpx.get(url, verify=verify, timeout=1)
            if r.status_code == 200:
                return r
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready: {log.read_text()}"
        time.sleep(0.2)


@contextmanager
def serve_process(
    argv: Sequence[str],
    http_port: int,
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    python_args: Sequence[str] = ("-m", "carrara"),
    ready_path: str = "/readyz",
    verify: ssl.SSLContext | None = None,
    timeout_s: float = 30.0,
    check_exit: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python *python_args *argv`` (by default ``carrara``) with its output appended to
    ``log``, yielded once ``ready_path`` on ``http_port`` answers 200 (over TLS to
    ``localhost`` when ``verify`` is given); SIGTERM when the block ends, and unless
    ``check_exit`` is off, the block's success also asserts a clean exit (code 0).
    ``env`` (default: this process's) gets ``PYTHONUNBUFFERED=1``."""
    with log.open("ab") as out:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, *python_args, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        )
    base = f"https://localhost:{http_port}" if verify else f"http://127.0.0.1:{http_port}"
    try:
        ready_verify: ssl.SSLContext | bool = True if verify is None else verify
        wait_ready(proc, base + ready_path, log=log, verify=ready_verify, timeout_s=timeout_s)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if check_exit:
        assert rc == 0, log.read_text()


def up_config_on_real_stores(
    tmp_path: Path,
    postgres_url: str,
    redis_url: str,
    namespace: str,
    token: str,
    *,
    settings: Mapping[str, Any] | None = None,
    **up: Any,
) -> tuple[Any, Any]:
    """``Settings`` and ``UpConfig`` for ``carrara up`` on the real PostgreSQL and Redis: files
    under ``tmp_path``, Redis keys under ``namespace``, ``token`` as the bootstrap token,
    ports picked by the OS and one worker; ``settings`` / ``up`` override fields."""
    from carrara.config import Settings
    from carrara.up import UpConfig

    values: dict[str, Any] = {
        "home": str(tmp_path / "home"),
        "registry_url": postgres_url,
        "online_store_url": f"{redis_url}?namespace={namespace}",
        "event_log_url": f"{redis_url}?prefix={namespace}",
        "offline_store_path": str(tmp_path / "offline"),
        "artifact_path": str(tmp_path / "artifacts"),
        "api_token": token,
        **(settings or {}),
    }
    config: dict[str, Any] = {
        "api_port": 0,
        "gateway_http_port": 0,
        "gateway_grpc_port": 0,
        "workers": 1,
        "run_dir": str(tmp_path / "run"),
        **up,
    }
    return Settings(**values), UpConfig(**config)
