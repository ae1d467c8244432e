"""Tumbling windows of live traffic per model version, kept as histograms on the reference
profile's bins (so a window is a few hundred integers per feature, and windows merge by
addition: the consumer adds each batch's counts to the stored window in one transaction).

A record belongs to the window ``[start, start + window_ms)`` holding its prediction
timestamp (event time, not arrival time), so a redelivered or late record still lands in the
window it was made in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.sql import Transaction
from carrara.types import PredictionRecord

from .profiles import FeatureProfile, ReferenceProfile, category_key, prediction_value

__all__ = ["Binner", "WindowState", "load_windows", "merge_windows", "window_start"]


class WindowState(msgspec.Struct, kw_only=True):
    """Counts of one window: per feature the histogram on the reference bins and the number
    of missing values; ``n`` records in all, ``degraded`` of them served degraded."""

    n: int = 0
    degraded: int = 0
    counts: dict[str, list[int]] = {}
    missing: dict[str, int] = {}

    def add(self, other: WindowState) -> None:
        self.n += other.n
        self.degraded += other.degraded
        for name, counts in other.counts.items():
            mine = self.counts.get(name)
            if mine is None or len(mine) != len(counts):
                self.counts[name] = list(counts)
            else:
                self.counts[name] = (np.asarray(mine) + np.asarray(counts)).tolist()
        for name, m in other.missing.items():
            self.missing[name] = self.missing.get(name, 0) + m


def window_start(timestamp_ms: int, window_ms: int) -> int:
    return timestamp_ms - timestamp_ms % window_ms


class _Column:
    __slots__ = ("by_value", "categories", "edges", "n_bins", "name")

    def __init__(self, feature: FeatureProfile) -> None:
        self.name = feature.name
        self.n_bins = feature.n_bins
        self.edges: NDArray[np.float64] | None = None
        self.categories: dict[str, int] | None = None
        if feature.numeric is not None:
            self.edges = np.asarray(feature.numeric.edges, dtype=np.float64)
        else:
            assert feature.categorical is not None
            self.categories = {c: i for i, c in enumerate(feature.categorical.categories)}
            # Logged values are floats: look numeric categories up by value directly.
            self.by_value: dict[float, int] = {}
            for c, i in self.categories.items():
                with contextlib.suppress(ValueError):  # not a number: matched by its key
                    self.by_value.setdefault(float(c), i)

    def histogram(self, values: NDArray[np.float64]) -> list[int]:
        if self.edges is not None:
            idx = np.searchsorted(self.edges, values, side="left")
        else:
            assert self.categories is not None
            other = self.n_bins - 1
            cats, by_value = self.categories, self.by_value
            idx = np.fromiter(
                (
                    by_value[v] if v in by_value else cats.get(category_key(v), other)
                    for v in values.tolist()
                ),
                dtype=np.intp,
                count=len(values),
            )
        counts: list[int] = np.bincount(idx, minlength=self.n_bins).tolist()
        return counts


class Binner:
    """Turns a batch of one version's prediction records into per-window count deltas."""

    def __init__(self, profile: ReferenceProfile, window_ms: int) -> None:
        self.profile = profile
        self.window_ms = window_ms
        self.names = [f.name for f in profile.features]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._columns = [_Column(f) for f in profile.features]
        self._prediction = _Column(profile.prediction) if profile.prediction else None

    def bin(self, records: Sequence[PredictionRecord]) -> dict[int, WindowState]:
        if not records:
            return {}
        nan = float("nan")
        names = self.names
        x = np.array(
            [[r.features.get(n, nan) for n in names] for r in records], dtype=np.float64
        ).reshape(len(records), len(names))
        index = self._index
        for i, r in enumerate(records):
            for m in r.missing:  # columns that took their default: missing, not a value
                j = index.get(m)
                if j is not None:
                    x[i, j] = nan
        pred = np.array([prediction_value(r.prediction) for r in records], dtype=np.float64)
        ts = np.array([r.timestamp_ms for r in records], dtype=np.int64)
        degraded = np.array([r.degraded for r in records], dtype=bool)
        starts = ts - ts % self.window_ms
        out: dict[int, WindowState] = {}
        for start in np.unique(starts).tolist():
            rows = starts == start
            state = WindowState(n=int(rows.sum()), degraded=int(degraded[rows].sum()))
            columns: list[tuple[_Column, NDArray[np.float64]]] = [
                (col, x[rows, j]) for j, col in enumerate(self._columns)
            ]
            if self._prediction is not None:
                columns.append((self._prediction, pred[rows]))
            for col, values in columns:
                absent = np.isnan(values)
                state.counts[col.name] = col.histogram(values[~absent])
                state.missing[col.name] = int(absent.sum())
            out[int(start)] = state
        return out


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WindowState)


def merge_windows(
    tx: Transaction, model: str, version: int, window_ms: int, deltas: dict[int, WindowState]
) -> None:
    """Add ``deltas`` to the stored windows (creating them) and mark them for judging."""
    for start, delta in sorted(deltas.items()):
        row = tx.fetchone(
            "SELECT state FROM monitoring_windows WHERE model = ? AND version = ?"
            " AND window_start = ?" + (" FOR UPDATE" if tx.dialect == "postgresql" else ""),
            (model, version, start),
        )
        if row is None:
            tx.execute(
                "INSERT INTO monitoring_windows (model, version, window_start, window_ms, n,"
                " state, dirty) VALUES (?, ?, ?, ?, ?, ?, 1)",
                (model, version, start, window_ms, delta.n, _encoder.encode(delta)),
            )
            continue
        state = _decoder.decode(bytes(row[0]))
        state.add(delta)
        tx.execute(
            "UPDATE monitoring_windows SET state = ?, n = ?, dirty = 1"
            " WHERE model = ? AND version = ? AND window_start = ?",
            (_encoder.encode(state), state.n, model, version, start),
        )


def load_windows(
    tx: Transaction, model: str, version: int, *, dirty_only: bool = False
) -> list[tuple[int, int, WindowState]]:
    """(start, window_ms, state) of the stored windows of a version, oldest first."""
    rows = tx.fetchall(
        "SELECT window_start, window_ms, state FROM monitoring_windows"
        " WHERE model = ? AND version = ?"
        + (" AND dirty = 1" if dirty_only else "")
        + " ORDER BY window_start",
        (model, version),
    )
    return [(int(s), int(w), _decoder.decode(bytes(b))) for s, w, b in rows]
