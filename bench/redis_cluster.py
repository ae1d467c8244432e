"""The online store on Redis Cluster beside single-node Redis, read through the SDK.

Run ``python -m bench.redis_cluster [--entities N] [--seconds S] [--processes 1,2] [--quick]
[--json PATH]`` from the repository root (it starts its own servers: a 3-master cluster and
one standalone ``redis-server`` on free ports, with ``redis-server`` / ``redis-cli`` on PATH).

- ``sdk_{standalone,cluster}_{100,1000}``: ``FeatureService.get_online`` of random batches of
  N entities x 32 float32 features in a closed loop for S seconds (one client process):
  batch latency p50 / p99, sustained lookups/s and feature values/s.
- ``sdk_{standalone,cluster}_1000_x{P}``: the same with P client processes at once
  (aggregate lookups/s; what more clients buy on this box).
- ``layout_*_{100,1000}``: the raw batch read of 100 / 1,000 keys per key layout on the same
  cluster (the hash-tag choice): untagged keys through redis-py's ``mget_nonatomic`` (one MGET
  per slot: what the store did before) and 16 / 32 / 64 / 256 hash-tag shards.

Both backends run one after the other in one process, so their ratio is what to read on a
shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np

from carrara.core import FeatureVector
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.feature_cache.online_store import RedisClusterOnlineStore
from carrara.feature_cache.redis_cluster import RedisClusterIO

N_FEATURES = 32


class Result(msgspec.Struct):
    name: str
    median_ns: int
    p99_ns: int
    extra: dict[str, float] = {}


DEFS = Definitions(
    entities=(Entity(name="user", join_key="user_id"),),
    groups=(
        FeatureGroup(
            name="stats",
            entity="user",
            features=tuple(Feature(name=f"f{i}") for i in range(N_FEATURES)),
            ttl_days=0.0,
        ),
    ),
)


def _open(root: str, url: str) -> FeatureService:
    return FeatureService.open(
        catalog_url=f"sqlite:///{root}/catalog.db",
        offline_path=f"{root}/offline",
        online_url=url,
        namespace="bench",
    )


def _vectors(start: int, stop: int, values: Any, now: int) -> list[FeatureVector]:
    return [
        FeatureVector(f"u{i}", "stats", 1, values[i], None, now, now) for i in range(start, stop)
    ]


def fill(svc: FeatureService, entities: int) -> None:
    """``entities`` users x 32 features written through the store (as materialization does)."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(entities, N_FEATURES)).astype(np.float32)
    now = time.time_ns() // 1000
    for start in range(0, entities, 5_000):
        vectors = _vectors(start, min(entities, start + 5_000), values, now)
        svc.online.write_vectors(vectors, 0, only_newer=False)


def _percentiles(samples: list[int]) -> tuple[int, int]:
    s = sorted(samples)
    return int(statistics.median(s)), s[min(len(s) - 1, int(len(s) * 0.99))]


def _loop(
    read: Callable[[list[str]], Any], entities: int, batch: int, seconds: float, seed: int
) -> tuple[list[int], int, float]:
    """Closed loop of ``read`` on random batches: (latencies ns, lookups, wall seconds)."""
    rng = np.random.default_rng(seed)
    pool = [[f"u{i}" for i in rng.integers(0, entities, size=batch)] for _ in range(64)]
    for ids in pool[:10]:  # warm up: reader cache, connections
        read(ids)
    clock = time.perf_counter_ns
    lat: list[int] = []
    start = clock()
    end = start + int(seconds * 1e9)
    k = 0
    while True:
        t0 = clock()
        read(pool[k % len(pool)])
        t1 = clock()
        lat.append(t1 - t0)
        k += 1
        if t1 >= end:
            break
    return lat, k * batch, (clock() - start) / 1e9


def _worker(args: tuple[str, str, int, int, float, int]) -> tuple[list[int], int, float]:
    root, url, entities, batch, seconds, seed = args
    svc = _open(root, url)
    try:
        return _loop(lambda ids: svc.get_online("stats", ids), entities, batch, seconds, seed)
    finally:
        svc.close()


