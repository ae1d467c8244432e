"""Arrival schedules and entity distributions against their definitions (scipy as reference)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from carrara.loadgen.distributions import EntitySampler, EntitySpec, arrival_offsets


def test_constant_arrivals_are_evenly_spaced_and_phase_shifted() -> None:
    rng = np.random.default_rng(0)
    t = arrival_offsets(1000, 1.0, "constant", rng)
    assert len(t) == 1000 and np.all(np.diff(t) == pytest.approx(1e6, abs=1))
    half = arrival_offsets(500, 1.0, "constant", rng, phase=0.5)
    assert half[0] == pytest.approx(1e6, abs=1)


def test_poisson_arrivals_have_exponential_gaps() -> None:
    t = arrival_offsets(2000, 5.0, "poisson", np.random.default_rng(1))
    assert abs(len(t) - 10_000) < 5 * np.sqrt(10_000)
    gaps = np.diff(t) / 1e9
    assert stats.kstest(gaps, "expon", args=(0, 1 / 2000)).pvalue > 1e-3


def test_zipf_entities_follow_the_power_law() -> None:
    spec = EntitySpec(distribution="zipf", count=50, zipf_s=1.2)
    ranks = EntitySampler(spec, seed=3).ranks(200_000)
    observed = np.bincount(ranks, minlength=50)
    w = 1 / np.arange(1, 51) ** 1.2
    assert stats.chisquare(observed, w / w.sum() * observed.sum()).pvalue > 1e-3


def test_uniform_ids() -> None:
    sampler = EntitySampler(EntitySpec(count=10, prefix="u", offset=5), seed=0)
    ids = sampler.ids(1000)
    assert set(ids) == {f"u{k}" for k in range(5, 15)}
