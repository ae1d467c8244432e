"""Wire types shared by several parts (msgspec structs), and the one table of topic names.

The gateway writes ``PredictionRecord`` to the ``predictions`` topic; labels that arrive later
go to ``labels``; monitoring consumes both. Encoded with msgpack (``encode``/``decode_*``).

:class:`Topic` names every event-log topic the platform uses and :data:`TOPICS` says, for
each, what travels on it, who writes it, who reads it and its default length cap. Parts name
topics only through :class:`Topic` (a test checks that no other module spells a topic name).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import msgspec

__all__ = [
    "TOPICS",
    "Topic",
    "TopicInfo",
    "LabelRecord",
    "PredictionRecord",
    "decode_label",
    "decode_prediction",
    "encode",
]


class Topic(StrEnum):
    """Every topic the platform writes or reads (the value is the topic's name in the log)."""

    PREDICTIONS = "predictions"
    LABELS = "labels"
    FEATURE_UPDATES = "feature-updates"
    FEATURE_UPDATES_DEAD = "feature-updates.dead"
    ALERTS = "alerts"
    DEPLOYMENTS = "deployments"
    TRAINING_EVENTS = "training-events"


class TopicInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a topic carries, who writes and who reads it, and how many events it keeps."""

    payload: str
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    #: Default length cap (about the newest N events); None keeps every event.
    maxlen: int | None = None


TOPICS: Mapping[Topic, TopicInfo] = {
    Topic.PREDICTIONS: TopicInfo(
        payload="PredictionRecord (msgpack), one per served row",
        writers=("gateway.prediction_log",),
        readers=("monitoring.consumer",),
        maxlen=1_000_000,
    ),
    Topic.LABELS: TopicInfo(
        payload="LabelRecord (msgpack): delayed ground truth by request_id",
        writers=("monitoring.traffic", "users (POST /monitoring/labels)"),
        readers=("monitoring.consumer",),
    ),
    Topic.FEATURE_UPDATES: TopicInfo(
        payload="feature rows (msgpack) published for streaming materialization",
        writers=("feature_cache.streaming.publish",),
        readers=("feature_cache.streaming.StreamMaterializer", "training.triggers (new_data)"),
    ),
    Topic.FEATURE_UPDATES_DEAD: TopicInfo(
        payload="feature-updates events that can never be materialized, unchanged",
        writers=("feature_cache.streaming.StreamMaterializer",),
        readers=("operators, for inspection (EventLog.read with a group of their own)",),
    ),
    Topic.ALERTS: TopicInfo(
        payload="Alert (JSON) when a monitor fires",
        writers=("monitoring.alerts",),
        readers=("training.triggers (drift / degradation retraining)",),
    ),
    Topic.DEPLOYMENTS: TopicInfo(
        payload="DeploymentEvent (JSON) from the registry outbox",
        writers=("registry (outbox)",),
        readers=("gateway.registry_source.DeploymentFollower",),
    ),
    Topic.TRAINING_EVENTS: TopicInfo(
        payload="JobEvent (JSON): every training job state change",
        writers=("training.queue",),
        readers=("training.cli (carrara training watch)",),
    ),
}


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
