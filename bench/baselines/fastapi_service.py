"""The baseline: the prediction service a team would write by hand without Carrara.

FastAPI + redis-py (asyncio, hiredis parser) + onnxruntime, doing the same work as the gateway:
read the entity's feature vectors of every group from the same Redis keys in one MGET, decode
the ``FeatureVector`` protobufs with the generated Python classes, fill a float32 ``[n, d]``
matrix (0.0 for missing), run the same ONNX model, answer JSON. No feature cache, no batching
tricks: the straightforward version, written carefully (one MGET per request, not one GET per
key; the ONNX session created once). ``BaselinePredictor`` is the same logic as a plain
function for the in-process comparison with Carrara's embedded path.

Run: ``python -m bench.baselines.fastapi_service --redis-url URL --namespace NS --model PATH
--groups g0:1:32,g1:1:32,g2:1:32``; it prints ``{"http_port": N}`` and serves until stdin
closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

__all__ = ["BaselinePredictor", "create_app", "main"]


class PredictBody(BaseModel):
    """The request body (module level: FastAPI resolves annotations by name)."""

    entity_ids: list[str]


class BaselinePredictor:
    """Keys, decode, assemble and infer: the request path without the web framework."""

    def __init__(
        self, namespace: str, groups: Sequence[tuple[str, int, int]], model_path: str
    ) -> None:
        import onnxruntime as ort

        from carrara.v1 import feature_vector_pb2

        self.prefixes = [f"{namespace}:{name}:{version}:" for name, version, _ in groups]
        self.widths = [width for _, _, width in groups]
        self.offsets = np.cumsum([0, *self.widths]).tolist()
        self.dim = int(self.offsets[-1])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.message = feature_vector_pb2.FeatureVector

    def keys(self, entity_ids: Sequence[str]) -> list[str]:
        return [p + e for e in entity_ids for p in self.prefixes]

    def assemble(self, n: int, values: Sequence[Any]) -> NDArray[np.float32]:
        """float32 [n, d] from the MGET answer (entity-major, group-minor; None: missing)."""
        x = np.zeros((n, self.dim), dtype=np.float32)
        groups = len(self.prefixes)
        for k, raw in enumerate(values):
            if raw is None:
                continue
            row, g = divmod(k, groups)
            fv = self.message.FromString(raw)
            vals = np.asarray(fv.values, dtype=np.float32)[: self.widths[g]]
            x[row, self.offsets[g] : self.offsets[g] + len(vals)] = vals
        return x

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = self.session.run(None, {self.input_name: x})[0]
        return out

    def predict_sync(self, redis_client: Any, entity_ids: Sequence[str]) -> NDArray[np.float32]:
        values = redis_client.mget(self.keys(entity_ids))
        return self.infer(self.assemble(len(entity_ids), values))


def create_app(predictor: BaselinePredictor, redis_url: str) -> Any:
    import redis.asyncio
    from fastapi import FastAPI, HTTPException

    app = FastAPI()
    # A blocking pool: under overload requests wait for a connection instead of failing with
    # "Too many connections" (redis-py's default pool), as a careful team would configure it.
    client = redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=64, timeout=10
        )
    )

    @app.post("/predict/{model}")
    async def predict(model: str, body: PredictBody) -> dict[str, Any]:
        if not body.entity_ids:
            raise HTTPException(status_code=400, detail="entity_ids is empty")
        values: list[Any] = await client.mget(predictor.keys(body.entity_ids))
        scores = predictor.infer(predictor.assemble(len(body.entity_ids), values))
        return {
            "model": model,
            "predictions": [
                {"entity_id": e, "values": s}
                for e, s in zip(body.entity_ids, scores.tolist(), strict=True)
            ],
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def parse_groups(text: str) -> list[tuple[str, int, int]]:
    """``g0:1:32,g1:1:32`` -> [(name, version, width), ...]."""
    out = []
    for part in text.split(","):
        name, version, width = part.split(":")
        out.append((name, int(version), int(width)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", required=True, help="ONNX model path")
    parser.add_argument("--groups", required=True, help="name:version:width,...")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    predictor = BaselinePredictor(args.namespace, parse_groups(args.groups), args.model)
    config = uvicorn.Config(
        create_app(predictor, args.redis_url),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(json.dumps({"http_port": port}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        server.should_exit = True
        await task

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:  # pragma: no cover
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
