"""Client side of the gateway's gRPC API (the server is native: ``server/`` in C++).

``predict_stub`` calls Carrara's ``carrara.v1.Predict``; the KServe v2 / Triton
``GRPCInferenceService`` on the same port is called with unmodified ``tritonclient.grpc``.
KServe view of a deployed model: one input ``entity_ids`` (BYTES, shape [n]) and one output
``predictions`` (FP32, shape [n, k]); optional FP32 inputs named after feature columns
(shape [1] or [n]) override those features.
"""

from __future__ import annotations

from typing import Any

import grpc

from carrara.v1 import predict_pb2

__all__ = ["ENTITY_INPUT", "OUTPUT_NAME", "PREDICT_METHOD", "SERVER_NAME", "predict_stub"]

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
