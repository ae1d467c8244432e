"""The native serving core, under its public names.

Specs and policies are plain msgspec structs; they go once into a native object whose hot
methods take strings/bytes and return numpy arrays (docs/ARCHITECTURE.md draws the path).

:func:`serving_spec` is the contract between training and serving: what a registered version
carries so that a gateway can assemble its features and batch its calls.
"""

from __future__ import annotations

from typing import Any

import msgspec
from numpy.typing import ArrayLike

from carrara._native import (
    Assembler,
    FeatureCache,
    FeatureVector,
    ManualClock,
    Plan,
    Router,
    stable_hash,
)

__all__ = [
    "Assembler",
    "AssemblerSpec",
    "Batching",
    "FeatureCache",
    "FeatureRef",
    "FeatureVector",
    "GroupSchema",
    "ManualClock",
    "Plan",
    "Router",
    "RoutingPolicy",
    "Variant",
    "decode_feature_vector",
    "encode_feature_vector",
    "serving_spec",
    "stable_hash",
]


class GroupSchema(msgspec.Struct, frozen=True):
    """A feature-group version: its features in the order its FeatureVector values use."""

    name: str
    version: int
    features: tuple[str, ...]


class FeatureRef(msgspec.Struct, frozen=True):
    """One output column: ``group.feature``, and the value used when it is missing."""

    group: str
    feature: str
    default: float = 0.0


class AssemblerSpec(msgspec.Struct, frozen=True):
    """What a model reads: the group versions involved and the ordered output columns."""

    groups: tuple[GroupSchema, ...]
    features: tuple[FeatureRef, ...]


class Variant(msgspec.Struct, frozen=True):
    """A model variant in a deployment and its share of traffic in basis points."""

    name: str
    weight_bp: int
    canary: bool = False


class RoutingPolicy(msgspec.Struct, frozen=True):
    """Traffic split: routed variants (weights sum to 10,000 bp), shadows, fallback."""

    variants: tuple[Variant, ...]
    salt: str = ""
    shadows: tuple[str, ...] = ()
    fallback: str | None = None


def encode_feature_vector(
    entity_id: str,
    group: str,
    group_version: int,
    values: ArrayLike,
    missing: ArrayLike | None = None,
    event_timestamp_us: int = 0,
    created_timestamp_us: int = 0,
) -> bytes:
    """Serialize one entity's values to the online-store ``FeatureVector`` protobuf."""
    return FeatureVector(
        entity_id,
        group,
        group_version,
        values,
        missing,
        event_timestamp_us,
        created_timestamp_us,
    ).encode()


def decode_feature_vector(data: bytes) -> FeatureVector:
    """Parse ``FeatureVector`` bytes; raises ``carrara.DecodeError`` on malformed input."""
    return FeatureVector.decode(data)


class Batching(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dynamic batching of an in-process model (Triton's ``dynamic_batching``)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0


def serving_spec(
    spec: AssemblerSpec, *, max_batch_size: int = 64, max_queue_delay_us: int = 0
) -> dict[str, Any]:
    """What to register as a version's ``serving_spec``: the features it reads, in order, and
    how the gateway batches its calls."""
    out: dict[str, Any] = msgspec.to_builtins(spec)
    out["batching"] = msgspec.to_builtins(Batching(max_batch_size, max_queue_delay_us))
    return out
