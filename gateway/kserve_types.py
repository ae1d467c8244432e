"""What the KServe v2 / Triton protocol fronts need to know about a deployed model.

``Gateway.model_info`` and ``Gateway.statistics`` return these; the REST front
(``gateway/kserve_http.py``) and the gRPC front turn them into the protocol's messages.
"""

from __future__ import annotations

import msgspec

__all__ = ["ModelInfo", "ModelStatistics"]


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A deployed model as KServe v2 sees it: input ``entity_ids`` (BYTES ``[-1]``), optional
    FP32 inputs named after ``columns`` (feature overrides), output ``predictions`` (FP32
    ``[-1, output_dim]``)."""

    name: str
    #: Deployed model versions as strings, in numeric order (``["2", "3"]``).
    versions: list[str]
    platform: str = "carrara"
    #: Feature column names a request may override with an FP32 input of the same name.
    columns: list[str] = msgspec.field(default_factory=list)
    #: Width ``k`` of the ``predictions`` output ``[n, k]``.
    output_dim: int = 0


class ModelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative request counters of one model since the gateway started (Triton's
    statistics extension). Counted in ``Gateway.predict``, so both fronts add to them."""

    name: str
    #: The model version the counters are reported under (Triton reports per version;
    #: ``perf_analyzer`` parses it as an integer). The gateway counts per model and labels
    #: the counters with the highest deployed version.
    version: str = ""
    #: Wall-clock time of the last request, ms since the Unix epoch (0: none yet).
    last_inference_ms: int = 0
    #: Entities predicted by successful requests.
    inference_count: int = 0
    #: Successful requests.
    execution_count: int = 0
    success_count: int = 0
    #: Total time of successful requests in ``Gateway.predict``, ns.
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
