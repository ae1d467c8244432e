"""Carrara's load harness (``carrara loadtest``): open-loop and closed-loop load generation
against gRPC (Carrara Predict, KServe v2), HTTP or in-process targets, HDR-style latency
histograms, SLO verdicts and reports. See ``runner`` for how coordinated omission is avoided."""

from __future__ import annotations

from carrara.loadgen.distributions import EntitySampler, EntitySpec, arrival_offsets
from carrara.loadgen.histogram import HistogramData, LatencyHistogram, LatencySummary
from carrara.loadgen.runner import (
    LoadTestResult,
    StagePlan,
    StageResult,
    ramp_rates,
    run_ramp,
    run_stage,
)
from carrara.loadgen.sla import SLO, Verdict, evaluate, parse_slo
from carrara.loadgen.targets import (
    CallableTarget,
    GrpcTarget,
    HttpTarget,
    NullTarget,
    Target,
    TargetSpec,
    build_target,
)

__all__ = [
    "SLO",
    "CallableTarget",
    "EntitySampler",
    "EntitySpec",
    "GrpcTarget",
    "HistogramData",
    "HttpTarget",
    "LatencyHistogram",
    "LatencySummary",
    "LoadTestResult",
    "NullTarget",
    "StagePlan",
    "StageResult",
    "Target",
    "TargetSpec",
    "Verdict",
    "arrival_offsets",
    "build_target",
    "evaluate",
    "parse_slo",
    "ramp_rates",
    "run_ramp",
    "run_stage",
]
