"""Synthetic traffic for tests, the benchmark and demos: a reference frame, a logistic model
over it, prediction records with optional shifts, and labels (optionally from a changed
world, so the model's quality falls)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from carrara.eventlog import EventLog
from carrara.sql import Database
from carrara.types import LabelRecord, PredictionRecord, Topic, encode

from .config import ModelMonitorConfig
from .performance import roc_auc
from .profiles import build_profile, store_profile
from .store import configure_model

__all__ = ["SyntheticModel", "phased_records", "publish", "register_synthetic"]


class SyntheticModel:
    """``n_numeric`` normal features ``x0..`` (different means/scales), one categorical
    ``segment`` (codes 0-4), and a logistic model p = sigmoid(w . x)."""

    def __init__(self, *, n_numeric: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.numeric = [f"x{i}" for i in range(n_numeric)]
        self.means = rng.uniform(-5, 5, n_numeric)
        self.scales = rng.uniform(0.5, 3, n_numeric)
        self.weights = rng.normal(0, 1, n_numeric) / self.scales
        self.segment_p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
        self.segment_w = np.array([0.0, 0.5, -0.5, 1.0, -1.0])

    @property
    def names(self) -> list[str]:
        return [*self.numeric, "segment"]

    def sample(
        self,
        n: int,
        rng: np.random.Generator,
        *,
        shift: Mapping[str, float] | None = None,
        segment_p: NDArray[np.float64] | None = None,
    ) -> dict[str, NDArray[np.float64]]:
        """``n`` rows; ``shift`` moves a numeric feature's mean by that many of its stds."""
        shift = shift or {}
        cols = {
            name: rng.normal(
                self.means[i] + shift.get(name, 0.0) * self.scales[i], self.scales[i], n
            )
            for i, name in enumerate(self.numeric)
        }
        p = self.segment_p if segment_p is None else segment_p
        cols["segment"] = rng.choice(len(p), size=n, p=p).astype(np.float64)
        return cols

    def predict(self, cols: Mapping[str, NDArray[np.float64]]) -> NDArray[np.float64]:
        z = sum((cols[n] - self.means[i]) * self.weights[i] for i, n in enumerate(self.numeric))
        z = z + self.segment_w[cols["segment"].astype(np.intp)]
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)

    def labels(
        self, p: NDArray[np.float64], rng: np.random.Generator, *, flip: float = 0.0
    ) -> NDArray[np.float64]:
        """Outcomes drawn from ``p``; a ``flip`` share of them inverted (a changed world)."""
        y = (rng.random(len(p)) < p).astype(np.float64)
        flipped = rng.random(len(p)) < flip
        return np.where(flipped, 1.0 - y, y)

    def records(
        self,
        model: str,
        version: int,
        cols: Mapping[str, NDArray[np.float64]],
        *,
        start_ms: int,
        interval_ms: int,
        prefix: str,
    ) -> list[PredictionRecord]:
        p = self.predict(cols)
        names = self.names
        matrix = np.column_stack([cols[n] for n in names]).tolist()
        return [
            PredictionRecord(
                request_id=f"{prefix}-{i}",
                model=model,
                version=version,
                variant="main",
                entity_id=str(i),
                features=dict(zip(names, row, strict=True)),
                prediction=[float(p[i])],
                latency_us=100,
                timestamp_ms=start_ms + i * interval_ms,
            )
            for i, row in enumerate(matrix)
        ]

    @staticmethod
    def label_records(
        records: list[PredictionRecord], labels: NDArray[np.float64], *, timestamp_ms: int
    ) -> list[LabelRecord]:
        return [
            LabelRecord(
                request_id=r.request_id, model=r.model, label=float(y), timestamp_ms=timestamp_ms
            )
            for r, y in zip(records, labels.tolist(), strict=True)
        ]


def register_synthetic(
    db: Database,
    sm: SyntheticModel,
    *,
    model: str,
    version: int = 1,
    config: ModelMonitorConfig | None = None,
    rows: int = 20_000,
    seed: int = 100,
) -> float:
    """Profile reference data as the registration hook would (baseline AUC measured on it);
    returns that baseline."""
    rng = np.random.default_rng(seed)
    ref = sm.sample(rows, rng)
    p = sm.predict(ref)
    auc = roc_auc(sm.labels(p, rng), p)
    profile = build_profile(
        ref, p, model=model, version=version, categorical=["segment"], baseline={"auc": auc}
    )
    store_profile(db, profile)
    if config is not None:
        configure_model(db, model, config)
    return auc


def publish(log: EventLog, records: Sequence[PredictionRecord] | Sequence[LabelRecord]) -> None:
    """Append records to their topic, as the gateway (predictions) or a labeller would."""
    topic = Topic.LABELS if records and isinstance(records[0], LabelRecord) else Topic.PREDICTIONS
    for i in range(0, len(records), 2_000):
        log.append_many(topic, [encode(r) for r in records[i : i + 2_000]])


def phased_records(
    sm: SyntheticModel,
    phases: Sequence[tuple[int, Mapping[str, float]]],
    *,
    model: str,
    window_ms: int,
    per_window: int,
    seed: int = 7,
    prefix: str = "r",
    version: int = 1,
) -> list[PredictionRecord]:
    """Consecutive phases of ``windows`` windows each (``per_window`` evenly spaced records
    per window), each phase with its own feature shift."""
    rng = np.random.default_rng(seed)
    out: list[PredictionRecord] = []
    start = 0
    for k, (windows, shift) in enumerate(phases):
        cols = sm.sample(windows * per_window, rng, shift=shift)
        out += sm.records(
            model,
            version,
            cols,
            start_ms=start,
            interval_ms=window_ms // per_window,
            prefix=f"{prefix}{k}",
        )
        start += windows * window_ms
    return out