def bench_sdk(
    backend: str, root: str, url: str, entities: int, seconds: float, processes: list[int]
) -> list[Result]:
    out: list[Result] = []
    svc = _open(root, url)
    try:
        svc.apply(DEFS)
        fill(svc, entities)
        for batch in (100, 1000):
            lat, lookups, wall = _loop(
                lambda ids: svc.get_online("stats", ids), entities, batch, seconds, batch
            )
            med, p99 = _percentiles(lat)
            out.append(
                Result(
                    f"sdk_{backend}_{batch}",
                    med,
                    p99,
                    {"lookups_per_s": lookups / wall, "values_per_s": lookups * N_FEATURES / wall},
                )
            )
            if isinstance(svc.online, RedisClusterOnlineStore):
                assert svc.online.stats.degraded_keys == 0
    finally:
        svc.close()
    ctx = multiprocessing.get_context("spawn")
    for p in processes:
        if p < 2:
            continue
        with ctx.Pool(p) as workers:
            parts = workers.map(
                _worker, [(root, url, entities, 1000, seconds, 100 + i) for i in range(p)]
            )
        lat = [x for part in parts for x in part[0]]
        lookups = sum(part[1] for part in parts)
        wall = max(part[2] for part in parts)
        med, p99 = _percentiles(lat)
        out.append(
            Result(
                f"sdk_{backend}_1000_x{p}",
                med,
                p99,
                {"lookups_per_s": lookups / wall, "values_per_s": lookups * N_FEATURES / wall},
            )
        )
    return out


def bench_layouts(seed_url: str, entities: int, seconds: float) -> list[Result]:
    """Raw 1,000-key batch reads per key layout on one cluster."""
    import redis.cluster

    rng = np.random.default_rng(3)
    payload = rng.bytes(150)  # about a 32-float vector
    out: list[Result] = []
    plain = seed_url.split("?")[0]

    def run(name: str, read: Callable[[list[str]], Any], prefix: str) -> None:
        for batch in (100, 1000):
            lat, lookups, wall = _loop(
                lambda ids: read([prefix + e for e in ids]), entities, batch, seconds / 2, 9
            )
            med, p99 = _percentiles(lat)
            out.append(
                Result(f"layout_{name}_{batch}", med, p99, {"lookups_per_s": lookups / wall})
            )

    client = redis.cluster.RedisCluster.from_url(plain)
    try:
        for start in range(0, entities, 5_000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(entities, start + 5_000)):
                pipe.set(f"untagged:stats:1:u{i}", payload)
            pipe.execute()
        run("untagged_mget_nonatomic", client.mget_nonatomic, "untagged:stats:1:")
    finally:
        client.close()
    for shards in (16, 32, 64, 256):
        io = RedisClusterIO(plain, shards=shards)
        try:
            prefix = f"tags{shards}:stats:1:"
            for start in range(0, entities, 5_000):
                io.set_many(
                    [
                        (f"{prefix}u{i}", payload, None)
                        for i in range(start, min(entities, start + 5_000))
                    ]
                )
            run(f"tags{shards}", io.get_many, prefix)
        finally:
            io.close()
    return out


@contextlib.contextmanager
def _servers() -> Iterator[tuple[str, str]]:
    from tests.redis_cluster import redis_cluster, redis_server

    with redis_cluster(masters=3) as cluster, redis_server() as single:
        yield cluster.url, single


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per case")
    parser.add_argument("--processes", default="1,2", help="client process counts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)
    entities, seconds = (2_000, 0.2) if args.quick else (args.entities, args.seconds)
    processes = [int(p) for p in args.processes.split(",") if p]
    results: list[Result] = []
    with _servers() as (cluster_url, single_url):
        for backend, url in (("standalone", single_url), ("cluster", cluster_url)):
            with tempfile.TemporaryDirectory() as root:
                results += bench_sdk(backend, root, url, entities, seconds, processes)
        results += bench_layouts(cluster_url, min(entities, 20_000), seconds)
    by_name = {r.name: r for r in results}
    for r in results:
        rate = r.extra.get("lookups_per_s")
        values = r.extra.get("values_per_s")
        line = f"{r.name:<36} p50 {r.median_ns / 1e3:9.1f} us  p99 {r.p99_ns / 1e3:9.1f} us"
        if rate is not None:
            line += f"  {rate:>11,.0f} lookups/s"
        if values is not None:
            line += f"  {values:>13,.0f} values/s"
        print(line)
    for name in ("100", "1000", *(f"1000_x{p}" for p in processes if p > 1)):
        c, s = by_name.get(f"sdk_cluster_{name}"), by_name.get(f"sdk_standalone_{name}")
        if c and s:
            ratio = c.extra["lookups_per_s"] / s.extra["lookups_per_s"]
            print(f"cluster / standalone lookups/s, batch {name}: {ratio:.2f}")
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(msgspec.json.encode(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
