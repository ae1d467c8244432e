"""Read views of monitoring for consoles and scripts: the monitored models, drift per window
and feature, reference vs current distributions of the latest judged window, and the
performance metrics per window with their baselines. The JSON read API
(:mod:`carrara.monitoring.api`) answers with these structs, and the HTML report draws the
same data (:func:`feature_bins`, the store's queries).

Every view of one model takes ``version=None`` to mean the newest version with windows
(judged or not), else the newest profiled one; an unknown model or version is a
NotFoundError that names the known ones.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.sql import Database

from .config import DriftThresholds, ModelMonitorConfig
from .drift import FeatureDrift, Status, coarse_counts
from .performance import METRICS
from .profiles import FeatureProfile, load_profile
from .store import (
    active_alert_counts,
    drift_history,
    latest_judged_start,
    model_config,
    model_versions,
    monitored_versions,
    performance_history,
    window_sizes,
    window_state,
)

__all__ = [
    "MAX_WINDOWS",
    "DistributionView",
    "DriftPoint",
    "DriftView",
    "DriftWindow",
    "FeatureDistribution",
    "MetricHistory",
    "MetricPoint",
    "ModelList",
    "ModelSummary",
    "PerformanceView",
    "check_window_count",
    "distribution_view",
    "drift_view",
    "feature_bins",
    "format_number",
    "model_list",
    "performance_view",
    "resolve_version",
]

#: The most windows a drift or performance view returns (the newest ones).
MAX_WINDOWS = 200


class ModelSummary(msgspec.Struct, frozen=True):
    model: str
    versions: list[int]  # with a reference profile or judged windows, ascending
    active_alerts: int


class ModelList(msgspec.Struct, frozen=True):
    models: list[ModelSummary]


class DriftPoint(msgspec.Struct, frozen=True):
    """One feature in one window: PSI, KS statistic (numeric features), Jensen-Shannon
    distance (categorical features); None where not computed (too few rows, or the other
    kind of feature)."""

    psi: float | None
    ks: float | None
    js: float | None
    status: Status


class DriftWindow(msgspec.Struct, frozen=True):
    window_start: int  # ms since the epoch, prediction time
    window_ms: int
    n: int  # predictions in the window
    features: dict[str, DriftPoint]


class DriftView(msgspec.Struct, frozen=True):
    model: str
    version: int
    thresholds: DriftThresholds
    windows: list[DriftWindow]  # oldest first


class FeatureDistribution(msgspec.Struct, frozen=True):
    """Shares per bin (numeric: the PSI groups of the reference's quantile bins, labelled by
    their upper edge; categorical: the profiled categories and ``other``)."""

    feature: str
    kind: Literal["numeric", "categorical"]
    bins: list[str]
    reference: list[float]  # sums to 1
    current: list[float]  # sums to 1 (all 0 when the window holds no value of the feature)
    n: int  # non-missing values of the feature in the window
    status: Status | None  # the drift status in that window (None: not judged)


class DistributionView(msgspec.Struct, frozen=True):
    model: str
    version: int
    window_start: int | None  # the latest judged window (None before the first)
    features: list[FeatureDistribution]


class MetricPoint(msgspec.Struct, frozen=True):
    window_start: int
    value: float
    n: int  # labelled predictions of the window


class MetricHistory(msgspec.Struct, frozen=True):
    metric: str
    baseline: float | None  # the reference profile's (registry evaluation) value
    allowed: float | None  # how much worse than the baseline is tolerated (config margin)
    threshold: float | None  # where degradation fires: baseline -/+ allowed
    higher_is_better: bool | None  # None for a metric monitoring does not compute
    windows: list[MetricPoint]  # oldest first


class PerformanceView(msgspec.Struct, frozen=True):
    model: str
    version: int
    metrics: list[MetricHistory]


def format_number(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 10**5):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _shares(counts: NDArray[np.float64]) -> list[float]:
    total = counts.sum()
    shares: list[float] = (counts / total if total else counts).tolist()
    return shares


def feature_bins(
    feature: FeatureProfile, counts: NDArray[np.int64] | None
) -> tuple[list[str], list[float], list[float] | None]:
    """(bin labels, reference shares, current shares or None) on the bins PSI compares."""
    ref = coarse_counts(feature, feature.reference_counts()).astype(float)
    cur = None if counts is None else coarse_counts(feature, counts).astype(float)
    if feature.numeric is not None:
        edges = feature.numeric.edges
        cuts = [0, *feature.numeric.psi_cuts]
        labels = []
        for i in range(len(cuts)):
            hi = cuts[i + 1] - 1 if i + 1 < len(cuts) else len(edges)
            if hi < len(edges):
                labels.append(f"≤{format_number(edges[hi], 2)}")
            else:  # the open last group: above the edge before it
                labels.append(f">{format_number(edges[cuts[i] - 1], 2)}" if cuts[i] > 0 else "all")
    else:
        assert feature.categorical is not None
        labels = [*feature.categorical.categories, "other"]
    return labels, _shares(ref), None if cur is None else _shares(cur)


def check_window_count(last: int) -> int:
    if not 1 <= last <= MAX_WINDOWS:
        raise InvalidArgumentError(f"limit must be between 1 and {MAX_WINDOWS}, got {last}")
    return last


def resolve_version(db: Database, model: str, version: int | None) -> int:
    """``version`` if monitoring knows it (the newest version with windows when None)."""
    versions = model_versions(db, model)
    if not versions.known:
        known = sorted(monitored_versions(db))
        raise NotFoundError(f"no monitored model {model!r}; monitored: {known or 'none'}")
    if version is None:
        newest = versions.newest
        assert newest is not None
        return newest
    if version not in versions.known:
        raise NotFoundError(
            f"monitoring has nothing for {model} v{version}; versions: {versions.known}"
        )
    return version


def model_list(db: Database) -> ModelList:
    """Every monitored model with its versions and how many of its alerts are firing."""
    alerts = active_alert_counts(db)
    versions = monitored_versions(db)
    return ModelList(
        [ModelSummary(m, versions.get(m, []), alerts.get(m, 0)) for m in sorted({*versions})]
    )


def _point(r: FeatureDrift) -> DriftPoint:
    return DriftPoint(psi=r.psi, ks=r.ks_statistic, js=r.js, status=r.status)


def drift_view(
    db: Database,
    model: str,
    version: int | None = None,
    *,
    last: int = MAX_WINDOWS,
    default_config: ModelMonitorConfig | None = None,
) -> DriftView:
    """PSI, KS and JS per feature of the ``last`` newest judged windows, oldest first, with the
    model's drift thresholds (``default_config``'s when the model has none stored)."""
    check_window_count(last)
    v = resolve_version(db, model, version)
    config = model_config(db, model, default_config or ModelMonitorConfig())
    sizes = window_sizes(db, model, v)
    windows: dict[int, dict[str, DriftPoint]] = {}
    for start, r in drift_history(db, model, v, last=last):
        windows.setdefault(start, {})[r.feature] = _point(r)
    return DriftView(
        model=model,
        version=v,
        thresholds=config.drift,
        windows=[
            DriftWindow(
                window_start=start,
                window_ms=sizes.get(start, (config.window_ms, 0))[0],
                n=sizes.get(start, (0, 0))[1],
                features=features,
            )
            for start, features in sorted(windows.items())
        ],
    )


def distribution_view(db: Database, model: str, version: int | None = None) -> DistributionView:
    """Reference vs current shares per bin of every profiled feature and the prediction, in
    the latest judged window (what the HTML report draws as bars)."""
    v = resolve_version(db, model, version)
    profile = load_profile(db, model, v)
    start = latest_judged_start(db, model, v)
    state = None if start is None else window_state(db, model, v, start)
    judged = {} if start is None else {r.feature: r for s, r in drift_history(db, model, v, last=1)}
    features = []
    for f in profile.checked():
        counts = None
        if state is not None and len(state.counts.get(f.name, ())) == f.n_bins:
            counts = np.asarray(state.counts[f.name], dtype=np.int64)
        labels, ref, cur = feature_bins(f, counts)
        found = judged.get(f.name)
        features.append(
            FeatureDistribution(
                feature=f.name,
                kind=f.kind,
                bins=labels,
                reference=ref,
                current=cur if cur is not None else [0.0] * len(ref),
                n=0 if counts is None else int(counts.sum()),
                status=None if found is None else found.status,
            )
        )
    return DistributionView(model=model, version=v, window_start=start, features=features)


def performance_view(
    db: Database,
    model: str,
    version: int | None = None,
    *,
    last: int = MAX_WINDOWS,
    default_config: ModelMonitorConfig | None = None,
) -> PerformanceView:
    """Each metric per prediction window (labelled predictions only) of the ``last`` newest
    windows, with the baseline of the reference profile and the configured margin."""
    check_window_count(last)
    v = resolve_version(db, model, version)
    config = model_config(db, model, default_config or ModelMonitorConfig())
    try:
        baseline = load_profile(db, model, v).baseline
    except NotFoundError:
        baseline = {}
    points: dict[str, list[MetricPoint]] = {}
    for start, metric, value, n in performance_history(db, model, v, last=last):
        points.setdefault(metric, []).append(MetricPoint(start, value, n))
    metrics = []
    for name in sorted({*points, *baseline}):
        base = baseline.get(name)
        margin = config.performance.margins.get(name)
        allowed = None if margin is None or base is None else margin.allowed(base)
        higher = METRICS[name][1] if name in METRICS else None
        threshold = None
        if base is not None and allowed is not None and higher is not None:
            threshold = base - allowed if higher else base + allowed
        metrics.append(
            MetricHistory(
                metric=name,
                baseline=base,
                allowed=allowed,
                threshold=threshold,
                higher_is_better=higher,
                windows=points.get(name, []),
            )
        )
    return PerformanceView(model=model, version=v, metrics=metrics)
