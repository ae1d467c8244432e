"""A throwaway Redis Cluster on free local ports: ``redis-server --cluster-enabled yes`` per node
and ``redis-cli --cluster create``; used by the cluster tests and ``bench.redis_cluster``.

``cluster-require-full-coverage no`` (what the online store docs recommend) keeps the other
masters serving while one is down, so reads degrade instead of failing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RedisCluster", "available", "redis_cluster", "redis_server"]


def available() -> bool:
    """Whether redis-server and redis-cli are installed."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _free_ports(n: int) -> list[int]:
    """``n`` free ports whose cluster bus ports (+10000) are free too; both below the
    ephemeral range when it leaves room (no outgoing connection takes them meanwhile)."""
    from carrara.ports import ephemeral_range, free_port

    low, _ = ephemeral_range()
    ports: list[int] = []
    tries = 0
    while len(ports) < n:
        tries += 1
        port = free_port("127.0.0.1")
        below = port + 10000 < low
        if port + 10000 > 65535 or port in ports or (not below and tries < 200):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisCluster:
    """Masters (and replicas) of one cluster; ``url`` names the first master."""

    def __init__(self, root: Path, masters: int, replicas: int, node_timeout_ms: int) -> None:
        self.root = root
        self.node_timeout_ms = node_timeout_ms
        self.ports = _free_ports(masters * (1 + replicas))
        self.replicas = replicas
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self.start(port)
        for port in self.ports:
            self._wait_ping(port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=1"

    def start(self, port: int) -> None:
        """Start (or restart, with its saved cluster config) the node on ``port``."""
        node_dir = self.root / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(node_dir),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-require-full-coverage",
                "no",
                "--cluster-allow-reads-when-down",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(node_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, port: int) -> None:
        """``kill -9`` the node on ``port``."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, timeout=10, check=False
        )
        return out.stdout.decode()

    def _wait_ping(self, port: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.cli(port, "PING").strip() != "PONG":
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {port} did not start")
            time.sleep(0.05)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and agrees on all 16384 slots."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [self.cli(p, "CLUSTER", "INFO") for p in self.procs]
            if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok: {infos}")
            time.sleep(0.1)

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots, per a live node's ``CLUSTER NODES``."""
        port = next(iter(self.procs))
        out = []
        for line in self.cli(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                out.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(out)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()


@contextlib.contextmanager
def redis_cluster(
    masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000
) -> Iterator[RedisCluster]:
    """A fresh cluster in a temp dir, torn down (processes killed, files removed) on exit."""
    with tempfile.TemporaryDirectory(prefix="carrara-redis-cluster-") as root:
        cluster = RedisCluster(Path(root), masters, replicas, node_timeout_ms)
        try:
            yield cluster
        finally:
            cluster.stop()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A standalone redis-server on a free port (same settings as the cluster nodes, cluster
    off); yields its URL."""
    with tempfile.TemporaryDirectory(prefix="carrara-redis-") as root:
        port = _free_ports(1)[0]
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                root,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                out = subprocess.run(
                    ["redis-cli", "-p", str(port), "PING"], capture_output=True, check=False
                )
                if out.stdout.strip() == b"PONG":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {port} did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait(10)
