"""The feature platform at scale: DuckDB and Spark side by side, windowed aggregations, and the
streaming path.

Run ``python -m bench.features_scale [--engines duckdb,spark] [--full] [--json PATH]``.

- ``pit``: ``get_training_set`` of 100k labels x 1M feature rows (one group, 8 features, TTL
  7 days; ``--full`` runs 1M x 10M instead, once), per engine, wall time (median of 3).
- ``agg_backfill``: a training set of 100k labels over an aggregated group's events (count,
  sum, mean, max over 1h / 1d / 7d, 1-hour tiles; 1M events, ``--full`` 10M), per engine:
  the historical backfill of windowed features.
- ``agg_now``: every entity's windowed values at one time (what batch materialization
  computes), per engine.
- ``stream``: the streaming materializer on a windowed group (local event log, in-process
  online store): sustained events/s (publish -> tiles -> offline append -> online write),
  and freshness, publish -> online write, p50 / p99 at a fixed publish rate.

Engines run one after the other on the same data in one process, so their ratio is what to
read on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
import numpy as np

from bench.features import _feature_table, _label_table, _short
from carrara.eventlog import open_event_log
from carrara.feature_cache import (
    Aggregation,
    Definitions,
    Entity,
    Feature,
    FeatureGroup,
    FeatureService,
)
from carrara.feature_cache.catalog import Catalog
from carrara.feature_cache.offline_store import open_offline_store
from carrara.feature_cache.online_store import open_online_store

DAY_US = 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
START_US = 1_700_000_000 * 1_000_000


class Result(msgspec.Struct):
    name: str
    median_ns: int
    p99_ns: int
    extra: dict[str, float] = {}


def _service(root: str, engine: str, event_log: Any = None) -> FeatureService:
    return FeatureService(
        Catalog(f"sqlite:///{root}/catalog.db"),
        open_offline_store(f"{root}/offline", engine),
        open_online_store("memory://"),
        event_log=event_log,
    )


WINDOWED = FeatureGroup(
    name="rides",
    entity="user",
    tile="1h",
    aggregations=(
        Aggregation(function="count", windows=("1h", "1d", "7d")),
        Aggregation(function="sum", column="fare", windows=("1h", "1d", "7d")),
        Aggregation(function="mean", column="fare", windows=("1d", "7d")),
        Aggregation(function="max", column="fare", windows=("7d",)),
    ),
)


def _defs(n_features: int = 8) -> Definitions:
    return Definitions(
        entities=(Entity(name="user", join_key="user_id"),),
        groups=(
            FeatureGroup(
                name="stats",
                entity="user",
                features=tuple(Feature(name=f"f{i}") for i in range(n_features)),
                ttl_days=7,
            ),
            WINDOWED,
        ),
    )


def _events(n_events: int, n_entities: int, seed: int) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    ts = pa.timestamp("us", tz="UTC")
    return pa.table(
        {
            "user_id": pc.binary_join_element_wise(
                "u", pa.array(rng.integers(0, n_entities, size=n_events)).cast(pa.string()), ""
            ),
            "event_timestamp": pa.array(START_US + rng.integers(0, 30 * DAY_US, n_events)).cast(ts),
            "fare": pa.array(rng.integers(1, 100, n_events).astype(np.float64)),
        }
    )


def _timed(fn: Callable[[], Any], repeats: int) -> list[int]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return times


def bench_engines(
    engines: list[str], n_labels: int, n_rows: int, n_events: int, repeats: int
) -> list[Result]:
    out: list[Result] = []
    n_entities = max(1, n_rows // 10)
    with tempfile.TemporaryDirectory() as tmp:
        setup = _service(tmp, "duckdb")
        setup.apply(_defs())
        setup.write_offline("stats", _feature_table(n_rows, n_entities, 8, 2))
        setup.write_offline("rides", _events(n_events, n_entities, 4))
        setup.close()
        labels = _label_table(n_labels, n_entities, 3)
        ids = [f"u{i}" for i in range(n_entities)]
        import pyarrow as pa

        now = pa.table(
            {
                "user_id": ids,
                "event_timestamp": pa.array([START_US + 30 * DAY_US] * len(ids)).cast(
                    pa.timestamp("us", tz="UTC")
                ),
            }
        )
        for engine in engines:
            svc = _service(tmp, engine)
            try:
                svc.get_training_set(labels.slice(0, 1000), ["stats:*"])  # warm the engine
                pit = _timed(partial(svc.get_training_set, labels, ["stats:*"]), repeats)
                name = f"pit_{engine}_{_short(n_labels)}_labels_x_{_short(n_rows)}_rows"
                out.append(Result(name, int(statistics.median(pit)), max(pit)))
                print(f"  {name}: {statistics.median(pit) / 1e9:.2f} s", flush=True)
                agg = _timed(partial(svc.get_training_set, labels, ["rides:*"]), repeats)
                name = (
                    f"agg_backfill_{engine}_{_short(n_labels)}_labels_x_{_short(n_events)}_events"
                )
                out.append(Result(name, int(statistics.median(agg)), max(agg)))
                print(f"  {name}: {statistics.median(agg) / 1e9:.2f} s", flush=True)
                at_now = _timed(partial(svc.get_training_set, now, ["rides:*"]), repeats)
                name = f"agg_now_{engine}_{_short(n_entities)}_entities_x_{_short(n_events)}_events"
                out.append(Result(name, int(statistics.median(at_now)), max(at_now)))
                print(f"  {name}: {statistics.median(at_now) / 1e9:.2f} s", flush=True)
            finally:
                svc.close()
    return out


def bench_stream(n_events: int, rate: float, n_entities: int = 10_000) -> list[Result]:
    """Throughput: ``n_events`` published up front, drained by one materializer. Freshness:
    events published at ``rate``/s while the materializer runs, publish -> online write."""
    out: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        log = open_event_log(f"local:///{tmp}/events.db")
        svc = _service(tmp, "duckdb", log)
        svc.apply(
            Definitions(entities=(Entity(name="user", join_key="user_id"),), groups=(WINDOWED,))
        )
        rng = np.random.default_rng(5)
        now_us = time.time_ns() // 1000
        rows = [
            {
                "user_id": f"u{int(e)}",
                "event_timestamp": int(now_us - int(d)),
                "fare": float(f),
            }
            for e, d, f in zip(
                rng.integers(0, n_entities, n_events),
                rng.integers(0, 60_000_000, n_events),
                rng.integers(1, 100, n_events),
                strict=True,
            )
        ]
        for i in range(0, len(rows), 5_000):
            svc.publish("rides", rows[i : i + 5_000])
        mat = svc.stream_materializer(consumer="bench")
        t0 = time.perf_counter_ns()
        mat.run(stop_when_idle=True, count=1_000, block_ms=0)
        elapsed = time.perf_counter_ns() - t0
        per_s = n_events / (elapsed / 1e9)
        out.append(
            Result(
                f"stream_throughput_{_short(n_events)}_events",
                elapsed,
                elapsed,
                {"events_per_s": per_s},
            )
        )
        print(f"  stream throughput: {per_s:,.0f} events/s", flush=True)

        # Freshness: each published event names a fresh entity; the online store's writes
        # are timed against the publish time of that entity.
        published: dict[str, int] = {}
        lags: list[int] = []
        online = svc.online
        original = online.write_vectors

        def timed_write(vectors: Any, *args: Any, **kwargs: Any) -> Any:
            written = original(vectors, *args, **kwargs)
            t = time.perf_counter_ns()
            for v in vectors:
                sent = published.pop(v.entity_id, None)
                if sent is not None:
                    lags.append(t - sent)
            return written

        online.write_vectors = timed_write  # type: ignore[method-assign]
        runner = threading.Thread(
            target=lambda: mat.run(max_seconds=6.5, block_ms=5, count=1_000), daemon=True
        )
        runner.start()
        period = 1.0 / rate
        deadline = time.perf_counter() + 5.0
        i = 0
        next_at = time.perf_counter()
        while time.perf_counter() < deadline:
            entity = f"fresh{i}"
            published[entity] = time.perf_counter_ns()
            svc.publish(
                "rides",
                [{"user_id": entity, "event_timestamp": time.time_ns() // 1000, "fare": 1.0}],
            )
            i += 1
            next_at += period
            time.sleep(max(0.0, next_at - time.perf_counter()))
        runner.join(30)
        online.write_vectors = original  # type: ignore[method-assign]
        svc.close()
        log.close()
        lags.sort()
        p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99)]
        out.append(
            Result(f"stream_freshness_{rate:.0f}_per_s", p50, p99, {"events": float(len(lags))})
        )
        print(
            f"  stream freshness at {rate:.0f}/s: p50 {p50 / 1e6:.1f} ms, p99 {p99 / 1e6:.1f} ms",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engines", default="duckdb,spark")
    parser.add_argument(
        "--full", action="store_true", help="only the large sizes: 1M labels x 10M rows, 10M events"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    results: list[Result] = []
    if args.quick:
        results += bench_engines(engines, 2_000, 20_000, 20_000, 1)
        results += bench_stream(5_000, 100.0)
    else:
        if args.full:  # the large sizes alone (the small ones: a run without --full)
            results += bench_engines(engines, 1_000_000, 10_000_000, 10_000_000, 1)
        else:
            results += bench_engines(engines, 100_000, 1_000_000, 1_000_000, 3)
            results += bench_stream(100_000, 200.0)
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(msgspec.json.encode(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
