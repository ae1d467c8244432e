"""Processes the chaos cases break: a private redis-server (killed, restarted on the same port,
hung with SIGSTOP) and the gateway as a real process (``carrara serve`` with a YAML config, or a
gateway script of the suite's own)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from tests.chaos.record import ROOT, rss_mb
from tests.servers import free_port

__all__ = ["GatewayProcess", "PrivateRedis", "grpc_healthy"]


class PrivateRedis:
    """A redis-server of this test alone, on a fixed port: it can be SIGKILLed and restarted
    on the same port (clients reconnect to the same address) or hung with SIGSTOP."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.dir = directory
        # persistent: an append-only file synced on every write, so a restart after SIGKILL
        # comes back with the data (a feature store's Redis is not re-seeded by the gateway).
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make test installs it)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited")
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: every connection breaks, nothing listens on the port until ``start``."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def hang(self) -> None:
        """SIGSTOP: connections stay open (the kernel accepts), nothing is ever answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.stopped:
                self.resume()
            self.kill()


def grpc_healthy(target: str, timeout_s: float = 5.0) -> bool:
    """grpc.health.v1 says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class GatewayProcess:
    """The gateway in a process of its own: ``carrara serve --config <yaml>`` (``config``
    given) or ``python <script> <args>``; ``start`` waits until gRPC health says SERVING."""

    def __init__(
        self,
        directory: Path,
        *,
        config: dict[str, Any] | None = None,
        script: Sequence[str] = (),
    ) -> None:
        self.dir = directory
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.log_path = directory / "gateway.log"
        if config is not None:
            path = directory / "gateway.yaml"
            path.write_text(yaml.safe_dump(config))
            self.argv = [sys.executable, "-m", "carrara", "serve", "--config", str(path)]
        else:
            self.argv = [sys.executable, *script]
        self.argv += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> GatewayProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with self.log_path.open("ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout_s
        while not grpc_healthy(self.target, timeout_s=1.0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not SERVING after {timeout_s} s: {self.log()}")
            time.sleep(0.1)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        """SIGTERM (then SIGKILL after 30 s) if still running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
