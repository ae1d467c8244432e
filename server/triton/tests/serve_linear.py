"""A real Triton server (nvidia-pytriton, CPU) for the native TritonExecutor tests.

Run with the Triton virtualenv's python (`make triton-env` builds build/triton-venv):

    build/triton-venv/bin/python server/triton/tests/serve_linear.py \
        --grpc-port 18001 --http-port 18000 --metrics-port 18002

Models (all FP32 unless said otherwise, batch dimension first):
  linear  features [-1, 3] -> score [-1, 1]   score = features @ [0.5, -1, 2] + 0.25
  slow    the same, after sleeping 300 ms per batch
  multi   features [-1, 3] -> a [-1, 1] (row sum), b [-1, 2] (first two columns times 2)
  bad     features INT32 [-1, 3] -> score [-1, 1] (a dtype Carrara refuses)

Prints one line "READY <grpc-port>" on stdout once every model is ready, then serves until
stdin reaches end of file (the parent closed it or died) or SIGTERM/SIGINT arrives.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

WEIGHTS = np.array([[0.5], [-1.0], [2.0]], np.float32)
BIAS = np.float32(0.25)
MAX_BATCH = 1024


@batch
def _linear(features: np.ndarray) -> dict[str, np.ndarray]:
    return {"score": (features.astype(np.float32) @ WEIGHTS + BIAS).astype(np.float32)}


@batch
def _slow(features: np.ndarray) -> dict[str, np.ndarray]:
    time.sleep(0.3)
    return {"score": (features.astype(np.float32) @ WEIGHTS + BIAS).astype(np.float32)}


@batch
def _multi(features: np.ndarray) -> dict[str, np.ndarray]:
    x = features.astype(np.float32)
    return {"a": x.sum(axis=1, keepdims=True), "b": (x[:, :2] * 2).astype(np.float32)}


@batch
def _bad(features: np.ndarray) -> dict[str, np.ndarray]:
    return {"score": features.astype(np.float32).sum(axis=1, keepdims=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Triton's python-backend stub links libpython3.11 dynamically; make it load the library
    # of the interpreter whose standard library it will import (a system libpython of another
    # patch release fails inside multiprocessing). pytriton appends its own libraries after.
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        old = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{old}" if old else libdir

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        log_verbose=args.log_verbose,
        exit_timeout_secs=2,
    )
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at end of file: the parent is gone
        stop.set()

    f32_in = [Tensor(name="features", dtype=np.float32, shape=(3,))]
    score = [Tensor(name="score", dtype=np.float32, shape=(1,))]
    batching = ModelConfig(batching=True, max_batch_size=MAX_BATCH)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="linear", infer_func=_linear, inputs=f32_in, outputs=score, config=batching
        )
        triton.bind(
            model_name="slow", infer_func=_slow, inputs=f32_in, outputs=score, config=batching
        )
        triton.bind(
            model_name="multi",
            infer_func=_multi,
            inputs=f32_in,
            outputs=[
                Tensor(name="a", dtype=np.float32, shape=(1,)),
                Tensor(name="b", dtype=np.float32, shape=(2,)),
            ],
            config=batching,
        )
        triton.bind(
            model_name="bad",
            infer_func=_bad,
            inputs=[Tensor(name="features", dtype=np.int32, shape=(3,))],
            outputs=score,
            config=batching,
        )
        triton.run()  # returns once every bound model is ready
        print(f"READY {args.grpc_port}", flush=True)
        threading.Thread(target=watch_stdin, daemon=True).start()
        while not stop.wait(0.5):
            if not triton.is_alive():
                print("tritonserver died", file=sys.stderr, flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
