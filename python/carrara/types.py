"""Wire types shared by several parts (msgspec structs), and their topic names.

The gateway writes ``PredictionRecord`` to the ``predictions`` topic; labels that arrive later
go to ``labels``; monitoring consumes both. Encoded with msgpack (``encode``/``decode_*``).
"""

from __future__ import annotations

import msgspec

__all__ = [
    "TOPIC_ALERTS",
    "TOPIC_DEPLOYMENTS",
    "TOPIC_FEATURE_UPDATES",
    "TOPIC_LABELS",
    "TOPIC_PREDICTIONS",
    "TOPIC_TRAINING_EVENTS",
    "LabelRecord",
    "PredictionRecord",
    "decode_label",
    "decode_prediction",
    "encode",
]

TOPIC_PREDICTIONS = "predictions"
TOPIC_LABELS = "labels"
TOPIC_TRAINING_EVENTS = "training-events"
TOPIC_FEATURE_UPDATES = "feature-updates"
TOPIC_ALERTS = "alerts"
TOPIC_DEPLOYMENTS = "deployments"


class PredictionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One prediction for one entity, as the gateway logs it."""

    request_id: str  # unique per (request, row): "{request uuid}:{row}"
    model: str
    version: int
    variant: str
    entity_id: str
    features: dict[str, float]  # the assembled model input, by column name (NaN never logged)
    missing: list[str] = []  # columns that took their default
    prediction: list[float]  # model output row (e.g. [p] or class probabilities)
    latency_us: int
    timestamp_ms: int
    degraded: bool = False  # served from cache/defaults because a store was down
    shadow: bool = False  # produced by a shadow variant (never returned to the caller)


class LabelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ground truth for an earlier prediction, joined to it by ``request_id``."""

    request_id: str
    model: str
    label: float
    timestamp_ms: int


_prediction_decoder = msgspec.msgpack.Decoder(PredictionRecord)
_label_decoder = msgspec.msgpack.Decoder(LabelRecord)
_encoder = msgspec.msgpack.Encoder()


def encode(record: PredictionRecord | LabelRecord) -> bytes:
    """msgpack bytes for the event log."""
    return _encoder.encode(record)


def decode_prediction(data: bytes) -> PredictionRecord:
    return _prediction_decoder.decode(data)


def decode_label(data: bytes) -> LabelRecord:
    return _label_decoder.decode(data)
