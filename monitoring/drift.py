"""Drift statistics between a reference profile and a window of live traffic.

- PSI (population stability index) on ~10 equal-reference-mass bins, with empty bins floored
  at ``eps`` (1e-4) so the logarithm stays finite.
- KS (two-sample Kolmogorov-Smirnov): on raw samples, :func:`ks_2samp` computes the exact
  statistic sup|F1 - F2| and the p-value of scipy's ``method="asymp"`` (the one-sample
  Kolmogorov distribution at n = round(n1 n2 / (n1 + n2))). On histograms (what monitoring
  keeps), :func:`ks_from_counts` evaluates both empirical CDFs at the bin edges only: that is
  exactly the raw statistic restricted to the edges, so it never exceeds the true statistic,
  and the true statistic exceeds it by at most the largest single-bin mass of either side
  (between two edges each CDF rises by its bin's mass). With 100 reference-quantile bins the
  reference side of that bound is ~1%; the bound is returned with every result. Underestimating
  D makes the test conservative: binning can hide drift, never invent it.
- Chi-squared on the 2 x k contingency table of reference and window category counts
  (scipy's ``chi2_contingency(..., correction=False)``), and the Jensen-Shannon distance
  (base 2, in [0, 1]; scipy's ``jensenshannon``).
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .config import DriftThresholds
from .profiles import FeatureProfile

__all__ = [
    "ChiSquaredResult",
    "FeatureDrift",
    "KSResult",
    "Status",
    "chi2_two_sample",
    "judge_feature",
    "js_distance",
    "ks_2samp",
    "ks_from_counts",
    "ks_pvalue",
    "psi",
    "warm_up",
]

Status = Literal["ok", "warn", "alert", "insufficient"]
PSI_EPS = 1e-4


class KSResult(msgspec.Struct, frozen=True):
    statistic: float
    pvalue: float
    error_bound: float = 0.0  # true statistic <= statistic + error_bound (0 on raw samples)


class ChiSquaredResult(msgspec.Struct, frozen=True):
    statistic: float
    pvalue: float
    dof: int


def _proportions(counts: ArrayLike) -> NDArray[np.float64]:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else c


def psi(reference: ArrayLike, current: ArrayLike, *, eps: float = PSI_EPS) -> float:
    """sum((cur - ref) * ln(cur / ref)) over bins, proportions floored at ``eps``."""
    r = np.maximum(_proportions(reference), eps)
    c = np.maximum(_proportions(current), eps)
    if r.shape != c.shape:
        raise ValueError(f"bin counts differ: {r.shape} vs {c.shape}")
    return float(np.sum((c - r) * np.log(c / r)))


def warm_up() -> None:
    """Import scipy's distributions now (about a second, once) rather than in the first
    window judged."""
    ks_pvalue(0.1, 100, 100)
    chi2_two_sample([1, 2], [2, 1])


def ks_pvalue(statistic: float, n1: int, n2: int) -> float:
    """Two-sided p-value of the two-sample KS statistic, as scipy's ``method="asymp"``."""
    from scipy.stats import kstwo  # type: ignore[import-untyped,unused-ignore]

    if n1 <= 0 or n2 <= 0:
        return 1.0
    m, n = sorted((float(n1), float(n2)), reverse=True)
    en = round(m * n / (m + n))
    return float(np.clip(kstwo.sf(statistic, max(en, 1)), 0.0, 1.0))


def ks_2samp(a: ArrayLike, b: ArrayLike) -> KSResult:
    """Exact KS statistic of two raw samples, with the asymptotic p-value."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    if len(x) == 0 or len(y) == 0:
        return KSResult(0.0, 1.0)
    both = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, both, side="right") / len(x)
    cdf_y = np.searchsorted(y, both, side="right") / len(y)
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    return KSResult(d, ks_pvalue(d, len(x), len(y)))


def ks_from_counts(reference: ArrayLike, current: ArrayLike) -> KSResult:
    """KS between two histograms on the same edges (counts per bin, open end bins)."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    nr, nc = r.sum(), c.sum()
    if nr <= 0 or nc <= 0:
        return KSResult(0.0, 1.0)
    pr, pc = r / nr, c / nc
    # CDFs at each edge; the last bin's cumulative sum is 1 on both sides.
    d = float(np.max(np.abs(np.cumsum(pr)[:-1] - np.cumsum(pc)[:-1]))) if len(r) > 1 else 0.0
    bound = float(max(pr.max(), pc.max())) if len(r) > 1 else 1.0
    return KSResult(d, ks_pvalue(d, int(nr), int(nc)), bound)


