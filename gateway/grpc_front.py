"""gRPC front (``grpc.aio``): Carrara's ``Predict`` service, the KServe v2 / Triton
``GRPCInferenceService`` and ``grpc.health.v1``, all on one port and one handler path.

KServe v2 view of a deployed model: one input ``entity_ids`` (BYTES, shape [n]) and one output
``predictions`` (FP32, shape [n, k]); optional inputs named after feature columns (FP32, shape
[1] or [n]) override those features. Triton's protocol messages come from the generated modules
shipped in ``tritonclient``, so unmodified ``tritonclient.grpc`` clients work.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from carrara.errors import CarraraError, InvalidArgumentError, NotFoundError
from carrara.gateway.service import Gateway
from carrara.v1 import predict_pb2

__all__ = [
    "ENTITY_INPUT",
    "OUTPUT_NAME",
    "PREDICT_METHOD",
    "SERVER_NAME",
    "add_services",
    "decode_bytes_tensor",
    "predict_stub",
]

SERVER_NAME = "carrara"
PREDICT_METHOD = "/carrara.v1.Predict/Predict"
ENTITY_INPUT = "entity_ids"
OUTPUT_NAME = "predictions"


def predict_stub(channel: grpc.Channel) -> Any:
    """A client callable for Carrara's ``Predict`` RPC on ``channel``
    (``stub(PredictRequest, timeout=...) -> PredictResponse``)."""
    return channel.unary_unary(
        PREDICT_METHOD,
        request_serializer=predict_pb2.PredictRequest.SerializeToString,
        response_deserializer=predict_pb2.PredictResponse.FromString,
    )


async def _abort(context: grpc.aio.ServicerContext, exc: CarraraError) -> None:
    await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))


def decode_bytes_tensor(raw: bytes) -> list[str]:
    """KServe v2 raw BYTES tensor: each element is a 4-byte little-endian length + bytes."""
    out: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgumentError("truncated BYTES tensor (length prefix cut off)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgumentError("truncated BYTES tensor (element cut off)")
        try:
            out.append(raw[offset : offset + size].decode())
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError("entity ids must be UTF-8") from exc
        offset += size
    return out


class _PredictService:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        overrides = {o.name: list(o.values) for o in request.overrides} or None
        try:
            result = await self.gateway.predict(
                request.model, list(request.entity_ids), overrides, request.request_id or None
            )
        except CarraraError as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        outputs = result.outputs
        predictions = [
            predict_pb2.Prediction(
                entity_id=e,
                values=outputs[i],
                variant=result.variants[i],
                model_version=result.versions[i],
                degraded=result.degraded[i],
            )
            for i, e in enumerate(result.entity_ids)
        ]
        return predict_pb2.PredictResponse(
            model=result.model,
            model_version=result.versions[0],
            variant=result.variants[0],
            predictions=predictions,
            latency_us=result.latency_us,
            degraded=any(result.degraded),
            request_id=result.request_id,
        )


class _KServeService(kserve_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """KServe v2 inference protocol over the same engine."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.stats: dict[
            str, list[int]
        ] = {}  # model -> [success, fail, success_ns, fail_ns, last_ms]

    def _deployment(self, name: str) -> Any:
        try:
            return self.gateway.engine.deployment(name)
        except NotFoundError:
            return None

    def _shape(self, name: str) -> tuple[int, list[str]]:
        """(output width, feature column names) of the model's first routed variant."""
        live = self.gateway.engine._get(name)
        variant = live.routed[0]
        return variant.backend.info.output_dim, list(variant.assembler.column_names)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return kserve.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return kserve.ServerReadyResponse(ready=self.gateway.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self._deployment(request.name) is not None and not self.gateway.draining
        return kserve.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        from carrara import __version__

        return kserve.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        dep = self._deployment(request.name)
        if dep is None:
            await _abort(context, NotFoundError(f"model {request.name!r} is not deployed"))
        width, _columns = self._shape(request.name)
        versions = sorted({str(v.version) for v in dep.variants})
        inputs = [
            kserve.ModelMetadataResponse.TensorMetadata(
                name=ENTITY_INPUT, datatype="BYTES", shape=[-1]
            )
        ]
        outputs = [
            kserve.ModelMetadataResponse.TensorMetadata(
                name=OUTPUT_NAME, datatype="FP32", shape=[-1, width]
            )
        ]
        return kserve.ModelMetadataResponse(
            name=request.name, versions=versions, platform="carrara", inputs=inputs, outputs=outputs
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        dep = self._deployment(request.name)
        if dep is None:
            await _abort(context, NotFoundError(f"model {request.name!r} is not deployed"))
        width, _ = self._shape(request.name)
        config = mc.ModelConfig(
            name=request.name,
            platform="carrara",
            backend="carrara",
            max_batch_size=0,
            input=[mc.ModelInput(name=ENTITY_INPUT, data_type=mc.TYPE_STRING, dims=[-1])],
            output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[-1, width])],
        )
        return kserve.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        names = [request.name] if request.name else self.gateway.engine.models()
        stats = []
        for name in names:
            dep = self._deployment(name)
            if dep is None:
                await _abort(context, NotFoundError(f"model {name!r} is not deployed"))
            ok, fail, ok_ns, fail_ns, last = self.stats.get(name, [0, 0, 0, 0, 0])
            stats.append(
                kserve.ModelStatistics(
                    name=name,
                    version="",
                    last_inference=last,
                    inference_count=ok,
                    execution_count=ok,
                    inference_stats=kserve.InferStatistics(
                        success=kserve.StatisticDuration(count=ok, ns=ok_ns),
                        fail=kserve.StatisticDuration(count=fail, ns=fail_ns),
                    ),
                )
            )
        return kserve.ModelStatisticsResponse(model_stats=stats)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            response = await self._infer(request)
        except CarraraError as exc:
            self._count(request.model_name, False, time.perf_counter_ns() - start)
            await _abort(context, exc)
            raise
        self._count(request.model_name, True, time.perf_counter_ns() - start)
        return response

    def _count(self, model: str, ok: bool, ns: int) -> None:
        s = self.stats.setdefault(model, [0, 0, 0, 0, 0])
        s[0 if ok else 1] += 1
        s[2 if ok else 3] += ns
        s[4] = int(time.time() * 1000)

    async def _infer(self, request: Any) -> Any:
        if request.model_version and self._deployment(request.model_name) is not None:
            versions = {
                str(v.version) for v in self.gateway.engine.deployment(request.model_name).variants
            }
            if request.model_version not in versions:
                raise NotFoundError(
                    f"model {request.model_name!r} has no deployed version "
                    f"{request.model_version}; deployed: {sorted(versions)}"
                )
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgumentError("raw_input_contents must have one entry per input")
        entity_ids: list[str] | None = None
        overrides: dict[str, list[float]] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name == ENTITY_INPUT:
                if tensor.datatype != "BYTES":
                    raise InvalidArgumentError(
                        f"input {ENTITY_INPUT!r} must be BYTES, got {tensor.datatype}"
                    )
                entity_ids = (
                    decode_bytes_tensor(raw[i])
                    if raw
                    else [b.decode() for b in tensor.contents.bytes_contents]
                )
                expected = int(np.prod(tensor.shape)) if len(tensor.shape) else 0
                if expected != len(entity_ids):
                    raise InvalidArgumentError(
                        f"input {ENTITY_INPUT!r} has shape {list(tensor.shape)} "
                        f"but {len(entity_ids)} elements"
                    )
            else:
                if tensor.datatype != "FP32":
                    raise InvalidArgumentError(
                        f"override input {tensor.name!r} must be FP32, got {tensor.datatype}"
                    )
                values = (
                    np.frombuffer(raw[i], dtype="<f4").tolist()
                    if raw
                    else list(tensor.contents.fp32_contents)
                )
                overrides[tensor.name] = values
        if entity_ids is None:
            raise InvalidArgumentError(f"ModelInfer needs a BYTES input named {ENTITY_INPUT!r}")
        for out in request.outputs:
            if out.name != OUTPUT_NAME:
                raise InvalidArgumentError(
                    f"unknown output {out.name!r}; this model has {OUTPUT_NAME!r}"
                )
        result = await self.gateway.predict(
            request.model_name, entity_ids, overrides or None, request.id or None
        )
        outputs = np.ascontiguousarray(result.outputs, dtype="<f4")
        tensor_out = kserve.ModelInferResponse.InferOutputTensor(
            name=OUTPUT_NAME, datatype="FP32", shape=list(outputs.shape)
        )
        response = kserve.ModelInferResponse(
            model_name=request.model_name,
            model_version=str(result.versions[0]),
            id=request.id,
            outputs=[tensor_out],
            raw_output_contents=[outputs.tobytes()],
        )
        response.parameters["carrara_variants"].string_param = ",".join(result.variants)
        response.parameters["carrara_degraded"].bool_param = any(result.degraded)
        return response


def add_services(server: grpc.aio.Server, gateway: Gateway) -> health.aio.HealthServicer:
    """Register Predict, KServe v2 and health on ``server``; returns the health servicer."""
    predict = _PredictService(gateway)
    handler = grpc.method_handlers_generic_handler(
        "carrara.v1.Predict",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict.predict,
                request_deserializer=predict_pb2.PredictRequest.FromString,
                response_serializer=predict_pb2.PredictResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(_KServeService(gateway), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return health_servicer


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
