"""KServe v2 / Triton inference protocol over HTTP/REST, mounted on the HTTP front.

Unmodified ``tritonclient.http`` and ``perf_analyzer`` (its default HTTP mode) work against it.
A deployed model has one input ``entity_ids`` (BYTES, shape ``[-1]``), optional FP32 inputs
named after feature columns (shape ``[1]`` or ``[n]``) that override those features, and one
output ``predictions`` (FP32, ``[n, k]``).

Routes (``{m}`` a model, ``[/versions/{v}]`` optional and checked against deployed versions):

- ``GET /v2`` server metadata; ``GET /v2/health/live``; ``GET /v2/health/ready`` (200 / 400)
- ``GET /v2/models/{m}[/versions/{v}]`` model metadata; ``.../ready`` (200 / 400)
- ``GET /v2/models/{m}[/versions/{v}]/config`` Triton model configuration (JSON)
- ``GET /v2/models/stats``, ``GET /v2/models/{m}[/versions/{v}]/stats`` Triton statistics
- ``POST /v2/models/{m}[/versions/{v}]/infer`` JSON tensors and the binary tensor data
  extension (``Inference-Header-Content-Length``); gzip / deflate request bodies.

Errors answer ``{"error": "message"}`` (Triton's REST shape) with the status of their
``CarraraError`` class: 400 bad input, 404 unknown model or version, 413 body over 16 MiB,
429 shed, 503 unavailable. Bodies are read by the kernel's bounded reader
(``carrara.http.read_body``: 413 as soon as the limit is passed, on the wire or decompressed).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from carrara.errors import CarraraError, InvalidArgumentError, NotFoundError, PayloadTooLargeError
from carrara.gateway.engine import PredictionResult
from carrara.gateway.kserve_types import ModelInfo, ModelStatistics
from carrara.http import check_path_params, decode_json, read_body

__all__ = [
    "ENTITY_INPUT",
    "EXTENSIONS",
    "HEADER_LENGTH",
    "MAX_BODY_BYTES",
    "OUTPUT_NAME",
    "KServeTarget",
    "PayloadTooLargeError",
    "kserve_error",
    "kserve_routes",
]

ENTITY_INPUT = "entity_ids"
OUTPUT_NAME = "predictions"
SERVER_NAME = "carrara"
#: Request and response header giving the JSON part's length when binary tensor data follows.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Largest request body accepted, on the wire and after decompression.
MAX_BODY_BYTES = 16 << 20
#: ``statistics`` makes perf_analyzer read /stats before and after each measurement window.
EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration"]


class KServeTarget(Protocol):
    """What the routes need from the ``Gateway``."""

    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    async def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: dict[str, list[float]] | None = None,
        request_id: str | None = None,
    ) -> PredictionResult: ...

    def model_info(self, name: str) -> ModelInfo: ...

    def statistics(self, name: str | None = None) -> list[ModelStatistics]: ...


# -- request / response shapes -------------------------------------------------------------


class _InputTensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class _RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class _InferRequest(msgspec.Struct):
    inputs: list[_InputTensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[_RequestedOutput] | None = None


class _ParsedInfer(msgspec.Struct):
    entity_ids: list[str]
    overrides: dict[str, list[float]] | None
    request_id: str | None
    binary_output: bool


_decoder = msgspec.json.Decoder(_InferRequest)
_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def kserve_error(exc: CarraraError) -> Response:
    """``exc`` in Triton's REST error shape, ``{"error": "message"}``, with its status."""
    return _json({"error": str(exc)}, exc.http_status)


_error = kserve_error


# -- reading the body ------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    """The request body, decompressed, stopping at ``MAX_BODY_BYTES`` (413) while reading."""
    return await read_body(request, MAX_BODY_BYTES, decode_content=True)


# -- parsing an infer request ----------------------------------------------------------------


