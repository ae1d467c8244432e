"""A log-linear latency histogram (HdrHistogram's bucket layout, in numpy).

Values are integer nanoseconds. Below ``2 ** (SUB_BITS + 1)`` every value has its own bucket;
above, each power of two is split into ``2 ** SUB_BITS`` equal buckets, so any recorded value
is known to within ``2 ** -SUB_BITS`` (0.1 %) of itself — three significant digits, like
HdrHistogram's default — at a fixed 40 KiB for the whole range up to ~18 minutes. Written here
rather than depending on ``hdrhistogram`` because recording must be vectorised (the generator
records batches of samples) and the merge across worker processes must be a plain array add.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["HistogramData", "LatencyHistogram", "LatencySummary"]

SUB_BITS = 10
_SUB = 1 << SUB_BITS  # buckets per power of two above the linear range
_LINEAR = _SUB << 1  # values below this are recorded exactly
MAX_SHIFT = 30  # values up to 2 ** 41 ns (~36 min); larger ones are clamped
N_BUCKETS = _LINEAR + MAX_SHIFT * _SUB
MAX_VALUE = (1 << (SUB_BITS + 1 + MAX_SHIFT)) - 1


class LatencySummary(msgspec.Struct, frozen=True, kw_only=True):
    """Percentiles of one histogram, in milliseconds (what reports and SLOs speak)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class HistogramData(msgspec.Struct, frozen=True, kw_only=True):
    """A histogram in a JSON-friendly sparse form: ``buckets[i]`` holds ``counts[i]`` values."""

    sub_bits: int
    buckets: list[int]
    counts: list[int]
    min_ns: int
    max_ns: int
    sum_ns: int


def bucket_index(values_ns: NDArray[np.int64]) -> NDArray[np.int64]:
    """Bucket of each value (vectorised; values are clamped to ``[0, MAX_VALUE]``)."""
    v = np.clip(values_ns.astype(np.int64, copy=False), 0, MAX_VALUE)
    # bit_length via frexp: v = m * 2**e with m in [0.5, 1) => e == v.bit_length() (exact here:
    # values fit in 53 bits).
    bits = np.frexp(v.astype(np.float64))[1].astype(np.int64)
    shift = np.maximum(bits - (SUB_BITS + 1), 0)
    linear = v < _LINEAR
    idx = np.where(linear, v, _LINEAR + (shift - 1) * _SUB + ((v >> shift) - _SUB))
    return idx.astype(np.int64)


def bucket_bounds(idx: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(lowest, highest) value of each bucket."""
    idx = np.asarray(idx, dtype=np.int64)
    linear = idx < _LINEAR
    over = np.maximum(idx - _LINEAR, 0)
    shift = over // _SUB + 1
    low = np.where(linear, idx, ((over % _SUB) + _SUB) << shift)
    high = np.where(linear, idx, low + (np.int64(1) << shift) - 1)
    return low, high


class LatencyHistogram:
    """Counts of latencies in log-linear buckets; mergeable, exact min/max/sum."""

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.total = 0
        self.min_ns = 0
        self.max_ns = 0
        self.sum_ns = 0

    def record(self, values_ns: ArrayLike) -> None:
        """Add a batch of latencies (nanoseconds; negative values count as 0)."""
        v = np.asarray(values_ns, dtype=np.int64).ravel()
        if v.size == 0:
            return
        v = np.maximum(v, 0)
        np.add.at(self.counts, bucket_index(v), 1)
        lo, hi = int(v.min()), int(v.max())
        self.min_ns = lo if self.total == 0 else min(self.min_ns, lo)
        self.max_ns = max(self.max_ns, hi)
        self.total += int(v.size)
        self.sum_ns += int(v.sum())

    def merge(self, other: LatencyHistogram) -> None:
        if other.total == 0:
            return
        self.counts += other.counts
        self.min_ns = other.min_ns if self.total == 0 else min(self.min_ns, other.min_ns)
        self.max_ns = max(self.max_ns, other.max_ns)
        self.total += other.total
        self.sum_ns += other.sum_ns

    def percentiles(self, quantiles: Sequence[float]) -> list[int]:
        """Value at each quantile in [0, 1], HdrHistogram style: the highest value equivalent
        to the bucket holding the ``ceil(q * n)``-th smallest sample, capped at the true max."""
        if self.total == 0:
            return [0 for _ in quantiles]
        cum = np.cumsum(self.counts)
        out = []
        for q in quantiles:
            rank = max(1, int(np.ceil(min(max(q, 0.0), 1.0) * self.total)))
            idx = int(np.searchsorted(cum, rank, side="left"))
            _, high = bucket_bounds(np.array([idx]))
            out.append(min(max(int(high[0]), self.min_ns), self.max_ns))
        return out

    def summary(self) -> LatencySummary:
        p50, p90, p99, p999 = self.percentiles([0.5, 0.9, 0.99, 0.999])
        mean = self.sum_ns / self.total if self.total else 0.0
        return LatencySummary(
            count=self.total,
            mean_ms=mean / 1e6,
            p50_ms=p50 / 1e6,
            p90_ms=p90 / 1e6,
            p99_ms=p99 / 1e6,
            p999_ms=p999 / 1e6,
            max_ms=self.max_ns / 1e6,
        )

    def spectrum(self) -> list[tuple[float, float]]:
        """(quantile, latency ms) points of the percentile spectrum, for plots."""
        if self.total == 0:
            return []
        qs: list[float] = []
        for nines in np.arange(0.0, 5.01, 0.05):  # 0 .. 99.999 %
            q = 1.0 - 10.0 ** (-float(nines))
            if q * self.total > self.total - 0.5:
                break
            qs.append(q)
        qs.append(1.0)
        return [(q, v / 1e6) for q, v in zip(qs, self.percentiles(qs), strict=True)]

    def to_data(self) -> HistogramData:
        nz = np.flatnonzero(self.counts)
        return HistogramData(
            sub_bits=SUB_BITS,
            buckets=nz.tolist(),
            counts=self.counts[nz].tolist(),
            min_ns=self.min_ns,
            max_ns=self.max_ns,
            sum_ns=self.sum_ns,
        )

    @classmethod
    def from_data(cls, data: HistogramData) -> LatencyHistogram:
        if data.sub_bits != SUB_BITS:
            raise ValueError(f"histogram has sub_bits={data.sub_bits}; this build uses {SUB_BITS}")
        h = cls()
        h.counts[np.asarray(data.buckets, dtype=np.int64)] = np.asarray(data.counts, np.int64)
        h.total = int(h.counts.sum())
        h.min_ns, h.max_ns, h.sum_ns = data.min_ns, data.max_ns, data.sum_ns
        return h

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        h = cls()
        for p in parts:
            h.merge(p)
        return h
