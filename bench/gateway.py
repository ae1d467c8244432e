"""Gateway benchmarks: the embedded path, and gRPC / HTTP predict on loopback.

Run ``python -m bench.gateway [--json PATH] [--requests N]``. Each case serves one entity per
request with all features cached (the "cache hit" rows of BENCHMARKS.md) through a small ONNX
model (96 features from 3 groups -> 1 score). Latencies are per request, measured by a closed-
loop client on the same machine (the open-loop SLA harness is `bench.loadtest`, issue 8);
figures are medians and p99 over N requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.gateway.onnx_models import write_linear_model

GROUPS = tuple(GroupSchema(f"g{g}", 1, tuple(f"f{g}_{i}" for i in range(32))) for g in range(3))
SPEC = AssemblerSpec(
    groups=GROUPS, features=tuple(FeatureRef(g.name, f) for g in GROUPS for f in g.features)
)
ENTITIES = 1_000


class DictStore:
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.data = {
            f"{g.name}:1:e{i}": encode_feature_vector(
                f"e{i}", g.name, 1, rng.normal(size=32).astype(np.float32)
            )
            for g in GROUPS
            for i in range(ENTITIES)
        }

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.data.get(k) for k in keys]


@contextmanager
def engine() -> Iterator[ServingEngine]:
    with TemporaryDirectory() as tmp:
        path = write_linear_model(
            Path(tmp) / "m.onnx", np.linspace(-1, 1, 96, dtype=np.float32), 0.1, sigmoid=True
        )
        e = ServingEngine(DictStore(), cache=FeatureCache(capacity=20_000))
        e.deploy(
            ModelDeployment(
                model="bench",
                policy=RoutingPolicy(variants=(Variant("v1", 9_000), Variant("v2", 1_000))),
                variants=(
                    VariantSpec(name="v1", version=1, features=SPEC),
                    VariantSpec(name="v2", version=2, features=SPEC),
                ),
            ),
            {"v1": OnnxBackend(path), "v2": OnnxBackend(path)},
        )
        for i in range(0, ENTITIES, 100):  # warm the cache
            e.predict("bench", [f"e{j}" for j in range(i, i + 100)])
        try:
            yield e
        finally:
            e.close()


def measure(call: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        call(i)
        out.append(time.perf_counter_ns() - t)
    return out


def summarize(name: str, samples_ns: list[float]) -> dict[str, float | str]:
    ordered = sorted(samples_ns)
    return {
        "name": name,
        "median_ns": statistics.median(ordered),
        "p99_ns": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "n": len(ordered),
    }


def run(requests: int = 2_000) -> list[dict[str, float | str]]:
    import grpc
    import httpx

    from carrara.gateway.grpc_client import predict_stub
    from carrara.gateway.server import GatewayServer, ServerThread
    from carrara.gateway.service import Gateway
    from carrara.v1 import predict_pb2

    results = []
    with engine() as e:
        results.append(
            summarize(
                "embedded_predict_1_entity_cached",
                measure(lambda i: e.predict("bench", [f"e{i % ENTITIES}"]), requests),
            )
        )
        batch = [f"e{j}" for j in range(100)]
        results.append(
            summarize(
                "embedded_predict_100_entities_cached",
                measure(lambda i: e.predict("bench", batch), max(50, requests // 20)),
            )
        )
        gateway = Gateway(e)
        thread = ServerThread(lambda: GatewayServer(gateway))
        server = thread.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                call = predict_stub(channel)
                reqs = [
                    predict_pb2.PredictRequest(model="bench", entity_ids=[f"e{i}"])
                    for i in range(ENTITIES)
                ]
                measure(lambda i: call(reqs[i % ENTITIES]), 200)  # warm-up
                results.append(
                    summarize(
                        "grpc_predict_1_entity_cached",
                        measure(lambda i: call(reqs[i % ENTITIES]), requests),
                    )
                )
            with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}") as http:
                bodies = [json.dumps({"entity_ids": [f"e{i}"]}).encode() for i in range(ENTITIES)]
                headers = {"content-type": "application/json"}
                measure(
                    lambda i: http.post(
                        "/predict/bench", content=bodies[i % ENTITIES], headers=headers
                    ),
                    200,
                )
                results.append(
                    summarize(
                        "http_predict_1_entity_cached",
                        measure(
                            lambda i: http.post(
                                "/predict/bench", content=bodies[i % ENTITIES], headers=headers
                            ),
                            requests,
                        ),
                    )
                )
        finally:
            thread.stop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(args.requests)
    print(f"{'case':42} {'median':>10} {'p99':>10}")
    for r in results:
        median_us, p99_us = float(r["median_ns"]) / 1e3, float(r["p99_ns"]) / 1e3
        print(f"{r['name']!s:42} {median_us:>8.1f}us {p99_us:>8.1f}us")
    if args.json:
        args.json.write_text(
            json.dumps(
                [{k: r[k] for k in ("name", "median_ns", "p99_ns")} for r in results], indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
