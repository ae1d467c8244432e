"""Traffic-split validation and the deployment record gateways consume.

Checks that need no database (weights, names, canary, the path version being routed) live
here; ``deploying.py`` adds the checks that do (versions exist, none archived, approvals).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from carrara.errors import DecodeError, InvalidArgumentError
from carrara.registry.types import (
    DeployedVariant,
    Deployment,
    TrafficSplit,
    VariantSplit,
    VersionRef,
)

__all__ = [
    "TOTAL_BP",
    "Served",
    "decode_deployment",
    "default_split",
    "deployed_variants",
    "split_versions",
    "validate_split",
]

#: Weights are basis points, as in the gateway's ``RoutingPolicy``: they sum to 10,000.
TOTAL_BP = 10_000


_deployment_decoder = msgspec.json.Decoder(Deployment)


def decode_deployment(payload: bytes) -> Deployment:
    """Parse a ``deployments`` event payload (what gateways call on each event)."""
    try:
        return _deployment_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a registry deployment event: {exc}") from exc


def default_split(version: int) -> TrafficSplit:
    """All traffic to one version."""
    return TrafficSplit(
        variants=[VariantSplit(name=f"v{version}", version=version, weight_bp=TOTAL_BP)]
    )


def validate_split(split: TrafficSplit, path_version: int) -> None:
    """Refuse a split the gateway could not route, saying what to change."""
    if not split.variants:
        raise InvalidArgumentError("traffic split has no routed variants; give at least one")
    names: dict[str, int] = {}
    refs: list[VariantSplit | VersionRef] = [*split.variants, *split.shadows]
    for v in refs:
        if not v.name:
            raise InvalidArgumentError("every variant needs a non-empty name")
        if v.name in names:
            raise InvalidArgumentError(
                f"variant name {v.name!r} is used twice; names must be unique across routed "
                "and shadow variants"
            )
        names[v.name] = v.version
    for v in split.variants:
        if not 0 <= v.weight_bp <= TOTAL_BP:
            raise InvalidArgumentError(
                f"variant {v.name!r} has weight_bp {v.weight_bp}; each weight must be in "
                f"0..{TOTAL_BP} basis points"
            )
    total = sum(v.weight_bp for v in split.variants)
    if total != TOTAL_BP:
        detail = ", ".join(f"{v.name}={v.weight_bp}" for v in split.variants)
        raise InvalidArgumentError(
            f"variant weights sum to {total} bp ({detail}); they must sum to {TOTAL_BP} (100%)"
        )
    for v in split.variants:
        if v.canary and not 0 < v.weight_bp < TOTAL_BP:
            raise InvalidArgumentError(
                f"canary variant {v.name!r} has weight_bp {v.weight_bp}; a canary takes part "
                f"of the traffic: 1..{TOTAL_BP - 1}"
            )
    if all(v.canary for v in split.variants):
        raise InvalidArgumentError("every routed variant is a canary; one must be the baseline")
    if split.fallback is not None:
        fb = split.fallback
        if fb.name in names and names[fb.name] != fb.version:
            raise InvalidArgumentError(
                f"fallback {fb.name!r} names version {fb.version} but variant {fb.name!r} is "
                f"version {names[fb.name]}; rename the fallback or match the version"
            )
        if any(s.name == fb.name for s in split.shadows):
            raise InvalidArgumentError(f"fallback {fb.name!r} cannot also be a shadow variant")
    routed = {v.version for v in split.variants if v.weight_bp > 0}
    if path_version not in routed:
        raise InvalidArgumentError(
            f"the split routes no traffic to version {path_version} named in the URL; routed "
            f"versions: {sorted(routed)}"
        )


def split_versions(split: TrafficSplit) -> list[int]:
    """Every version a split refers to, sorted, without duplicates."""
    refs: list[VariantSplit | VersionRef] = [*split.variants, *split.shadows]
    if split.fallback is not None:
        refs.append(split.fallback)
    return sorted({r.version for r in refs})


class Served(NamedTuple):
    """What a gateway needs to load one version: artifact, its sha256, the serving spec."""

    path: str
    sha256: str
    spec: dict[str, Any]


def deployed_variants(
    split: TrafficSplit, artifacts: Mapping[int, Served]
) -> list[DeployedVariant]:
    """The split's variants with their serving artifact path and sha256, for gateways."""
    out = [
        DeployedVariant(
            name=v.name,
            version=v.version,
            role="routed",
            weight_bp=v.weight_bp,
            canary=v.canary,
            artifact_path=artifacts[v.version].path,
            artifact_sha256=artifacts[v.version].sha256,
            serving_spec=artifacts[v.version].spec,
        )
        for v in split.variants
    ]
    out += [
        DeployedVariant(
            name=s.name,
            version=s.version,
            role="shadow",
            weight_bp=0,
            canary=False,
            artifact_path=artifacts[s.version].path,
            artifact_sha256=artifacts[s.version].sha256,
            serving_spec=artifacts[s.version].spec,
        )
        for s in split.shadows
    ]
    fb = split.fallback
    if fb is not None and fb.name not in {v.name for v in split.variants}:
        out.append(
            DeployedVariant(
                name=fb.name,
                version=fb.version,
                role="fallback",
                weight_bp=0,
                canary=False,
                artifact_path=artifacts[fb.version].path,
                artifact_sha256=artifacts[fb.version].sha256,
                serving_spec=artifacts[fb.version].spec,
            )
        )
    return out
