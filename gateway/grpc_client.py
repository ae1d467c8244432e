"""Client side of the gateway's gRPC API (the server is native: ``server/`` in C++).

``predict_stub`` calls Carrara's ``carrara.v1.Predict``; the KServe v2 / Triton
``GRPCInferenceService`` on the same port is called with unmodified ``tritonclient.grpc``.
KServe view of a deployed model: one input ``entity_ids`` (BYTES, shape [n]) and one output
``predictions`` (FP32, shape [n, k]); optional FP32 inputs named after feature columns
(shape [1] or [n]) override those features.

``open_channel`` opens ``grpc://host:port`` (plaintext) or ``grpcs://host:port`` (TLS); a
gateway with token auth on wants ``metadata=bearer_metadata(token)`` on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from carrara.v1 import predict_pb2

__all__ = [
    "ENTITY_INPUT",
    "OUTPUT_NAME",
    "PREDICT_METHOD",
    "SERVER_NAME",
    "bearer_metadata",
    "open_channel",
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


def open_channel(target: str, *, root_certificates: str | Path | None = None) -> grpc.Channel:
    """A channel to ``grpc://host:port`` (plaintext; also a bare ``host:port``) or
    ``grpcs://host:port`` (TLS, trusting ``root_certificates``, a PEM file, or else the
    system's roots)."""
    if target.startswith("grpcs://"):
        roots = Path(root_certificates).read_bytes() if root_certificates else None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.secure_channel(target.removeprefix("grpcs://"), credentials)
    return grpc.insecure_channel(target.removeprefix("grpc://"))


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries ``token`` (None: no token)."""
    return (("authorization", f"Bearer {token}"),) if token else None
