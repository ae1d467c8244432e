"""Registry benchmark: register + promote latency on PostgreSQL (target: p99 <= 10 ms).

Run ``python -m bench.registry [--postgres ADMIN_URL] [-n N] [--json PATH]``. It creates a fresh
database on the server, registers N versions of one model (4 KiB ONNX artifact, metrics,
feature lineage) and promotes each through a threshold + regression gate, so every promotion
also archives the previous PRODUCTION version. The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import numpy as np

from carrara.registry import Gate, ModelRegistry, Principal

DEFAULT_ADMIN_URL = os.environ.get(
    "CARRARA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
ACTOR = Principal("bench", frozenset({"admin"}))
GATE = Gate(metric="auc", dataset="holdout", threshold=0.5, max_regression=0.05)
ARTIFACT = os.urandom(4096)


class Result(msgspec.Struct):
    name: str
    n: int
    median_ns: int
    p99_ns: int


@contextmanager
def fresh_database(admin_url: str = DEFAULT_ADMIN_URL) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``admin_url``; dropped afterwards."""
    import psycopg

    name = f"carrara_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup(reg: ModelRegistry, model: str = "bench") -> None:
    reg.create_model(model, actor=ACTOR, framework="sklearn", gates=[GATE])


def register_and_promote(reg: ModelRegistry, i: int, model: str = "bench") -> tuple[int, int]:
    """One register + promote; returns the two latencies in ns."""
    t0 = time.perf_counter_ns()
    v = reg.register(
        model,
        actor=ACTOR,
        serving_artifact=ARTIFACT,
        framework="sklearn",
        framework_version="1.5.0",
        metrics={"auc": 0.9, "loss": 0.1},
        evaluations={"holdout": {"auc": 0.9 + (i % 10) * 1e-3}},
        feature_store_version=["trips:3", "drivers:1"],
        training_dataset_ref=f"snap-{i}",
        run_id=f"job-{i}",
    )
    t1 = time.perf_counter_ns()
    reg.promote(model, v.version, actor=ACTOR)
    t2 = time.perf_counter_ns()
    return t1 - t0, t2 - t1


def bench_register_promote(
    url: str, n: int = 500, warmup: int = 20, artifacts: str | None = None
) -> list[Result]:
    """p50/p99 of register, promote and both, over ``n`` rounds after ``warmup`` rounds."""
    with (
        tempfile.TemporaryDirectory(dir=artifacts) as tmp,
        ModelRegistry.open(url, tmp) as reg,
    ):
        setup(reg)
        for i in range(warmup):
            register_and_promote(reg, i)
        samples = np.array([register_and_promote(reg, warmup + i) for i in range(n)], np.int64)
    both = samples.sum(axis=1)
    out = []
    for name, values in (
        ("register", samples[:, 0]),
        ("promote", samples[:, 1]),
        ("register+promote", both),
    ):
        out.append(
            Result(
                name=f"registry_{name}_postgresql",
                n=n,
                median_ns=int(np.percentile(values, 50)),
                p99_ns=int(np.percentile(values, 99)),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--postgres", default=DEFAULT_ADMIN_URL, help="server admin URL")
    parser.add_argument("-n", type=int, default=500, help="measured rounds")
    parser.add_argument("--json", help="write results to this file")
    parser.add_argument("--artifacts", help="folder for the artifact store (default: a temp dir)")
    args = parser.parse_args(argv)
    with fresh_database(args.postgres) as url:
        results = bench_register_promote(url, args.n, artifacts=args.artifacts)
    print(f"{'case':40s} {'p50':>10s} {'p99':>10s}")
    for r in results:
        print(f"{r.name:40s} {r.median_ns / 1e6:8.2f}ms {r.p99_ns / 1e6:8.2f}ms")
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(msgspec.json.encode(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
