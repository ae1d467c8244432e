"""The gateway rows of BENCHMARKS.md, measured by the load harness, Carrara beside the baseline.

``python -m bench.gateway_sla [--tiny] [--rate R] [--repeat N] [--only FRONT:CACHE:BATCH ...]
[--out PATH]``

Same model (96 features from 3 groups -> 1 score, ``bench.gateway``'s deployment), same
features in the same Redis, same harness, same run:

- fronts: ``embedded`` (in-process; the baseline's plain function beside it), ``grpc``
  (Carrara Predict) and ``http`` (``POST /predict/{model}``), against the baseline's FastAPI
  service over HTTP;
- cache: ``hit`` (every entity's features in the gateway's cache) and ``miss`` (cache entries
  expire at once, so every request reads Redis; the baseline always does);
- batch: 1 entity and 100 entities per request.

Each cell runs open loop at a fixed rate (latency from the intended send time, so queueing in
the server counts) and closed loop at fixed concurrency (saturation throughput). Servers run in
their own processes so the generator never shares a GIL with them. Results go to ``--out``
(JSON) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import msgspec
import numpy as np

from bench.gateway import ENTITIES, GROUPS, SPEC
from carrara.core import encode_feature_vector
from carrara.loadgen import (
    SLO,
    CallableTarget,
    EntitySpec,
    StagePlan,
    StageResult,
    TargetSpec,
    parse_slo,
    run_stage,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench"
FRONTS = ("embedded", "grpc", "http")
CACHES = ("hit", "miss")
BATCHES = (1, 100)
# Targets the rows are held to, as in BENCHMARKS.md (others are reported, not judged).
TARGETS: dict[tuple[str, str, int], str] = {
    ("embedded", "hit", 1): "p99=100us",
    ("grpc", "hit", 1): "p99=2ms",
}


class Row(msgspec.Struct, kw_only=True):
    """One cell: a system on a front, cache mode and batch size, open and closed loop."""

    system: str  # carrara | baseline
    front: str  # embedded | grpc | http
    cache: str
    batch: int
    rate: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    achieved_rate: float
    errors: dict[str, int]
    verdict: str
    send_lag_p99_ms: float
    concurrency: int
    saturation_qps: float
    saturation_p50_ms: float
    saturation_p99_ms: float
    generator_cpu_us_per_request: float
    p99_runs_ms: list[float]  # open-loop p99 of each repeat
    qps_runs: list[float]  # closed-loop throughput of each repeat
    command: str


class Report(msgspec.Struct, kw_only=True):
    """Everything one run measured, written as JSON to ``--out``."""

    rows: list[Row]
    generator_ceiling: dict[str, float]
    settings: dict[str, float]
    machine: str


def seed_redis(redis_url: str, namespace: str) -> None:
    """The features of ``ENTITIES`` entities in the three groups, as the online store keeps
    them (``{namespace}:{group}:{version}:{entity}`` -> FeatureVector bytes)."""
    import redis

    rng = np.random.default_rng(0)
    client = redis.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for g in GROUPS:
            for i in range(ENTITIES):
                value = encode_feature_vector(
                    f"e{i}", g.name, g.version, rng.normal(size=len(g.features)).astype(np.float32)
                )
                pipe.set(f"{namespace}:{g.name}:{g.version}:e{i}", value, ex=3600)
        pipe.execute()
    finally:
        client.close()


def clear_redis(redis_url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{namespace}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    finally:
        client.close()


def write_model(directory: Path) -> Path:
    from carrara.gateway.onnx_models import write_linear_model

    # The weights bench.gateway serves.
    return write_linear_model(
        directory / "m.onnx", np.linspace(-1, 1, 96, dtype=np.float32), 0.1, sigmoid=True
    )


def _cache_args(cache: str) -> dict[str, float]:
    # "miss": entries expire a microsecond after they are written, so every request goes to
    # Redis through the full miss path (MGET, decode, fill) — the cache cannot help.
    return {"cache_capacity": 20_000, "cache_ttl_seconds": 60.0 if cache == "hit" else 1e-6}


def build_embedded(redis_url: str, namespace: str, model_path: Path, cache: str) -> Any:
    """Carrara's ``Embedded`` on the Redis online store, the bench model deployed, cache warm."""
    import redis

    from carrara.core import RoutingPolicy, Variant
    from carrara.feature_cache.online_store import RedisOnlineStore
    from carrara.gateway.backends import OnnxBackend
    from carrara.gateway.embedded import Embedded
    from carrara.gateway.engine import ModelDeployment, VariantSpec

    store = RedisOnlineStore(redis.Redis.from_url(redis_url), namespace=namespace)
    args = _cache_args(cache)
    embedded = Embedded(
        store,
        cache_capacity=int(args["cache_capacity"]),
        cache_ttl_seconds=args["cache_ttl_seconds"],
        max_in_flight=4096,
    )
    embedded.deploy(
        ModelDeployment(
            model=MODEL,
            policy=RoutingPolicy(variants=(Variant("v1", 9_000), Variant("v2", 1_000))),
            variants=(
                VariantSpec(name="v1", version=1, features=SPEC),
                VariantSpec(name="v2", version=2, features=SPEC),
            ),
        ),
        {"v1": OnnxBackend(model_path), "v2": OnnxBackend(model_path)},
    )
    for i in range(0, ENTITIES, 100):  # warm the cache (a no-op for "miss")
        embedded.predict(MODEL, [f"e{j}" for j in range(i, i + 100)])
    return embedded


