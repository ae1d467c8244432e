"""Drift statistics against scipy on the same samples, PSI against the hand formula, and the
binned-KS error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from carrara.errors import ConfigError
from carrara.monitoring.config import DriftThresholds
from carrara.monitoring.drift import (
    chi2_two_sample,
    js_distance,
    judge_feature,
    ks_2samp,
    ks_from_counts,
    psi,
)
from carrara.monitoring.profiles import profile_feature


def psi_by_hand(ref: list[int], cur: list[int], eps: float = 1e-4) -> float:
    total_r, total_c = sum(ref), sum(cur)
    out = 0.0
    for r, c in zip(ref, cur, strict=True):
        pr = max(r / total_r, eps)
        pc = max(c / total_c, eps)
        out += (pc - pr) * math.log(pc / pr)
    return out


@pytest.mark.parametrize(
    ("ref", "cur"),
    [
        ([100, 200, 300, 400], [100, 200, 300, 400]),
        ([100, 200, 300, 400], [400, 300, 200, 100]),
        ([50, 0, 25, 25], [10, 30, 0, 60]),
        ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [3, 1, 0, 0, 2, 1, 1, 1, 1, 7]),
    ],
)
def test_psi_matches_the_hand_formula(ref: list[int], cur: list[int]) -> None:
    assert psi(ref, cur) == pytest.approx(psi_by_hand(ref, cur), rel=1e-12, abs=1e-15)


def test_psi_of_identical_distributions_is_zero_and_grows_with_shift() -> None:
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0, abs=1e-12)
    assert psi([25, 25, 25, 25], [20, 25, 25, 30]) < psi([25, 25, 25, 25], [5, 20, 30, 45])


@pytest.mark.parametrize("seed", range(6))
def test_ks_2samp_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n1, n2 = int(rng.integers(50, 3000)), int(rng.integers(50, 3000))
    shift = [0.0, 0.05, 0.2, 0.5, 0.0, 1.0][seed]
    a = rng.normal(0, 1, n1)
    b = rng.normal(shift, 1.3 if seed == 4 else 1.0, n2)
    if seed == 5:  # ties: rounded values
        a, b = np.round(a, 1), np.round(b, 1)
    ours = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert ours.statistic == pytest.approx(ref.statistic, abs=1e-12)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    # The statistic does not depend on the p-value method.
    assert ours.statistic == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize(("seed", "shift"), [(1, 0.0), (2, 0.1), (3, 0.3), (4, 1.0)])
def test_ks_from_histogram_is_the_raw_statistic_at_the_edges_within_the_bound(
    seed: int, shift: float
) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.gamma(2.0, 2.0, 20_000)
    current = rng.gamma(2.0, 2.0, 3_000) + shift
    prof = profile_feature("x", reference, n_bins=100)
    assert prof.numeric is not None
    edges = np.asarray(prof.numeric.edges)
    counts = np.bincount(np.searchsorted(edges, current, side="left"), minlength=len(edges) + 1)
    binned = ks_from_counts(prof.numeric.counts, counts)
    # Exactly the raw ECDF difference restricted to the bin edges ...
    f_ref = np.searchsorted(np.sort(reference), edges, side="right") / len(reference)
    f_cur = np.searchsorted(np.sort(current), edges, side="right") / len(current)
    assert binned.statistic == pytest.approx(np.max(np.abs(f_ref - f_cur)), abs=1e-12)
    # ... never above scipy's statistic on the raw samples, and below it by at most the bound.
    exact = stats.ks_2samp(reference, current).statistic
    assert binned.statistic <= exact + 1e-12
    assert exact - binned.statistic <= binned.error_bound + 1e-12
    assert binned.error_bound < 0.05  # ~1% reference bins; current bins stay thin here


def test_chi2_two_sample_matches_scipy_contingency() -> None:
    ref = [500, 300, 150, 50, 0]
    cur = [80, 70, 30, 15, 5]
    ours = chi2_two_sample(ref, cur)
    stat, p, dof, _ = stats.chi2_contingency(np.array([ref, cur])[:, :5], correction=False)
    assert ours.statistic == pytest.approx(stat, rel=1e-10)
    assert ours.pvalue == pytest.approx(p, rel=1e-8)
    assert ours.dof == dof
    # A category empty on both sides is dropped, as scipy cannot take it.
    dropped = chi2_two_sample([*ref, 0], [*cur, 0])
    assert dropped.statistic == pytest.approx(stat, rel=1e-10)


def test_chi2_two_sample_matches_scipy_chisquare_shape_on_random_tables() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        k = int(rng.integers(2, 12))
        ref = rng.integers(1, 500, k)
        cur = rng.integers(1, 500, k)
        stat, p, _, _ = stats.chi2_contingency(np.array([ref, cur]), correction=False)
        ours = chi2_two_sample(ref, cur)
        assert ours.statistic == pytest.approx(stat, rel=1e-10)
        assert ours.pvalue == pytest.approx(p, rel=1e-8, abs=1e-300)


@pytest.mark.parametrize(
    ("p", "q"),
    [
        ([1, 2, 3], [1, 2, 3]),
        ([10, 0, 5, 5], [0, 10, 5, 5]),
        ([1, 0], [0, 1]),
        ([5, 3, 2], [1, 1, 8]),
    ],
)
def test_js_distance_matches_scipy(p: list[int], q: list[int]) -> None:
    assert js_distance(p, q) == pytest.approx(
        jensenshannon(np.array(p, float), np.array(q, float), base=2), abs=1e-12
    )


def _window(prof_values: np.ndarray, current: np.ndarray, **kw: object) -> str:
    prof = profile_feature("x", prof_values)
    assert prof.numeric is not None
    counts = np.bincount(
        np.searchsorted(prof.numeric.edges, current, side="left"), minlength=prof.n_bins
    )
    return judge_feature(prof, counts, 0, DriftThresholds(**kw)).status  # type: ignore[arg-type]


def test_judge_numeric_status() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 1, 20_000)
    assert _window(ref, rng.normal(0, 1, 2_000)) == "ok"
    assert _window(ref, rng.normal(0.6, 1, 2_000)) == "alert"
    assert _window(ref, rng.normal(0.6, 1, 100)) == "insufficient"  # below min_samples
    assert _window(ref, rng.normal(0.6, 1, 100), min_samples=50) == "alert"
    # Significant but tiny at large n: a warning, not an alert (the effect-size floor).
    assert _window(ref, rng.normal(0.08, 1, 20_000)) == "warn"


def test_judge_categorical_status_and_missing_rate() -> None:
    rng = np.random.default_rng(4)
    prof = profile_feature("c", rng.choice(4, 10_000, p=[0.4, 0.3, 0.2, 0.1]), categorical=True)
    assert prof.categorical is not None
    order = [int(c) for c in prof.categorical.categories]

    def counts(p: list[float], n: int = 2000) -> list[int]:
        draws = rng.choice(4, n, p=p)
        return [int((draws == c).sum()) for c in order] + [0]

    t = DriftThresholds()
    assert judge_feature(prof, counts([0.4, 0.3, 0.2, 0.1]), 0, t).status == "ok"
    shifted = judge_feature(prof, counts([0.1, 0.2, 0.3, 0.4]), 0, t)
    assert shifted.status == "alert" and shifted.chi2_pvalue is not None
    js_only = DriftThresholds(categorical_test="js")
    assert judge_feature(prof, counts([0.1, 0.2, 0.3, 0.4]), 0, js_only).status == "alert"
    missing = judge_feature(prof, counts([0.4, 0.3, 0.2, 0.1], 1000), 1000, t)
    assert missing.status == "alert" and "missing rate" in missing.reasons[0]


def test_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="psi_warn"):
        DriftThresholds(psi_warn=0.3, psi_alert=0.2)
    with pytest.raises(ConfigError, match="ks_alpha"):
        DriftThresholds(ks_alpha=1.5)


def test_a_ks_fired_alert_shows_ks_beside_its_own_threshold() -> None:
    from carrara.monitoring.config import ModelMonitorConfig
    from carrara.monitoring.consumer import _drift_conditions

    rng = np.random.default_rng(5)
    prof = profile_feature("x", rng.normal(0, 1, 20_000))
    assert prof.numeric is not None
    current = rng.normal(0.6, 1, 2_000)
    counts = np.bincount(
        np.searchsorted(prof.numeric.edges, current, side="left"), minlength=prof.n_bins
    )
    t = DriftThresholds(psi_warn=4.0, psi_alert=5.0)  # PSI cannot fire: only KS does
    r = judge_feature(prof, counts, 0, t)
    assert r.status == "alert" and r.psi is not None and r.psi < t.psi_warn
    assert (r.alert_statistic, r.alert_value, r.alert_threshold) == (
        "KS D",
        r.ks_statistic,
        t.ks_min_statistic,
    )
    [c] = _drift_conditions("m", 1, 0, [r], ModelMonitorConfig(drift=t))
    assert (c.statistic, c.value, c.threshold, c.samples) == ("KS D", r.ks_statistic, 0.1, 2_000)
    assert "PSI" not in c.message and f">= {t.ks_min_statistic}" in c.message
    # When PSI fires, PSI leads, against the PSI threshold.
    psi_fired = judge_feature(prof, counts, 0, DriftThresholds())
    [c] = _drift_conditions("m", 1, 0, [psi_fired], ModelMonitorConfig())
    assert (c.statistic, c.value, c.threshold) == ("PSI", psi_fired.psi, 0.2)
