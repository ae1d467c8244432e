"""Feature platform benchmarks: online reads (SDK vs a bare MGET) and point-in-time joins.

Run ``python -m bench.features [--json PATH] [--redis URL] [--full]``.

- online read of 1 / 100 / 1,000 entities x 32 features through ``FeatureService.get_online``
  (key building, one MGET, decode + layout in C++), on the in-process store and on Redis; on
  Redis a bare ``client.mget`` of the same prebuilt keys runs interleaved in the same loop, and
  the SDK/bare ratio of p99s is printed (the targets in BENCHMARKS.md: within 1.5x).
- ``POST /features/groups/{g}/get-online`` for 1 / 100 entities through uvicorn in its own
  process (Redis store), from a raw keep-alive socket client.
- point-in-time join of 100k label rows x 1 group (1M feature rows), wall time of
  ``get_training_set`` (includes hashing the inputs for the snapshot reference); ``--full``
  adds 1M labels x 10M feature rows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import numpy as np

from carrara.core import FeatureVector
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.feature_cache.catalog import Catalog
from carrara.feature_cache.offline_store import DuckDBOfflineStore
from carrara.feature_cache.online_store import open_online_store

N_FEATURES = 32
ENTITIES = 20_000
DAY_US = 86_400 * 1_000_000


class Result(msgspec.Struct):
    name: str
    median_ns: int
    p99_ns: int


def _defs(n_features: int = N_FEATURES, ttl_days: float = 0.0) -> Definitions:
    return Definitions(
        entities=(Entity(name="user", join_key="user_id"),),
        groups=(
            FeatureGroup(
                name="stats",
                entity="user",
                features=tuple(Feature(name=f"f{i}") for i in range(n_features)),
                ttl_days=ttl_days,
            ),
        ),
    )


@contextmanager
def online_service(redis_url: str | None) -> Iterator[FeatureService]:
    """A service with ENTITIES users x 32 features in the online store."""
    ns = f"carrara-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        svc = FeatureService(
            Catalog(f"sqlite:///{tmp}/catalog.db"),
            DuckDBOfflineStore(f"{tmp}/offline"),
            open_online_store(redis_url or "memory://", namespace=ns if redis_url else ""),
        )
        try:
            svc.apply(_defs())
            rng = np.random.default_rng(0)
            values = rng.normal(size=(ENTITIES, N_FEATURES)).astype(np.float32)
            now = time.time_ns() // 1000
            for start in range(0, ENTITIES, 5_000):
                svc.online.write_vectors(
                    [
                        FeatureVector(f"u{i}", "stats", 1, values[i], None, now, now)
                        for i in range(start, min(ENTITIES, start + 5_000))
                    ],
                    0,
                    only_newer=False,
                )
            yield svc
        finally:
            client = getattr(svc.online, "client", None)
            if client is not None:
                keys = list(client.scan_iter(match=f"{ns}:*", count=5_000))
                for i in range(0, len(keys), 5_000):
                    client.delete(*keys[i : i + 5_000])
            svc.close()


def _percentiles(samples: list[int]) -> tuple[int, int]:
    s = sorted(samples)
    return int(statistics.median(s)), s[min(len(s) - 1, int(len(s) * 0.99))]


def bench_online(redis_url: str | None, iterations: dict[int, int]) -> list[Result]:
    backend = "redis" if redis_url else "embedded"
    out: list[Result] = []
    with online_service(redis_url) as svc:
        client = getattr(svc.online, "client", None)
        rng = np.random.default_rng(1)
        for n, iters in iterations.items():
            batches = [[f"u{i}" for i in rng.integers(0, ENTITIES, size=n)] for _ in range(iters)]
            prefix = svc.online.key_prefix("stats", 1)
            key_batches = [[prefix + e for e in b] for b in batches]
            for b in batches[:20]:  # warm up (reader cache, connections)
                svc.get_online("stats", b)
            sdk: list[int] = []
            bare: list[int] = []
            clock = time.perf_counter_ns
            for ids, keys in zip(batches, key_batches, strict=True):
                t0 = clock()
                r = svc.get_online("stats", ids)
                t1 = clock()
                sdk.append(t1 - t0)
                if client is not None:
                    t0 = clock()
                    client.mget(keys)
                    bare.append(clock() - t0)
            assert bool(r.found.all())
            med, p99 = _percentiles(sdk)
            out.append(Result(f"online_read_{backend}_{n}x{N_FEATURES}", med, p99))
            if bare:
                bmed, bp99 = _percentiles(bare)
                out.append(Result(f"bare_mget_redis_{n}", bmed, bp99))
    return out


def http_app() -> Any:
    """``uvicorn --factory bench.features:http_app``: the feature API over the catalog and the
    Redis namespace named by ``CARRARA_BENCH_CATALOG`` / ``_REDIS`` / ``_NAMESPACE``."""
    import os

    from carrara.feature_cache.api import create_app

    svc = FeatureService(
        Catalog(os.environ["CARRARA_BENCH_CATALOG"], migrate=False),
        DuckDBOfflineStore(tempfile.mkdtemp()),
        open_online_store(
            os.environ["CARRARA_BENCH_REDIS"], namespace=os.environ["CARRARA_BENCH_NAMESPACE"]
        ),
    )
    return create_app(svc)


class _RawHttp:
    """A minimal keep-alive HTTP/1.1 client on a socket, so the figures are the server's
    (a full client library costs more per request than the server does)."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = port

    def post(self, path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        header, _, rest = data.partition(b"\r\n\r\n")
        status = header.split(b" ", 2)[1]
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += self.sock.recv(65536)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {rest[:200]!r}")
        return rest

    def close(self) -> None:
        self.sock.close()


def bench_http(redis_url: str, iterations: dict[int, int]) -> list[Result]:
    """``POST /features/groups/{g}/get-online`` through uvicorn (own process) on loopback."""
    import os
    import socket
    import subprocess
    import sys

    out: list[Result] = []
    with online_service(redis_url) as svc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ns = svc.online.namespace
        env = {
            **os.environ,
            "CARRARA_BENCH_CATALOG": svc.catalog.db.url,
            "CARRARA_BENCH_REDIS": redis_url,
            "CARRARA_BENCH_NAMESPACE": ns,
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "bench.features:http_app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                "--loop",
                "uvloop",
            ],
            env=env,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client = _RawHttp(port)
                    client.post("/features/groups/stats/get-online", b'{"entity_ids":["u1"]}')
                    break
                except (OSError, RuntimeError):
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.1)
            rng = np.random.default_rng(2)
            for n, iters in iterations.items():
                bodies = [
                    msgspec.json.encode(
                        {"entity_ids": [f"u{i}" for i in rng.integers(0, ENTITIES, size=n)]}
                    )
                    for _ in range(iters)
                ]
                for b in bodies[:20]:
                    client.post("/features/groups/stats/get-online", b)
                samples = []
                for b in bodies:
                    t0 = time.perf_counter_ns()
                    client.post("/features/groups/stats/get-online", b)
                    samples.append(time.perf_counter_ns() - t0)
                med, p99 = _percentiles(samples)
                out.append(Result(f"http_get_online_redis_{n}x{N_FEATURES}", med, p99))
            client.close()
        finally:
            server.terminate()
            server.wait(10)
    return out


