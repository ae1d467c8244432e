"""An open-loop KServe ModelInfer client in Python (grpc.aio), for machines where the native
``kserve_load`` is not built: requests at fixed intervals, latency measured from each one's
intended send time (no coordinated omission), refusals counted apart from answers.

``python -m tests.chaos.openloop --target HOST:PORT --model M --entity ID --rate R
--duration S [--warmup S] [--deadline S]`` prints one JSON object: sent, client_backlog and the
latency (us) of every measured request by status code name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time
from collections.abc import Sequence

import grpc
from tritonclient.grpc import service_pb2 as kserve

MAX_OUTSTANDING = 20_000


def request_bytes(model: str, entity: str) -> bytes:
    req = kserve.ModelInferRequest(model_name=model)
    req.inputs.add(name="entity_ids", datatype="BYTES", shape=[1])
    raw = entity.encode()
    req.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    return bytes(req.SerializeToString())


async def run(args: argparse.Namespace) -> dict[str, object]:
    payload = request_bytes(args.model, args.entity)
    latency: dict[str, list[float]] = {}
    outstanding = 0
    sent = 0
    backlog = 0
    async with grpc.aio.insecure_channel(args.target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        await channel.channel_ready()

        async def one(intended: float, measured: bool) -> None:
            nonlocal outstanding
            try:
                await call(payload, timeout=args.deadline)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            finally:
                outstanding -= 1
            if measured:
                latency.setdefault(code, []).append((time.monotonic() - intended) * 1e6)

        interval = 1.0 / args.rate
        start = time.monotonic() + 0.1
        measure_from = start + args.warmup
        end = measure_from + args.duration
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            intended = start + i * interval
            i += 1
            if intended >= end:
                break
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            measured = intended >= measure_from
            if outstanding >= MAX_OUTSTANDING:
                backlog += int(measured)
                continue
            outstanding += 1
            sent += int(measured)
            task = asyncio.create_task(one(intended, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=args.deadline + 5)
    return {"sent": sent, "client_backlog": backlog, "latency_us": latency}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.openloop", description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--entity", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--deadline", type=float, default=30.0)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