def _flatten(data: Any, name: str) -> list[Any]:
    """Elements of a KServe ``data`` field, flat (row-major) whether it came flat or nested."""
    if not isinstance(data, list):
        raise InvalidArgumentError(f"input {name!r}: 'data' must be a JSON array")
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _element_count(tensor: _InputTensor) -> int:
    if len(tensor.shape) > 16:
        raise InvalidArgumentError(f"input {tensor.name!r} has over 16 dimensions")
    count = 1
    for d in tensor.shape:
        if d < 0:
            raise InvalidArgumentError(
                f"input {tensor.name!r} has shape {tensor.shape}; request shapes must not "
                "have negative dimensions"
            )
        count *= d
    return count


def _decode_bytes(raw: bytes, name: str) -> list[str]:
    """KServe v2 binary BYTES tensor: each element a 4-byte little-endian length + bytes."""
    out: list[str] = []
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 4 > end:
            raise InvalidArgumentError(f"input {name!r}: BYTES element length prefix cut off")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > end:
            raise InvalidArgumentError(f"input {name!r}: BYTES element cut off")
        try:
            out.append(raw[offset : offset + size].decode())
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"input {name!r}: elements must be UTF-8") from None
        offset += size
    return out


def _finite_fp32(values: NDArray[np.float32], name: str) -> list[float]:
    if not np.isfinite(values).all():
        raise InvalidArgumentError(f"override input {name!r} has non-finite values (NaN or Inf)")
    return [float(v) for v in values.tolist()]


def _json_fp32(flat: list[Any], name: str) -> list[float]:
    if not all(type(x) is float or type(x) is int for x in flat):
        raise InvalidArgumentError(f"override input {name!r}: FP32 data must be JSON numbers")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:
        raise InvalidArgumentError(f"override input {name!r} has a value out of range") from None
    with np.errstate(over="ignore", invalid="ignore"):
        return _finite_fp32(wide.astype(np.float32), name)


def _param_bool(params: dict[str, Any] | None, key: str, default: bool, where: str) -> bool:
    if not params or key not in params:
        return default
    value = params[key]
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{where}: parameter {key!r} must be a boolean")
    return value


