"""A gateway process whose model has a fixed service time, so that its saturation is known
whatever the machine: ``--workers`` threads each take ``--sleep-ms`` per prediction (the sleep
holds no core), i.e. saturation = workers / sleep. The rest is the real gateway: the native
engine and admission bound (``--max-in-flight``), both fronts, graceful stop on SIGTERM.

``python tests/chaos/slow_gateway.py --grpc-port P --http-port Q [--sleep-ms 10]
[--workers 8] [--max-in-flight 16]``; model ``m``, entity ``e1`` is in the store.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
)
from carrara.gateway.backends import BackendInfo
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.gateway.server import GatewayServer
from carrara.gateway.service import Gateway
from tests.servers import DictStore

SPEC = AssemblerSpec(
    groups=(GroupSchema("u", 1, ("x", "y")),),
    features=(FeatureRef("u", "x", -5.0), FeatureRef("u", "y", 0.0)),
)


class SlowBackend:
    """``y = 2 x + y + 1`` after ``sleep_s``; called one request at a time on each of the
    engine's worker threads (not in process: no batching)."""

    runs_in_process = False

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s
        self.info = BackendInfo(
            input_name="features",
            input_dim=2,
            output_names=("score",),
            output_dim=1,
            platform="sleep",
        )

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        time.sleep(self.sleep_s)
        w = np.array([[2.0], [1.0]], np.float32)
        return (x @ w + np.float32(1.0)).astype(np.float32)

    def close(self) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--sleep-ms", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=16)
    args = p.parse_args(argv)
    engine = ServingEngine(
        DictStore("u", 1, {f"e{i}": (float(i), float(i % 3)) for i in range(100)}),
        cache=FeatureCache(capacity=1_000, ttl_seconds=3_600.0),
        max_in_flight=args.max_in_flight,
        workers=args.workers,
    )
    backend: Any = SlowBackend(args.sleep_ms / 1e3)
    engine.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(VariantSpec(name="v1", version=1, features=SPEC, timeout_s=30.0),),
        ),
        {"v1": backend},
    )
    gateway = Gateway(engine)
    server = GatewayServer(gateway, grpc_port=args.grpc_port, http_port=args.http_port)

    async def serve() -> None:
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"slow gateway: gRPC {server.grpc_port}", flush=True)
        await stop.wait()
        await server.stop()

    try:
        asyncio.run(serve())
    finally:
        gateway.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