def _feature_table(n_rows: int, n_entities: int, n_features: int, seed: int) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    start = 1_700_000_000 * 1_000_000
    ent = rng.integers(0, n_entities, size=n_rows)
    ets = start + rng.integers(0, 30 * DAY_US, size=n_rows)
    cts = ets + rng.integers(0, 3_600_000_000, size=n_rows)
    ts = pa.timestamp("us", tz="UTC")
    cols: dict[str, Any] = {
        "entity_id": pc.binary_join_element_wise("u", pa.array(ent).cast(pa.string()), ""),
        "event_timestamp": pa.array(ets).cast(ts),
        "created_timestamp": pa.array(cts).cast(ts),
    }
    values = rng.normal(size=(n_features, n_rows)).astype(np.float32)
    for i in range(n_features):
        cols[f"f{i}"] = pa.array(values[i])
    return pa.table(cols)


def _label_table(n_labels: int, n_entities: int, seed: int) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    start = 1_700_000_000 * 1_000_000
    return pa.table(
        {
            "user_id": pc.binary_join_element_wise(
                "u", pa.array(rng.integers(0, n_entities, size=n_labels)).cast(pa.string()), ""
            ),
            "event_timestamp": pa.array(start + rng.integers(0, 31 * DAY_US, size=n_labels)).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "label": pa.array(rng.random(n_labels)),
        }
    )


def bench_pit(
    n_labels: int,
    n_rows: int,
    *,
    n_features: int = 8,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> Result:
    """Wall time of a point-in-time join (median of ``repeats``)."""
    n_entities = max(1, n_rows // 10)
    with tempfile.TemporaryDirectory() as tmp:
        svc = FeatureService(
            Catalog(f"sqlite:///{tmp}/catalog.db"),
            DuckDBOfflineStore(f"{tmp}/offline"),
            open_online_store("memory://"),
        )
        try:
            svc.apply(_defs(n_features, ttl_days=7))
            t0 = time.perf_counter()
            svc.write_offline("stats", _feature_table(n_rows, n_entities, n_features, 2))
            labels = _label_table(n_labels, n_entities, 3)
            log(f"  (setup: {n_rows:,} feature rows written in {time.perf_counter() - t0:.1f}s)")
            times: list[int] = []
            for _ in range(repeats):
                t0 = time.perf_counter_ns()
                ts = svc.get_training_set(labels, ["stats:*"])
                times.append(time.perf_counter_ns() - t0)
                assert ts.table.num_rows == n_labels
        finally:
            svc.close()
    return Result(
        f"pit_join_{_short(n_labels)}_labels_x_{_short(n_rows)}_rows",
        int(statistics.median(times)),
        max(times),
    )


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1_000}k"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("--full", action="store_true", help="add the 1M x 10M join")
    parser.add_argument("--quick", action="store_true", help="few iterations, small joins")
    args = parser.parse_args(argv)

    iterations = {1: 200, 100: 50, 1000: 20} if args.quick else {1: 5000, 100: 2000, 1000: 500}
    results = bench_online(None, iterations)
    if args.redis:
        results += bench_online(args.redis, iterations)
        results += bench_http(args.redis, {n: i for n, i in iterations.items() if n <= 100})
    if args.quick:
        results.append(bench_pit(10_000, 100_000, repeats=1))
    else:
        results.append(bench_pit(100_000, 1_000_000))
        if args.full:
            results.append(bench_pit(1_000_000, 10_000_000, repeats=1))

    by_name = {r.name: r for r in results}
    print(f"{'case':44s} {'p50':>12s} {'p99':>12s}")
    for r in results:
        print(f"{r.name:44s} {r.median_ns / 1e3:10.1f}us {r.p99_ns / 1e3:10.1f}us")
    for n in iterations:
        sdk = by_name.get(f"online_read_redis_{n}x{N_FEATURES}")
        bare = by_name.get(f"bare_mget_redis_{n}")
        if sdk and bare:
            print(
                f"redis {n:>5} entities: SDK/bare MGET  p50 {sdk.median_ns / bare.median_ns:.2f}x"
                f"  p99 {sdk.p99_ns / bare.p99_ns:.2f}x"
            )
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(msgspec.json.encode(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
