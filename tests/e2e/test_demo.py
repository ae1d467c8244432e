"""``carrara demo`` in-process at small size on PostgreSQL + Redis (``--keep``: the session's
one run, which the console's browser test then explores): every stage's check holds and the
summary's numbers say what the demo claims (both frameworks registered with ONNX parity, the
90/10 split, the drift alert naming the shifted feature, the alert-triggered retraining), and
what ``--keep`` leaves opens again with ``carrara up --config``'s settings."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from carrara.cli import build_parser
from carrara.demo import AUC_GATE, CANARY_SHARE, SHIFTED, demo_report, split_tolerance
from carrara.errors import InvalidArgumentError

from .conftest import KeptDemo


def test_demo_small_run_holds_every_check(kept_demo: KeptDemo) -> None:
    report, text = kept_demo.report, kept_demo.text
    assert report.ok, text
    assert all(s.ok for s in report.stages), text
    assert report.pending == [], text  # trainers, worker and triggers have all landed
    names = [s.name for s in report.stages]
    for stage in (
        "features",
        "training set",
        "training",
        "promotion",
        "serving",
        "load run",
        "traffic split",
        "gRPC",
        "monitoring (baseline)",
        "alert trigger",
        "drift alert",
        "retrain",
    ):
        assert stage in names, names

    # Data: 3,000 riders x 4 days of snapshots; training on the 8,000-row subsample.
    assert report.label_rows == 3_000 * 4
    assert report.training_rows == 8_000
    assert report.events > 3_000 * 4 * 2  # at least one ride and one payment per rider-day

    # Two versions through the queue: v1 XGBoost, v2 PyTorch MLP, both with parity recorded.
    v1, v2 = report.versions[:2]
    assert (v1.version, v1.framework, v1.estimator) == (1, "xgboost", "gradient_boosting")
    assert (v2.version, v2.framework, v2.estimator) == (2, "pytorch", "mlp")
    for v in (v1, v2):
        assert v.parity_max_abs_diff is not None and v.parity_max_abs_diff <= 1e-4
        assert 0.65 <= v.auc <= 0.9  # labels are noisy on purpose: a meaningful, not perfect AUC
        assert v.auc >= AUC_GATE
    assert 1 <= v2.epochs_run <= 40 and 0 <= v2.best_epoch < v2.epochs_run
    champion = max((v1, v2), key=lambda v: v.auc)
    assert report.champion == champion.version
    assert report.challenger == ({1, 2} - {champion.version}).pop()

    # Serving: latencies measured, the observed split within the binomial tolerance.
    assert report.latency_p50_ms is not None and report.latency_p99_ms is not None
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms
    assert report.grpc_p50_ms is not None and report.grpc_p99_ms is not None
    assert 0 < report.grpc_p50_ms <= report.grpc_p99_ms
    assert report.split_tolerance >= split_tolerance(3_000)  # over the riders served (<= all)
    assert report.canary_share is not None
    assert abs(report.canary_share - CANARY_SHARE) <= report.split_tolerance

    # Delayed labels: 3 batches of 400 served predictions labelled with the riders' outcomes;
    # monitoring judged the champion's served AUC, close to its holdout AUC (same population).
    assert report.labelled == 1_200
    assert report.served_auc is not None and abs(report.served_auc - champion.auc) < 0.1

    # Drift: the alert names the shifted feature and only it (the prediction drifts too).
    d = report.drift
    assert d is not None
    assert d.feature == SHIFTED
    assert [s for s in d.alerted if s != "__prediction__"] == [SHIFTED]
    assert d.psi is not None and d.psi > 0.25
    assert d.ks_statistic is not None and d.ks_statistic > 0.5
    assert d.ks_pvalue is not None and d.ks_pvalue < 1e-6

    # Retraining: the alert trigger submitted a job, it ran on labels including the shifted
    # period and registered a 3rd version, which passed the gate and now serves.
    t = report.retrain
    assert t is not None
    assert t.state == "SUCCEEDED" and t.version == 3
    assert t.shifted_label_rows > 0 and t.label_rows == 8_000 + t.shifted_label_rows
    assert t.promoted and t.serving
    v3 = report.versions[2]
    assert v3.version == 3 and v3.role == "retrained" and v3.framework == champion.framework
    assert v3.status == "PRODUCTION" and v3.parity_max_abs_diff is not None
    assert {v.version: v.status for v in report.versions}[champion.version] == "ARCHIVED"
    assert len(report.versions) == 3
    assert math.isfinite(report.seconds) and report.seconds > 0
    assert "demo all checks passed" in text

    # --keep: the settings file reopens the same stores, the console token has its roles.
    from carrara.platform import Platform
    from carrara.up import load_up_config

    assert report.backend == "postgres,redis" and report.isolation
    settings, _ = load_up_config(report.settings_file)
    assert (
        report.isolation in settings.registry_url and report.isolation in settings.online_store_url
    )
    assert (kept_demo.root / "console-token").read_text().strip() == report.console_token
    with Platform.open(settings) as p:
        assert [v.status for v in p.registry.list_versions("rider_churn")].count("PRODUCTION") == 1
        # The monitoring views behind the console, through the local SDK.
        drift = p.monitor.drift("rider_churn", champion.version)
        assert any(w.features[SHIFTED].status == "alert" for w in drift.windows)
        perf = p.monitor.performance("rider_churn", champion.version)
        auc = next(m for m in perf.metrics if m.metric == "auc")
        assert auc.baseline == pytest.approx(champion.auc)
        assert auc.windows[-1].value == pytest.approx(report.served_auc)
        assert p.monitor.distributions("rider_churn", champion.version).features
        who = p.registry.tokens.authenticate(report.console_token)
        assert (who.subject, sorted(who.roles)) == (
            "demo-user",
            ["approver", "deployer", "publisher", "reader"],
        )


def test_demo_rejects_bad_sizes_and_backends(tmp_path: Path) -> None:
    quiet = Console(file=io.StringIO())
    with pytest.raises(InvalidArgumentError, match="--entities"):
        demo_report(10, path=tmp_path, console=quiet)
    with pytest.raises(InvalidArgumentError, match="--train-rows"):
        demo_report(1_000, path=tmp_path, train_rows=5, console=quiet)
    with pytest.raises(InvalidArgumentError, match="--keep needs --path"):
        demo_report(1_000, keep=True, console=quiet)
    with pytest.raises(InvalidArgumentError, match="unknown --backend 'mysql'"):
        demo_report(1_000, path=tmp_path, backend="mysql", console=quiet)


def test_demo_cli_flags() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.entities, args.train_rows, args.backend) == (100_000, 20_000, "embedded")
    args = build_parser().parse_args(
        [
            "demo",
            "--entities",
            "3000",
            "--backend",
            "postgres,redis",
            "--pg-url",
            "postgresql://u@h/db",
            "--redis-url",
            "redis://h:1/2",
            "--load-seconds",
            "0.5",
            "--rate",
            "50",
            "--train-rows",
            "1000",
        ]
    )
    assert args.backend == "postgres,redis" and args.pg_url == "postgresql://u@h/db"
    assert (args.redis_url, args.load_seconds, args.rate, args.train_rows) == (
        "redis://h:1/2",
        0.5,
        50.0,
        1000,
    )
    assert args.keep is False
    assert build_parser().parse_args(["demo", "--path", "/x", "--keep"]).keep is True