def _parse_infer(body: bytes, header_length: str | None) -> _ParsedInfer:
    if header_length is None:
        head, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidArgumentError(
                f"{HEADER_LENGTH} must be an integer between 0 and the body length "
                f"({len(body)}), got {header_length!r}"
            )
        split = int(header_length)
        head, binary = body[:split], body[split:]
    request: _InferRequest = decode_json(head, _decoder, what="inference request JSON")

    entity_ids: list[str] | None = None
    overrides: dict[str, list[float]] = {}
    seen: set[str] = set()
    offset = 0
    for tensor in request.inputs:
        name = tensor.name
        if name in seen:
            raise InvalidArgumentError(f"input {name!r} appears more than once")
        seen.add(name)
        params = tensor.parameters or {}
        if "shared_memory_region" in params:
            raise InvalidArgumentError("shared-memory tensors are not supported")
        count = _element_count(tensor)
        raw: bytes | None = None
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if type(size) is not int or size < 0:
                raise InvalidArgumentError(
                    f"input {name!r}: binary_data_size must be a non-negative integer"
                )
            if header_length is None:
                raise InvalidArgumentError(
                    f"input {name!r} has binary_data_size but the request has no "
                    f"{HEADER_LENGTH} header"
                )
            if tensor.data is not None:
                raise InvalidArgumentError(f"input {name!r} has both 'data' and binary data")
            if offset + size > len(binary):
                raise InvalidArgumentError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body"
                )
            raw = binary[offset : offset + size]
            offset += size
        elif tensor.data is None:
            raise InvalidArgumentError(f"input {name!r} has no 'data' and no binary data")

        if name == ENTITY_INPUT:
            if tensor.datatype != "BYTES":
                raise InvalidArgumentError(
                    f"input {ENTITY_INPUT!r} must be BYTES, got {tensor.datatype}"
                )
            if raw is not None:
                ids = _decode_bytes(raw, name)
            else:
                ids = _flatten(tensor.data, name)
                if not all(type(x) is str for x in ids):
                    raise InvalidArgumentError(
                        f"input {ENTITY_INPUT!r}: BYTES data must be JSON strings"
                    )
            if len(ids) != count:
                raise InvalidArgumentError(
                    f"input {ENTITY_INPUT!r} has shape {tensor.shape} but {len(ids)} elements"
                )
            entity_ids = ids
        else:
            if tensor.datatype != "FP32":
                raise InvalidArgumentError(
                    f"override input {name!r} must be FP32, got {tensor.datatype}"
                )
            if raw is not None:
                if len(raw) != 4 * count:
                    raise InvalidArgumentError(
                        f"override input {name!r} has shape {tensor.shape} "
                        f"({count} FP32 values, {4 * count} bytes) but {len(raw)} bytes"
                    )
                values = _finite_fp32(np.frombuffer(raw, dtype="<f4"), name)
            else:
                flat = _flatten(tensor.data, name)
                if len(flat) != count:
                    raise InvalidArgumentError(
                        f"override input {name!r} has shape {tensor.shape} but {len(flat)} elements"
                    )
                values = _json_fp32(flat, name)
            overrides[name] = values
    if offset != len(binary):
        raise InvalidArgumentError(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size"
        )
    if entity_ids is None:
        raise InvalidArgumentError(f"infer request needs a BYTES input named {ENTITY_INPUT!r}")
    n = len(entity_ids)
    for name, values in overrides.items():
        if len(values) not in (1, n):
            raise InvalidArgumentError(
                f"override input {name!r} has {len(values)} values; expected 1 or one per "
                f"entity ({n})"
            )

    binary_output = _param_bool(request.parameters, "binary_data_output", False, "request")
    if request.outputs:
        names = [o.name for o in request.outputs]
        for out in request.outputs:
            if out.name != OUTPUT_NAME:
                raise InvalidArgumentError(
                    f"unknown output {out.name!r}; this model has {OUTPUT_NAME!r}"
                )
            params = out.parameters or {}
            if "shared_memory_region" in params:
                raise InvalidArgumentError("shared-memory tensors are not supported")
            if "classification" in params:
                raise InvalidArgumentError("the classification extension is not supported")
            binary_output = _param_bool(
                params, "binary_data", binary_output, f"output {out.name!r}"
            )
        if len(names) != len(set(names)):
            raise InvalidArgumentError(f"output {OUTPUT_NAME!r} is requested more than once")
    if request.id is not None and len(request.id) > 256:
        raise InvalidArgumentError("request id is over 256 characters")
    return _ParsedInfer(entity_ids, overrides or None, request.id, binary_output)


def _infer_response(
    model: str, version: str | None, parsed: _ParsedInfer, result: PredictionResult
) -> Response:
    outputs = np.ascontiguousarray(result.outputs, dtype="<f4")
    tensor: dict[str, Any] = {
        "name": OUTPUT_NAME,
        "datatype": "FP32",
        "shape": list(outputs.shape),
    }
    if parsed.binary_output:
        tensor["parameters"] = {"binary_data_size": outputs.nbytes}
    else:
        tensor["data"] = outputs.reshape(-1).tolist()
    body: dict[str, Any] = {
        "model_name": model,
        "model_version": version or str(result.versions[0]),
    }
    if parsed.request_id is not None:
        body["id"] = parsed.request_id
    body["parameters"] = {
        "carrara_variants": ",".join(sorted(set(result.variants))),
        "carrara_degraded": any(result.degraded),
    }
    body["outputs"] = [tensor]
    head = _encoder.encode(body)
    if not parsed.binary_output:
        return Response(head, media_type="application/json")
    return Response(
        head + outputs.tobytes(),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


# -- metadata, config, statistics ------------------------------------------------------------


def _info(target: KServeTarget, model: str, version: str | None) -> ModelInfo:
    info = target.model_info(model)
    if version is not None and version not in info.versions:
        raise NotFoundError(
            f"model {model!r} has no deployed version {version!r}; deployed: {info.versions}"
        )
    return info


def _metadata(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "versions": info.versions,
        "platform": info.platform,
        "inputs": [{"name": ENTITY_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, info.output_dim]}],
    }