def serve_carrara(argv: Sequence[str]) -> int:
    """Child process: the Carrara gateway (gRPC + HTTP) until stdin closes."""
    import asyncio

    from carrara.gateway.server import GatewayServer
    from carrara.gateway.service import Gateway

    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--cache", choices=CACHES, required=True)
    args = p.parse_args(argv)
    embedded = build_embedded(args.redis_url, args.namespace, Path(args.model), args.cache)
    gateway = Gateway(embedded.engine)

    async def run() -> None:
        server = GatewayServer(gateway)
        await server.start()
        print(json.dumps({"grpc_port": server.grpc_port, "http_port": server.http_port}))
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

    import uvloop

    uvloop.run(run())
    gateway.close()
    return 0


@contextmanager
def child(args: Sequence[str]) -> Iterator[dict[str, int]]:
    """A server process started with ``python -m ...``; yields the ports it prints."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server {' '.join(args[:1])} exited before reporting its ports")
        yield json.loads(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


class Settings(msgspec.Struct, kw_only=True):
    """Rates and durations of each cell (``TINY``: the pytest smoke run)."""

    rate_single: float = 2_000.0  # req/s, batch 1 (BENCHMARKS.md's gRPC row)
    rate_batch: float = 100.0  # req/s, batch 100
    duration_s: float = 3.0
    warmup_s: float = 1.0
    concurrency: int = 8
    saturation_s: float = 2.0
    repeat: int = 1  # runs per cell; the median one is reported


TINY = Settings(
    rate_single=200.0,
    rate_batch=20.0,
    duration_s=0.3,
    warmup_s=0.1,
    concurrency=2,
    saturation_s=0.3,
)


def _measure(
    system: str,
    front: str,
    cache: str,
    batch: int,
    spec: TargetSpec,
    settings: Settings,
    make_target: Any = None,
) -> Row:
    rate = settings.rate_single if batch == 1 else settings.rate_batch
    target_slo = TARGETS.get((front, cache, batch)) if system == "carrara" else None
    slo: SLO = parse_slo([target_slo or "p99=3600s", "errors=1%"])
    opens: list[StageResult] = []
    closes: list[StageResult] = []
    for k in range(settings.repeat):
        # Open loop: requests on a fixed Poisson schedule; latency from the intended send time.
        opens.append(
            run_stage(
                spec,
                StagePlan(
                    rate=rate,
                    arrivals="poisson",
                    duration_s=settings.duration_s,
                    warmup_s=settings.warmup_s,
                    seed=k,
                ),
                slo=slo,
                make_target=make_target,
            )
        )
        # Closed loop: as fast as the server answers, ``concurrency`` requests in flight.
        closes.append(
            run_stage(
                spec,
                StagePlan(
                    mode="closed",
                    concurrency=settings.concurrency,
                    duration_s=settings.saturation_s,
                    warmup_s=settings.warmup_s / 2,
                    seed=k,
                ),
                make_target=make_target,
            )
        )
    # The median repeat (by p99 / by throughput) stands for the cell.
    opened = sorted(opens, key=lambda r: r.latency.p99_ms)[len(opens) // 2]
    closed = sorted(closes, key=lambda r: r.achieved_rate)[len(closes) // 2]
    errors: dict[str, int] = {}
    for r in opens:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    for r in closes:
        for code, n in r.errors.items():
            errors[f"closed:{code}"] = errors.get(f"closed:{code}", 0) + n
    verdict = "-"
    if opened.verdict is not None:
        verdict = opened.verdict.describe()
        # Cells without a §5 target are judged on errors and throughput only.
        verdict = f"{target_slo}: {verdict}" if target_slo else verdict.replace("PASS", "-")
    return Row(
        system=system,
        front=front,
        cache=cache,
        batch=batch,
        rate=rate,
        p50_ms=opened.latency.p50_ms,
        p99_ms=opened.latency.p99_ms,
        p999_ms=opened.latency.p999_ms,
        achieved_rate=opened.achieved_rate,
        errors=errors,
        verdict=verdict,
        send_lag_p99_ms=opened.send_lag.p99_ms,
        concurrency=settings.concurrency,
        saturation_qps=closed.achieved_rate,
        saturation_p50_ms=closed.latency.p50_ms,
        saturation_p99_ms=closed.latency.p99_ms,
        generator_cpu_us_per_request=opened.generator_cpu_us_per_request,
        p99_runs_ms=[r.latency.p99_ms for r in opens],
        qps_runs=[r.achieved_rate for r in closes],
        command=(
            f"python -m bench.gateway_sla --rate {settings.rate_single:g} "
            f"--repeat {settings.repeat} --only {front}:{cache}:{batch}"
        ),
    )


def _cells(
    fronts: Sequence[str],
    cache: str,
    batch: int,
    settings: Settings,
    entities: EntitySpec,
    ports: dict[str, int],
    baseline_http: str,
    embedded: Any,
    predictor: Any,
    sync_redis: Any,
) -> list[Row]:
    """One cache mode and batch size: each selected Carrara front, then its baseline peer
    (the plain function beside ``embedded``, the FastAPI service beside gRPC and HTTP)."""
    rows = []
    for front in fronts:
        if front == "embedded":
            spec = TargetSpec(kind="null", model=MODEL, batch=batch, entities=entities)
            rows.append(
                _measure(
                    "carrara", front, cache, batch, spec, settings,
                    lambda: CallableTarget(lambda ids: embedded.predict(MODEL, ids)),
                )
            )  # fmt: skip
            rows.append(
                _measure(
                    "baseline", front, cache, batch, spec, settings,
                    lambda: CallableTarget(lambda ids: predictor.predict_sync(sync_redis, ids)),
                )
            )  # fmt: skip
        else:
            port = ports["grpc_port" if front == "grpc" else "http_port"]
            spec = TargetSpec(
                kind="grpc" if front == "grpc" else "http",
                address=f"127.0.0.1:{port}",
                model=MODEL,
                batch=batch,
                entities=entities,
            )
            rows.append(_measure("carrara", front, cache, batch, spec, settings))
    if any(f != "embedded" for f in fronts):
        spec = TargetSpec(
            kind="http", address=baseline_http, model=MODEL, batch=batch, entities=entities
        )
        rows.append(_measure("baseline", "http", cache, batch, spec, settings))
    return rows


def generator_ceiling(settings: Settings) -> dict[str, float]:
    """The generator against a target that answers at once: how fast it can pace and what a
    request costs it; a measured stage is trustworthy while its rate is well below this."""
    rate = 20_000.0 if settings.duration_s >= 1 else 2_000.0
    r = run_stage(TargetSpec(kind="null"), StagePlan(rate=rate, duration_s=1.0, warmup_s=0.2))
    return {
        "offered_rate": rate,
        "achieved_rate": r.achieved_rate,
        "send_lag_p50_ms": r.send_lag.p50_ms,
        "send_lag_p99_ms": r.send_lag.p99_ms,
        "cpu_us_per_request": r.generator_cpu_us_per_request,
        "ceiling_per_process_rps": 1e6 / r.generator_cpu_us_per_request
        if r.generator_cpu_us_per_request
        else 0.0,
    }


def _selected(only: Sequence[str], front: str, cache: str, batch: int) -> bool:
    if not only:
        return True
    for pattern in only:
        parts = [*pattern.split(":"), "*", "*", "*"][:3]
        if all(p in ("*", "", str(v)) for p, v in zip(parts, (front, cache, batch), strict=True)):
            return True
    return False


def run(
    redis_url: str,
    *,
    settings: Settings | None = None,
    only: Sequence[str] = (),
    namespace: str | None = None,
) -> Report:
    """Every selected cell, Carrara then the baseline, in this one run."""
    import redis

    from bench.baselines.fastapi_service import BaselinePredictor

    settings = settings or Settings()
    namespace = namespace or f"carrara_sla_{uuid.uuid4().hex[:8]}"
    groups_arg = ",".join(f"{g.name}:{g.version}:{len(g.features)}" for g in GROUPS)
    rows: list[Row] = []
    seed_redis(redis_url, namespace)
    try:
        with TemporaryDirectory() as tmp:
            model_path = write_model(Path(tmp))
            entities = EntitySpec(count=ENTITIES)
            base_cmd = [
                "bench.baselines.fastapi_service",
                "--redis-url", redis_url, "--namespace", namespace,
                "--model", str(model_path), "--groups", groups_arg,
            ]  # fmt: skip
            with child(base_cmd) as baseline_ports:
                baseline_http = f"127.0.0.1:{baseline_ports['http_port']}"
                predictor = BaselinePredictor(
                    namespace,
                    [(g.name, g.version, len(g.features)) for g in GROUPS],
                    str(model_path),
                )
                sync_redis = redis.Redis.from_url(redis_url)
                for cache in CACHES:
                    if not any(_selected(only, f, cache, b) for f in FRONTS for b in BATCHES):
                        continue
                    embedded = build_embedded(redis_url, namespace, model_path, cache)
                    server_cmd = [
                        "bench.gateway_sla", "serve",
                        "--redis-url", redis_url, "--namespace", namespace,
                        "--model", str(model_path), "--cache", cache,
                    ]  # fmt: skip
                    try:
                        with child(server_cmd) as ports:
                            for batch in BATCHES:
                                fronts = [f for f in FRONTS if _selected(only, f, cache, batch)]
                                rows.extend(
                                    _cells(
                                        fronts, cache, batch, settings, entities, ports,
                                        baseline_http, embedded, predictor, sync_redis,
                                    )
                                )  # fmt: skip
                    finally:
                        embedded.close()
                sync_redis.close()
    finally:
        clear_redis(redis_url, namespace)
    import platform

    return Report(
        rows=rows,
        generator_ceiling=generator_ceiling(settings),
        settings=msgspec.structs.asdict(settings),
        machine=f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}",
    )


def format_markdown(report: Report) -> str:
    """Carrara beside the baseline, with ratios (baseline p99 / Carrara p99, Carrara QPS /
    baseline QPS: above 1 means Carrara is better)."""
    lines = [
        "| front | cache | batch | rate/s | Carrara p50 / p99 ms | baseline p50 / p99 ms "
        "| p99 ratio | Carrara QPS | baseline QPS | QPS ratio | verdict | reproduce |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in report.rows:
        if r.system != "carrara":
            continue
        peer_front = "embedded" if r.front == "embedded" else "http"
        peer = next(
            (
                b
                for b in report.rows
                if b.system == "baseline"
                and b.front == peer_front
                and b.cache == r.cache
                and b.batch == r.batch
            ),
            None,
        )
        base_lat = f"{peer.p50_ms:.3f} / {peer.p99_ms:.3f}" if peer else "-"
        p99_ratio = f"{peer.p99_ms / r.p99_ms:.1f}x" if peer and r.p99_ms else "-"
        qps_ratio = (
            f"{r.saturation_qps / peer.saturation_qps:.1f}x"
            if peer and peer.saturation_qps
            else "-"
        )
        base_front = "baseline fn" if peer_front == "embedded" else "FastAPI"
        lines.append(
            f"| {r.front} (vs {base_front}) | {r.cache} | {r.batch} | {r.rate:g} "
            f"| {r.p50_ms:.3f} / {r.p99_ms:.3f} | {base_lat} | {p99_ratio} "
            f"| {r.saturation_qps:.0f} | {peer.saturation_qps if peer else 0:.0f} | {qps_ratio} "
            f"| {r.verdict} | `{r.command}` |"
        )
    c = report.generator_ceiling
    lines.append("")
    lines.append(
        f"Generator alone (null target, one process): {c['achieved_rate']:.0f}/s of "
        f"{c['offered_rate']:.0f}/s offered, send lag p99 {c['send_lag_p99_ms']:.3f} ms, "
        f"{c['cpu_us_per_request']:.1f} µs CPU/request (≈{c['ceiling_per_process_rps']:.0f} req/s "
        "per core)."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve_carrara(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("CARRARA_TEST_REDIS", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--only", action="append", default=[], metavar="FRONT:CACHE:BATCH")
    parser.add_argument("--tiny", action="store_true", help="a few hundred requests per cell")
    parser.add_argument("--rate", type=float, help="batch-1 open-loop rate (default 2000)")
    parser.add_argument("--duration", type=float, help="measured seconds per open-loop stage")
    parser.add_argument("--repeat", type=int, help="runs per cell, median reported (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "gateway_sla.json")
    args = parser.parse_args(argv)
    settings = TINY if args.tiny else Settings()
    if args.rate is not None:
        settings = msgspec.structs.replace(settings, rate_single=args.rate)
    if args.repeat is not None:
        settings = msgspec.structs.replace(settings, repeat=args.repeat)
    if args.duration is not None:
        settings = msgspec.structs.replace(settings, duration_s=args.duration)
    started = time.monotonic()
    report = run(args.redis_url, settings=settings, only=args.only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    print(format_markdown(report))
    print(f"\n{len(report.rows)} cells in {time.monotonic() - started:.0f} s; {report.machine}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
