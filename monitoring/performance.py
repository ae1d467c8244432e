"""Delayed-label performance: predictions joined to labels by request id, rolling AUC /
log loss / RMSE per version, judged against the registry's evaluation baseline.

Labels arrive hours later on the ``labels`` topic or through :func:`submit_labels`; both land
in ``monitoring_labels`` keyed by request id (a duplicate label is ignored), and the join
happens when a version is evaluated, so labels may even arrive before their prediction is
consumed. A metric is judged only once ``min_labels`` labelled predictions exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from carrara.sql import Database, Transaction
from carrara.types import LabelRecord

from .batch_sql import insert_returning
from .config import PerformanceConfig
from .schema import ensure_schema

__all__ = [
    "METRICS",
    "MetricCheck",
    "PerformanceResult",
    "evaluate_performance",
    "log_loss",
    "rmse",
    "roc_auc",
    "store_labels",
    "submit_labels",
]


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when only
    one class is present."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average rank of each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def log_loss(labels: ArrayLike, probabilities: ArrayLike, *, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rmse(labels: ArrayLike, predictions: ArrayLike) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    return float(np.sqrt(np.mean((y - p) ** 2)))


Metric = Callable[[NDArray[np.float64], NDArray[np.float64]], float]

#: name -> (function(labels, scores), higher is better)
METRICS: dict[str, tuple[Metric, bool]] = {
    "auc": (roc_auc, True),
    "log_loss": (log_loss, False),
    "rmse": (rmse, False),
}


class MetricCheck(msgspec.Struct, frozen=True, kw_only=True):
    metric: str
    value: float
    baseline: float | None
    allowed: float | None  # how much worse than the baseline is tolerated
    degraded: bool


class PerformanceResult(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    version: int
    n: int  # labelled predictions in the rolling window
    judged: bool  # False while fewer than min_labels are labelled
    checks: list[MetricCheck] = []


def store_labels(tx: Transaction, labels: Iterable[LabelRecord]) -> list[LabelRecord]:
    """Insert labels, ignoring request ids already labelled (atomically, with
    ``ON CONFLICT DO NOTHING``); returns the new ones."""
    unique: dict[str, LabelRecord] = {}
    for lb in labels:
        unique.setdefault(lb.request_id, lb)
    records = list(unique.values())
    inserted = insert_returning(
        tx,
        "INSERT INTO monitoring_labels (request_id, model, label, timestamp_ms) {source}"
        " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
        [(lb.request_id, lb.model, float(lb.label), lb.timestamp_ms) for lb in records],
        ("text", "text", "float8", "bigint"),
    )
    return [lb for lb in records if lb.request_id in inserted]


def submit_labels(db: Database, labels: Iterable[LabelRecord]) -> int:
    """The label API: store labels that arrive outside the event log; returns how many were
    new (a label for an already-labelled request id is ignored)."""
    ensure_schema(db)
    with db.transaction() as tx:
        return len(store_labels(tx, labels))


def _metric_names(baseline: dict[str, float], labels: NDArray[np.float64]) -> list[str]:
    # Judge the baseline's metrics monitoring can recompute (others, e.g. "f1", are ignored);
    # with none, still track the usual ones for the report.
    known = [m for m in baseline if m in METRICS]
    if known:
        return known
    binary = bool(np.isin(labels, (0.0, 1.0)).all())
    return ["auc", "log_loss"] if binary else ["rmse"]


def evaluate_performance(
    tx: Transaction,
    model: str,
    version: int,
    baseline: dict[str, float],
    config: PerformanceConfig,
    *,
    window_ms: int,
) -> PerformanceResult:
    """Rolling metrics of one version, judged against ``baseline``; also stores the metric of
    each prediction window (for the report's metric-over-time plot)."""
    rows = tx.fetchall(
        "SELECT p.score, l.label, p.timestamp_ms FROM monitoring_predictions p"
        " JOIN monitoring_labels l ON l.request_id = p.request_id"
        " WHERE p.model = ? AND p.version = ? ORDER BY p.timestamp_ms DESC LIMIT ?",
        (model, version, config.max_rows),
    )
    if not rows:
        return PerformanceResult(model=model, version=version, n=0, judged=False)
    data = np.asarray(rows, dtype=np.float64)
    scores, labels, ts = data[:, 0], data[:, 1], data[:, 2].astype(np.int64)
    recent = ts >= ts.max() - config.rolling_window_ms
    names = _metric_names(baseline, labels)
    n = int(recent.sum())
    judged = n >= config.min_labels
    checks: list[MetricCheck] = []
    for name in names:
        fn, higher_better = METRICS[name]
        value = fn(labels[recent], scores[recent])
        base = baseline.get(name)
        margin = config.margins.get(name)
        allowed = margin.allowed(base) if margin is not None and base is not None else None
        degraded = False
        if judged and allowed is not None and base is not None and value == value:
            worse_by = base - value if higher_better else value - base
            degraded = worse_by > allowed
        checks.append(
            MetricCheck(metric=name, value=value, baseline=base, allowed=allowed, degraded=degraded)
        )
    # Per-window history: windows with enough labels for a meaningful number.
    starts = ts - ts % window_ms
    history: list[tuple[str, int, int, str, float, int]] = []
    min_per_window = max(1, min(config.min_labels, 50))
    for start in np.unique(starts).tolist():
        sel = starts == start
        count = int(sel.sum())
        if count < min_per_window:
            continue
        for name in names:
            value = METRICS[name][0](labels[sel], scores[sel])
            if value == value:
                history.append((model, version, int(start), name, value, count))
    if history:
        tx.executemany(
            "DELETE FROM monitoring_performance WHERE model = ? AND version = ?"
            " AND window_start = ? AND metric = ?",
            [h[:4] for h in history],
        )
        tx.executemany(
            "INSERT INTO monitoring_performance (model, version, window_start, metric, value, n)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            history,
        )
    return PerformanceResult(model=model, version=version, n=n, judged=judged, checks=checks)
