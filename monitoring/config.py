"""Monitoring configuration per model: windows, drift thresholds, degradation margins.

Plain msgspec structs, stored per model (``configure_model``) so the consumer and the report
read the same values; a model without a stored config uses the consumer's default.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from carrara.errors import ConfigError

__all__ = ["DriftThresholds", "Margin", "ModelMonitorConfig", "PerformanceConfig"]


class DriftThresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a feature (or the prediction) counts as drifted in one window.

    A feature is in ``alert`` when PSI >= ``psi_alert``, or when its test is significant
    (p < alpha) on at least ``test_min_samples`` values *and* the effect is large enough (KS
    statistic >= ``ks_min_statistic``; categorical: JS distance >= ``js_warn``). ``warn`` when
    PSI >= ``psi_warn`` or a test is significant without the rest. Why both guards: one
    alpha=0.05 test per feature and window raises a false alarm every twenty checks on stable
    traffic; over thousands of rows a test flags shifts far too small to matter; and on a few
    hundred rows a KS statistic of 0.1 still happens by chance about once in a thousand
    windows (at 1,000 rows, about once in half a billion).
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    ks_alpha: float = 0.05
    ks_min_statistic: float = 0.1
    chi2_alpha: float = 0.05
    js_warn: float = 0.1
    js_alert: float = 0.2
    categorical_test: Literal["chi2", "js"] = "chi2"
    min_samples: int = 200  # below this many non-missing values a window is not judged
    test_min_samples: int = 1_000  # below this, a significant KS/chi2 test only warns
    max_missing_rate_increase: float = 0.2  # alert when the missing rate rises this much

    def __post_init__(self) -> None:
        if not 0 < self.psi_warn <= self.psi_alert:
            raise ConfigError(
                f"need 0 < psi_warn <= psi_alert, got {self.psi_warn} and {self.psi_alert}"
            )
        if not 0 < self.js_warn <= self.js_alert <= 1:
            raise ConfigError(
                f"need 0 < js_warn <= js_alert <= 1, got {self.js_warn} and {self.js_alert}"
            )
        for name in ("ks_alpha", "chi2_alpha"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {value}")
        if self.min_samples < 1 or self.test_min_samples < 1:
            raise ConfigError(
                f"min_samples and test_min_samples must be >= 1, got {self.min_samples}"
                f" and {self.test_min_samples}"
            )


class Margin(msgspec.Struct, frozen=True, kw_only=True):
    """How much worse than the baseline a metric may get: ``value`` absolute, or a fraction of
    the baseline when ``relative``."""

    value: float
    relative: bool = False

    def allowed(self, baseline: float) -> float:
        return self.value * abs(baseline) if self.relative else self.value


def _default_margins() -> dict[str, Margin]:
    return {
        "auc": Margin(value=0.05),
        "log_loss": Margin(value=0.1),
        "rmse": Margin(value=0.1, relative=True),
    }


class PerformanceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rolling quality against the registry's evaluation baseline."""

    margins: dict[str, Margin] = msgspec.field(default_factory=_default_margins)
    min_labels: int = 200  # labelled predictions needed before a metric is judged
    rolling_window_ms: int = 24 * 3_600_000  # prediction time covered by the rolling metric
    max_rows: int = 50_000  # newest labelled predictions used at most

    def __post_init__(self) -> None:
        if self.min_labels < 1:
            raise ConfigError(f"min_labels must be >= 1, got {self.min_labels}")
        if self.rolling_window_ms <= 0:
            raise ConfigError(f"rolling_window_ms must be > 0, got {self.rolling_window_ms}")


class ModelMonitorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything monitoring needs to know about one model (all its versions)."""

    window_ms: int = 3_600_000  # tumbling window length, by prediction timestamp
    allowed_lateness_ms: int = 60_000  # a window is judged once events this much newer arrive
    clear_after_windows: int = 1  # clear windows in a row before a drift alert resolves
    drift: DriftThresholds = msgspec.field(default_factory=DriftThresholds)
    performance: PerformanceConfig = msgspec.field(default_factory=PerformanceConfig)

    def __post_init__(self) -> None:
        if self.window_ms <= 0:
            raise ConfigError(f"window_ms must be > 0, got {self.window_ms}")
        if self.clear_after_windows < 1:
            raise ConfigError(f"clear_after_windows must be >= 1, got {self.clear_after_windows}")
        if self.allowed_lateness_ms < 0:
            raise ConfigError(f"allowed_lateness_ms must be >= 0, got {self.allowed_lateness_ms}")