def chi2_two_sample(reference: ArrayLike, current: ArrayLike) -> ChiSquaredResult:
    """Chi-squared test of homogeneity on the 2 x k table (columns empty on both sides are
    dropped; no continuity correction)."""
    from scipy.special import chdtrc  # type: ignore[import-untyped,unused-ignore]

    table = np.vstack([np.asarray(reference, np.float64), np.asarray(current, np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return ChiSquaredResult(0.0, 1.0, 0)
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    dof = table.shape[1] - 1
    return ChiSquaredResult(stat, float(chdtrc(dof, stat)), dof)


def js_distance(reference: ArrayLike, current: ArrayLike) -> float:
    """Jensen-Shannon distance (square root of the divergence), base 2, in [0, 1]."""
    p, q = _proportions(reference), _proportions(current)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    m = (p + q) / 2

    def kl(a: NDArray[np.float64]) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2) / math.log(2))


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    """One feature (or the prediction) in one window, against its reference."""

    feature: str
    kind: Literal["numeric", "categorical"]
    n: int  # non-missing values in the window
    missing_rate: float
    reference_missing_rate: float
    psi: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    ks_error_bound: float | None = None
    chi2_statistic: float | None = None
    chi2_pvalue: float | None = None
    js: float | None = None
    status: Status = "ok"
    reasons: list[str] = []
    # The criterion that put the feature in ``alert`` (PSI first when several did), with its
    # own threshold: ``"PSI"``, ``"KS D"``, ``"chi2 p"``, ``"JS"`` or ``"missing rate increase"``.
    alert_statistic: str = ""
    alert_value: float | None = None
    alert_threshold: float | None = None

    @property
    def score(self) -> float:
        """The number drift plots and alerts lead with: PSI."""
        return self.psi if self.psi is not None else 0.0


def coarse_counts(profile: FeatureProfile, counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Fine histogram -> PSI bins (numeric); categories stay as they are."""
    if profile.numeric is None or not profile.numeric.psi_cuts:
        return counts
    return np.add.reduceat(counts, [0, *profile.numeric.psi_cuts])


def judge_feature(
    profile: FeatureProfile,
    counts: ArrayLike,
    missing: int,
    thresholds: DriftThresholds,
) -> FeatureDrift:
    """All statistics of one feature's window histogram and the status they imply."""
    cur = np.asarray(counts, dtype=np.int64)
    ref = profile.reference_counts()
    t = thresholds
    n = int(cur.sum())
    total = n + missing
    missing_rate = missing / total if total else 0.0
    reasons: list[str] = []
    fired: list[tuple[str, float, float]] = []  # (statistic, value, threshold), in priority
    last: tuple[str, float, float] | None = None  # the missing rate: only when nothing else

    def result(status: Status, **stats: float | None) -> FeatureDrift:
        lead = fired[0] if fired else last
        by, value, threshold = lead if status == "alert" and lead else ("", None, None)
        return FeatureDrift(
            feature=profile.name,
            kind=profile.kind,
            n=n,
            missing_rate=missing_rate,
            reference_missing_rate=profile.missing_rate,
            status=status,
            reasons=reasons,
            alert_statistic=by,
            alert_value=value,
            alert_threshold=threshold,
            **stats,
        )

    missing_up = missing_rate - profile.missing_rate
    missing_fired = total >= t.min_samples and missing_up >= t.max_missing_rate_increase
    if missing_fired:
        reasons.append(f"missing rate up {missing_up:.2f}")
        last = ("missing rate increase", missing_up, t.max_missing_rate_increase)
    if n < t.min_samples or profile.count == 0:
        return result("alert" if reasons else "insufficient")
    p = psi(coarse_counts(profile, ref), coarse_counts(profile, cur))
    alert = bool(reasons)
    warn = False
    if p >= t.psi_alert:
        alert = True
        reasons.append(f"PSI {p:.3f} >= {t.psi_alert}")
        fired.append(("PSI", p, t.psi_alert))
    elif p >= t.psi_warn:
        warn = True
        reasons.append(f"PSI {p:.3f} >= {t.psi_warn}")
    if profile.kind == "numeric":
        ks = ks_from_counts(ref, cur)
        if ks.pvalue < t.ks_alpha:
            if ks.statistic >= t.ks_min_statistic and n >= t.test_min_samples:
                alert = True
                reasons.append(
                    f"KS D={ks.statistic:.3f} >= {t.ks_min_statistic}, p={ks.pvalue:.2g}"
                    f" < {t.ks_alpha}"
                )
                fired.append(("KS D", ks.statistic, t.ks_min_statistic))
            else:
                warn = True
                reasons.append(f"KS D={ks.statistic:.3f}, p={ks.pvalue:.2g} (below the floor)")
        return result(
            "alert" if alert else "warn" if warn else "ok",
            psi=p,
            ks_statistic=ks.statistic,
            ks_pvalue=ks.pvalue,
            ks_error_bound=ks.error_bound,
        )
    chi = chi2_two_sample(ref, cur)
    js = js_distance(ref, cur)
    if t.categorical_test == "chi2":
        if chi.pvalue < t.chi2_alpha:
            if js >= t.js_warn and n >= t.test_min_samples:
                alert = True
                reasons.append(f"chi2 p={chi.pvalue:.2g} < {t.chi2_alpha}, JS={js:.3f}")
                fired.append(("chi2 p", chi.pvalue, t.chi2_alpha))
            else:
                warn = True
                reasons.append(f"chi2 p={chi.pvalue:.2g}, JS={js:.3f} (below the floor)")
    elif js >= t.js_alert:
        alert = True
        reasons.append(f"JS {js:.3f} >= {t.js_alert}")
        fired.append(("JS", js, t.js_alert))
    elif js >= t.js_warn:
        warn = True
        reasons.append(f"JS {js:.3f} >= {t.js_warn}")
    return result(
        "alert" if alert else "warn" if warn else "ok",
        psi=p,
        chi2_statistic=chi.statistic,
        chi2_pvalue=chi.pvalue,
        js=js,
    )
