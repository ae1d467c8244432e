"""Quality metrics against brute-force / hand formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from carrara.monitoring.config import PerformanceConfig
from carrara.monitoring.performance import (
    evaluate_performance,
    log_loss,
    rmse,
    roc_auc,
    store_labels,
)
from carrara.monitoring.schema import ensure_schema
from carrara.sql import Database
from carrara.types import LabelRecord


def auc_brute_force(y: list[float], s: list[float]) -> float:
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300).astype(float)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(auc_brute_force(y.tolist(), s.tolist()), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_log_loss_and_rmse_by_hand() -> None:
    y, p = [1, 0, 1], [0.9, 0.2, 0.6]
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3
    assert log_loss(y, p) == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(log_loss([1], [0.0]))  # clipped
    assert rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))


def test_rolling_rmse_and_log_loss_against_the_baseline(db: Database) -> None:
    ensure_schema(db)
    rng = np.random.default_rng(0)
    n = 400
    truth = rng.normal(10, 2, n)
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO monitoring_predictions (request_id, model, version, score, timestamp_ms)"
            " VALUES (?, 'reg', 1, ?, ?)",
            [(f"r{i}", float(truth[i] + rng.normal(0, 1.5)), i * 1000) for i in range(n)],
        )
        store_labels(
            tx,
            [
                LabelRecord(request_id=f"r{i}", model="reg", label=float(truth[i]), timestamp_ms=0)
                for i in range(n)
            ],
        )
    cfg = PerformanceConfig()
    with db.transaction() as tx:
        ok = evaluate_performance(tx, "reg", 1, {"rmse": 1.45}, cfg, window_ms=60_000)
        bad = evaluate_performance(tx, "reg", 1, {"rmse": 1.0}, cfg, window_ms=60_000)
        few = evaluate_performance(
            tx, "reg", 1, {"rmse": 1.0}, PerformanceConfig(min_labels=401), window_ms=60_000
        )
    (check,) = ok.checks
    assert ok.judged and ok.n == n and check.metric == "rmse"
    assert check.value == pytest.approx(1.5, abs=0.15)
    assert check.allowed == pytest.approx(0.145)  # 10% of the baseline (relative margin)
    assert not check.degraded and bad.checks[0].degraded
    assert not few.judged and not few.checks[0].degraded


def test_labels_are_stored_once(db: Database) -> None:
    ensure_schema(db)
    lb = [
        LabelRecord(request_id=f"x{i % 3}", model="m", label=1.0, timestamp_ms=0) for i in range(5)
    ]
    with db.transaction() as tx:
        assert len(store_labels(tx, lb)) == 3
        assert store_labels(tx, lb) == []