def _config(info: ModelInfo) -> dict[str, Any]:
    """Triton's model configuration as JSON. perf_analyzer takes inputs from the metadata and
    requires every ``input`` here to be in it, so the override columns are listed only under
    ``parameters``; ``max_batch_size`` 0 means the shapes carry no batch dimension."""
    return {
        "name": info.name,
        "platform": info.platform,
        "backend": info.platform,
        "version_policy": {"specific": {"versions": [int(v) for v in info.versions]}},
        "max_batch_size": 0,
        "input": [
            {
                "name": ENTITY_INPUT,
                "data_type": "TYPE_STRING",
                "format": "FORMAT_NONE",
                "dims": [-1],
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
        ],
        "output": [
            {
                "name": OUTPUT_NAME,
                "data_type": "TYPE_FP32",
                "dims": [-1, info.output_dim],
                "label_filename": "",
                "is_shape_tensor": False,
            }
        ],
        "model_transaction_policy": {"decoupled": False},
        "parameters": {"carrara_override_columns": {"string_value": ",".join(info.columns)}},
    }


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def _stats_json(s: ModelStatistics) -> dict[str, Any]:
    """Triton's statistics JSON. perf_analyzer reads success, queue and the compute_* entries
    of each model; the gateway's whole handling time is reported as compute_infer."""
    ok = s.success_count
    return {
        "name": s.name,
        "version": s.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(ok, s.success_ns),
            "fail": _duration(s.fail_count, s.fail_ns),
            "queue": _duration(ok, 0),
            "compute_input": _duration(ok, 0),
            "compute_infer": _duration(ok, s.success_ns),
            "compute_output": _duration(ok, 0),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [],
    }


# -- routes ------------------------------------------------------------------------------------


def kserve_routes(target: KServeTarget) -> list[BaseRoute]:
    """The KServe v2 REST routes over ``target`` (the ``Gateway``), for the HTTP front."""
    from carrara import __version__

    async def server_metadata(request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if target.ready else 400)

    async def model_metadata(request: Request) -> Response:
        try:
            info = _info(target, request.path_params["model"], request.path_params.get("version"))
        except CarraraError as exc:
            return _error(exc)
        return _json(_metadata(info))

    async def model_ready(request: Request) -> Response:
        try:
            _info(target, request.path_params["model"], request.path_params.get("version"))
        except CarraraError:
            return Response(status_code=400)
        return Response(status_code=400 if target.draining else 200)

    async def model_config(request: Request) -> Response:
        try:
            info = _info(target, request.path_params["model"], request.path_params.get("version"))
        except CarraraError as exc:
            return _error(exc)
        return _json(_config(info))

    async def all_stats(request: Request) -> Response:
        return _json({"model_stats": [_stats_json(s) for s in target.statistics(None)]})

    async def model_stats(request: Request) -> Response:
        model = request.path_params["model"]
        version = request.path_params.get("version")
        try:
            _info(target, model, version)
            stats = target.statistics(model)
        except CarraraError as exc:
            return _error(exc)
        if version is not None:  # counted per model: report them under the version asked for
            stats = [msgspec.structs.replace(s, version=version) for s in stats]
        return _json({"model_stats": [_stats_json(s) for s in stats]})

    async def infer(request: Request) -> Response:
        model = request.path_params["model"]
        version = request.path_params.get("version")
        try:
            check_path_params(request.path_params)
            if version is not None:
                _info(target, model, version)
            body = await _read_body(request)
            parsed = _parse_infer(body, request.headers.get(HEADER_LENGTH))
            result = await target.predict(
                model, parsed.entity_ids, parsed.overrides, parsed.request_id
            )
        except CarraraError as exc:
            return _error(exc)
        return _infer_response(model, version, parsed, result)

    async def unknown(request: Request) -> Response:
        return _json({"error": f"no KServe v2 endpoint {request.method} {request.url.path}"}, 404)

    routes: list[BaseRoute] = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/stats", all_stats, methods=["GET"]),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(f"{prefix}/ready", model_ready, methods=["GET"]),
            Route(f"{prefix}/config", model_config, methods=["GET"]),
            Route(f"{prefix}/stats", model_stats, methods=["GET"]),
            Route(f"{prefix}/infer", infer, methods=["POST"]),
        ]
    routes.append(Route("/v2/{rest:path}", unknown, methods=["GET", "POST", "PUT", "DELETE"]))
    return routes
