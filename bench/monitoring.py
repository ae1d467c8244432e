"""Monitoring consumer throughput: predictions profiled per second.

Run ``python -m bench.monitoring [--predictions N] [--features K] [--batch-size B]
[--redis URL] [--postgres URL] [--json PATH]``.

The prediction log is filled first (not timed); then one consumer drains it: read from the
event log, msgpack decode, dedup by request id + insert into the label-join table, bin every
feature and the prediction into the window histograms, merge them into the stored windows,
ack, and judge each window as it closes (drift statistics + alert state). Embedded backends
(durable SQLite log + SQLite state) by default; ``--redis``/``--postgres`` switch to the
production ones. Also reported: the binning step alone (no log, no database), which bounds
what the consumer could reach with free I/O.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from carrara.eventlog import open_event_log
from carrara.monitoring import ModelMonitorConfig, MonitoringConsumer
from carrara.monitoring.profiles import load_profile
from carrara.monitoring.traffic import SyntheticModel, phased_records, publish, register_synthetic
from carrara.monitoring.windows import Binner
from carrara.sql import connect

MODEL = "bench"
WINDOW_MS = 60_000


class Result(msgspec.Struct):
    name: str
    predictions: int
    features: int
    batch_size: int
    backends: str
    seconds: float
    predictions_per_s: float
    bin_only_per_s: float
    windows_judged: int


@contextmanager
def _state_url(postgres_url: str | None, tmp: str) -> Iterator[str]:
    """A SQLite file, or a fresh PostgreSQL database created beside ``postgres_url``'s and
    dropped afterwards (the benchmark never writes into an existing database)."""
    if postgres_url is None:
        yield f"sqlite:///{Path(tmp) / 'registry.db'}"
        return
    import psycopg

    name = f"carrara_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(
    *,
    predictions: int = 50_000,
    features: int = 8,
    batch_size: int = 1_000,
    per_window: int = 5_000,
    redis_url: str | None = None,
    postgres_url: str | None = None,
) -> Result:
    with tempfile.TemporaryDirectory() as tmp, _state_url(postgres_url, tmp) as state_url:
        db = connect(state_url)
        log_url = (
            f"{redis_url}?prefix=carrara-bench-{time.time_ns()}"
            if redis_url
            else f"local:///{Path(tmp) / 'events.db'}"
        )
        log = open_event_log(log_url)
        try:
            sm = SyntheticModel(n_numeric=features - 1, seed=1)  # + one categorical
            config = ModelMonitorConfig(window_ms=WINDOW_MS, allowed_lateness_ms=0)
            register_synthetic(db, sm, model=MODEL, config=config)
            windows = max(1, predictions // per_window)
            records = phased_records(
                sm,
                [(windows, {})],
                model=MODEL,
                window_ms=WINDOW_MS,
                per_window=per_window,
                prefix=f"b{time.time_ns()}",
            )
            publish(log, records)

            binner = Binner(load_profile(db, MODEL, 1), WINDOW_MS)
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(0, len(records), batch_size):
                    binner.bin(records[i : i + batch_size])
                rates.append(len(records) / (time.perf_counter() - t0))

            consumer = MonitoringConsumer(db, log, batch_size=batch_size)
            t0 = time.perf_counter()
            total = consumer.run(stop_when_idle=True, block_ms=0)
            seconds = time.perf_counter() - t0
            if total.predictions_new != len(records):
                raise RuntimeError(f"profiled {total.predictions_new} of {len(records)}")
            if redis_url:
                import redis

                client = redis.Redis.from_url(redis_url)
                try:
                    for key in client.scan_iter(match=log_url.split("prefix=")[1] + "*"):
                        client.delete(key)
                finally:
                    client.close()
        finally:
            log.close()
            db.close()
    return Result(
        name="monitoring consumer",
        predictions=len(records),
        features=features,
        batch_size=batch_size,
        backends=("redis" if redis_url else "local log")
        + " + "
        + ("postgresql" if postgres_url else "sqlite"),
        seconds=seconds,
        predictions_per_s=len(records) / seconds,
        bin_only_per_s=statistics.median(rates),
        windows_judged=total.windows_judged,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=8, help="logged features per record")
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--redis", default=None, help="Redis Streams event log URL")
    parser.add_argument(
        "--postgres",
        default=None,
        help="PostgreSQL server URL; the state goes to a fresh database created beside it",
    )
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(
        predictions=args.predictions,
        features=args.features,
        batch_size=args.batch_size,
        redis_url=args.redis,
        postgres_url=args.postgres,
    )
    print(
        f"{result.name} ({result.backends}): {result.predictions} predictions x"
        f" {result.features} features + prediction, batch {result.batch_size}:"
        f" {result.predictions_per_s:,.0f} predictions/s profiled end to end"
        f" ({result.seconds:.2f} s, {result.windows_judged} windows judged);"
        f" binning alone {result.bin_only_per_s:,.0f}/s"
    )
    if args.json:
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
