"""The log-linear histogram against exact numpy percentiles."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from carrara.loadgen.histogram import (
    HistogramData,
    LatencyHistogram,
    bucket_bounds,
    bucket_index,
)


def test_every_value_lies_in_its_bucket_within_a_thousandth() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [np.arange(0, 5000), rng.integers(0, 2**40, 100_000), [2047, 2048, 4095, 4096]]
    ).astype(np.int64)
    low, high = bucket_bounds(bucket_index(values))
    assert np.all(low <= values) and np.all(values <= high)
    assert np.all(high - low <= np.maximum(low, 1) / 1024 + 1)


@pytest.mark.parametrize("scale_ns", [50_000.0, 2_000_000.0, 300_000_000.0])
def test_percentiles_match_numpy(scale_ns: float) -> None:
    x = np.random.default_rng(1).lognormal(0.0, 1.0, 50_000) * scale_ns
    h = LatencyHistogram()
    h.record(x.astype(np.int64))
    qs = [0.5, 0.9, 0.99, 0.999]
    for got, want in zip(h.percentiles(qs), np.percentile(x, [q * 100 for q in qs]), strict=True):
        assert got == pytest.approx(want, rel=2e-3)
    assert h.percentiles([1.0])[0] == int(x.max())
    s = h.summary()
    assert s.count == x.size and s.max_ms == pytest.approx(x.max() / 1e6, rel=1e-6)
    assert s.mean_ms == pytest.approx(x.astype(np.int64).mean() / 1e6, rel=1e-9)


def test_merge_and_round_trip() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.integers(1, 10**7, 1000), rng.integers(10**6, 10**9, 1000)
    ha, hb, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    ha.record(a)
    hb.record(b)
    both.record(np.concatenate([a, b]))
    merged = LatencyHistogram.merged([ha, hb])
    assert np.array_equal(merged.counts, both.counts)
    assert (merged.min_ns, merged.max_ns, merged.sum_ns) == (both.min_ns, both.max_ns, both.sum_ns)
    data = msgspec.json.decode(msgspec.json.encode(merged.to_data()), type=HistogramData)
    back = LatencyHistogram.from_data(data)
    assert back.summary() == merged.summary()


def test_empty_histogram() -> None:
    h = LatencyHistogram()
    assert h.summary().count == 0 and h.percentiles([0.99]) == [0]
    assert h.spectrum() == []
