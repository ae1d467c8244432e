"""``carrara demo``: the whole loop on embedded defaults, through ``carrara.Platform``.

In a temporary folder (or ``--path``): generate ride and payment events for N riders, define
and apply two feature groups, ingest and materialize them, build a point-in-time training set,
train two scikit-learn versions through the training queue (logistic regression and gradient
boosting), promote the better one through an AUC gate, deploy a 90/10 canary split, serve
predictions in-process under a short load run (the load harness with an in-process target),
then shift one feature, run the monitoring consumer and show the drift alert it raises.

Every stage has a check; the exit code is 0 only when all of them hold. Not done here:
retraining on the alert.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["run_demo"]

MODEL = "rider_churn"
SHIFTED = "avg_fare"
DAY_US = 86_400_000_000
DAYS = 4
TRIP_FEATURES = ("ride_count", "avg_fare", "cancel_rate")
PAY_FEATURES = ("avg_amount", "decline_rate")
FEATURE_REFS = [f"trips:{f}" for f in TRIP_FEATURES] + [f"payments:{f}" for f in PAY_FEATURES]
CANARY_SHARE = 0.10


# Routing is sticky per entity (a hash), so the canary's observed share varies like a binomial
# over the distinct riders served: the tolerance is 4 standard deviations of that, at least 2%.
def split_tolerance(entities: int, share: float = CANARY_SHARE) -> float:
    return max(0.02, 4.0 * math.sqrt(share * (1.0 - share) / entities))


AUC_GATE = 0.6
WINDOW_MS = 1_000  # monitoring window: short, so a demo run spans a few


class _Check:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool]] = []

    def add(self, stage: str, detail: str, ok: bool) -> bool:
        self.rows.append((stage, detail, ok))
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.rows)


def _definitions() -> Any:
    from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup

    return Definitions(
        entities=(Entity(name="rider", join_key="rider_id"),),
        groups=(
            FeatureGroup(
                name="trips",
                entity="rider",
                ttl_days=30,
                features=tuple(Feature(name=f) for f in TRIP_FEATURES),
                description="daily ride aggregates",
            ),
            FeatureGroup(
                name="payments",
                entity="rider",
                ttl_days=30,
                features=tuple(Feature(name=f) for f in PAY_FEATURES),
                description="daily payment aggregates",
            ),
        ),
    )


def _events(n: int, t0_us: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw ride and payment events of ``n`` riders over ``DAYS`` days."""
    fare_mu = rng.normal(2.6, 0.3, n)
    cancel_p = rng.beta(2, 12, n)
    spend_mu = rng.normal(3.0, 0.4, n)
    decline_p = rng.beta(1, 15, n)
    activity = rng.gamma(2.0, 1.5, n)

    def expand(rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counts = rng.poisson(np.repeat(rate[:, None], DAYS, axis=1)) + 1  # [n, DAYS]
        rider = np.repeat(np.repeat(np.arange(n), DAYS), counts.ravel())
        day = np.repeat(np.tile(np.arange(DAYS), n), counts.ravel())
        return rider, day

    r_rider, r_day = expand(activity)
    rides = pd.DataFrame(
        {
            "rider": r_rider,
            "day": r_day,
            "ts": t0_us + r_day * DAY_US + rng.integers(0, DAY_US, len(r_rider)),
            "fare": np.exp(rng.normal(fare_mu[r_rider], 0.4)),
            "cancelled": (rng.random(len(r_rider)) < cancel_p[r_rider]).astype(float),
        }
    )
    p_rider, p_day = expand(activity * 0.7)
    payments = pd.DataFrame(
        {
            "rider": p_rider,
            "day": p_day,
            "ts": t0_us + p_day * DAY_US + rng.integers(0, DAY_US, len(p_rider)),
            "amount": np.exp(rng.normal(spend_mu[p_rider], 0.5)),
            "declined": (rng.random(len(p_rider)) < decline_p[p_rider]).astype(float),
        }
    )
    return rides, payments


def _daily(events: pd.DataFrame, t0_us: int, aggs: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Per rider and day: the aggregates, stamped at the end of the day."""
    out = events.groupby(["rider", "day"], as_index=False).agg(**aggs)
    out["rider_id"] = "rider-" + out["rider"].astype(str)
    out["event_timestamp"] = t0_us + (out["day"] + 1) * DAY_US - 1
    cols = ["rider_id", "event_timestamp", *aggs]
    return out[cols].astype({k: "float64" for k in aggs}).reset_index(drop=True)


def _labels(trips: pd.DataFrame, pays: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Churn labels half a day after each daily snapshot, from the rider's features."""
    df = trips.merge(pays, on=["rider_id", "event_timestamp"], how="inner")

    def z(col: str) -> NDArray[np.float64]:
        v = np.asarray(df[col].to_numpy(float), dtype=np.float64)
        out: NDArray[np.float64] = (v - v.mean()) / (v.std() + 1e-9)
        return out

    logit = (
        1.6 * z("cancel_rate")
        - 1.2 * z("ride_count")
        + 0.9 * z("decline_rate")
        + 0.4 * z("avg_fare")
        + rng.normal(0, 0.7, len(df))
    )
    return pd.DataFrame(
        {
            "rider_id": df["rider_id"],
            "event_timestamp": df["event_timestamp"] + DAY_US // 2,
            "churned": (logit > 0.6).astype(int),
        }
    )


def _latest(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("event_timestamp").groupby("rider_id").tail(1).set_index("rider_id")


def run_demo(
    entities: int = 2_000,
    *,
    path: str | Path | None = None,
    load_seconds: float = 1.5,
    rate: float = 400.0,
    console: Console | None = None,
) -> int:
    """Run the loop; returns a process exit code (0 when every stage's check held)."""
    from carrara.errors import InvalidArgumentError

    if entities < 100:
        raise InvalidArgumentError(f"--entities must be at least 100, got {entities}")
    console = console or Console()
    if path is None:
        with tempfile.TemporaryDirectory(prefix="carrara-demo-") as tmp:
            return _run(entities, Path(tmp), load_seconds, rate, console)
    return _run(entities, Path(path), load_seconds, rate, console)


def _run(n: int, root: Path, load_seconds: float, rate: float, console: Console) -> int:
    import joblib  # type: ignore[import-untyped]

    from carrara.loadgen import CallableTarget, EntitySpec, StagePlan, TargetSpec, run_stage
    from carrara.monitoring import ModelMonitorConfig
    from carrara.platform import Platform
    from carrara.registry.types import Gate, TrafficSplit, VariantSplit
    from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec

    started = time.perf_counter()
    checks = _Check()
    rng = np.random.default_rng(7)
    now_us = time.time_ns() // 1000
    t0_us = (now_us // DAY_US - DAYS - 1) * DAY_US
    stages = 10
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    summary: dict[str, str] = {}
    with progress, Platform.local(root, cache_ttl_seconds=30.0) as p:
        task = progress.add_task("starting", total=stages)

        def stage(name: str) -> None:
            progress.update(task, description=name)

        def done(name: str, detail: str, ok: bool) -> bool:
            checks.add(name, detail, ok)
            progress.console.print(
                f"[{'green' if ok else 'red'}]{'✓' if ok else '✗'}[/] {name}: {detail}"
            )
            progress.advance(task)
            return ok

        # 1. Events -> feature groups -> offline store -> online store.
        stage("features: generate, apply, ingest, materialize")
        rides, payments = _events(n, t0_us, rng)
        trips = _daily(
            rides,
            t0_us,
            {
                "ride_count": ("fare", "size"),
                "avg_fare": ("fare", "mean"),
                "cancel_rate": ("cancelled", "mean"),
            },
        )
        pays = _daily(
            payments,
            t0_us,
            {"avg_amount": ("amount", "mean"), "decline_rate": ("declined", "mean")},
        )
        p.features.apply(_definitions())
        rows = p.features.ingest("trips", trips) + p.features.ingest("payments", pays)
        materialized = p.features.materialize(full=True)
        done(
            "features",
            f"{len(rides) + len(payments):,} events -> {rows:,} feature rows in 2 groups, "
            f"{len(materialized)} groups materialized",
            rows == len(trips) + len(pays) and len(materialized) == 2,
        )

        # 2. Point-in-time training set.
        stage("training set (point in time)")
        labels = _labels(trips, pays, rng)
        label_path = root / "labels.parquet"
        labels.to_parquet(label_path)
        ts = p.features.get_training_set(labels, FEATURE_REFS).to_pandas()
        columns = [r.replace(":", "__") for r in FEATURE_REFS]
        filled = ts[columns].notna().all(axis=1).mean()
        done(
            "training set",
            f"{len(ts):,} rows x {len(columns)} features, {filled:.0%} complete, "
            f"{labels['churned'].mean():.0%} positive",
            len(ts) == len(labels) and filled > 0.95,
        )

        # 3. Two versions trained through the queue.
        stage("training: 2 jobs through the queue")
        p.registry.create_model(
            MODEL,
            actor=p.actor,
            framework="sklearn",
            description="demo: will a rider churn?",
            gates=[Gate(metric="auc", dataset="holdout", threshold=AUC_GATE)],
        )
        dataset = DatasetSpec(
            features=FEATURE_REFS,
            label_source=str(label_path),
            label_column="churned",
            entity_column="rider_id",
            validation_fraction=0.25,
        )
        jobs = [
            p.training.submit(
                JobSpec(
                    model_name=MODEL,
                    dataset=dataset,
                    model=ModelSpec(estimator=est, params=params),
                )
            )
            for est, params in (
                ("logistic_regression", {"C": 1.0}),
                ("gradient_boosting", {"n_estimators": 60, "max_depth": 3}),
            )
        ]
        finished = {j.job_id: j for j in p.training.run_pending()}
        results = [finished[j.job_id] for j in jobs if j.job_id in finished]
        trained = [j.result for j in results if j.state == "SUCCEEDED"]
        ok = len(trained) == 2
        versions = {
            int(r["version"]): (
                p.registry.get_version(MODEL, int(r["version"])).tags["training.estimator"],
                float(r["metrics"].get("auc", 0.0)),
            )
            for r in trained
        }
        done(
            "training",
            ", ".join(f"v{v} {est} auc={auc:.3f}" for v, (est, auc) in versions.items())
            or "; ".join(j.error for j in results),
            ok,
        )
        if not ok:
            return _finish(console, checks, summary, started)

        # 4. Evaluate, promote the better one through the gate.
        stage("registry: evaluate, gate, promote")
        for v, (_, auc) in versions.items():
            p.registry.record_evaluation(MODEL, v, "holdout", {"auc": auc}, actor=p.actor)
        champion = max(versions, key=lambda v: versions[v][1])
        challenger = next(v for v in versions if v != champion)
        promoted = p.registry.promote(MODEL, champion, actor=p.actor)
        gates = ", ".join(
            f"{g.metric} {g.value:.3f} >= {AUC_GATE}: {'pass' if g.passed else 'FAIL'}"
            for g in promoted.gate_results
        )
        done(
            "promotion",
            f"v{champion} ({versions[champion][0]}) -> PRODUCTION; gate {gates}",
            promoted.version.status == "PRODUCTION"
            and all(g.passed for g in promoted.gate_results),
        )

        # 5. Deploy 90/10 and check served == sklearn on the latest feature rows.
        stage("deploy 90/10 and serve")
        p.deploy(
            MODEL,
            champion,
            TrafficSplit(
                variants=[
                    VariantSplit(
                        name="champion", version=champion, weight_bp=round(1e4 * (1 - CANARY_SHARE))
                    ),
                    VariantSplit(
                        name="canary",
                        version=challenger,
                        weight_bp=round(1e4 * CANARY_SHARE),
                        canary=True,
                    ),
                ],
                salt="demo",
            ),
        )
        native = {
            v: joblib.load(io.BytesIO(p.registry.load_artifact(MODEL, v, "native")))
            for v in versions
        }
        latest = _latest(trips).join(_latest(pays).drop(columns="event_timestamp"), how="inner")
        sample = [f"rider-{i}" for i in range(0, n, max(1, n // 64))]
        served = p.predict(MODEL, sample)
        x = latest.loc[sample, [c.split("__")[1] for c in columns]].to_numpy(np.float32)
        expected = np.array(
            [native[v].predict_proba(x[i : i + 1])[0, 1] for i, v in enumerate(served.versions)]
        )
        diff = float(np.max(np.abs(served.outputs[:, 0] - expected)))
        done(
            "serving",
            f"{len(sample)} riders served by v{sorted(set(served.versions))}, "
            f"max |served - sklearn| = {diff:.1e}",
            diff <= 1e-4,
        )

        # 5b. The same engine behind the gateway's gRPC front on loopback.
        stage("serve over gRPC (loopback)")
        import grpc

        from carrara.gateway.grpc_front import predict_stub
        from carrara.v1 import predict_pb2

        with p.serve() as server, grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            response = predict_stub(ch)(
                predict_pb2.PredictRequest(model=MODEL, entity_ids=sample), timeout=10.0
            )
        over_grpc = np.array([pr.values[0] for pr in response.predictions], np.float32)
        grpc_diff = float(np.max(np.abs(over_grpc - served.outputs[:, 0])))
        done(
            "gRPC",
            f"{len(over_grpc)} riders over 127.0.0.1:{server.grpc_port}, "
            f"max |gRPC - embedded| = {grpc_diff:.1e}",
            len(over_grpc) == len(sample) and grpc_diff <= 1e-6,
        )

        # 6. Reference profiles and monitoring config, then a load run on the embedded gateway.
        # Drift is judged for the champion: the canary serves a tenth of the riders, a
        # sample too small and too particular to compare with the whole training population.
        reference = ts[columns].fillna(ts[columns].mean())
        reference.columns = [c.split("__")[1] for c in columns]
        outputs = native[champion].predict_proba(reference.to_numpy(np.float32))[:, 1]
        p.monitor.set_reference(MODEL, champion, reference, outputs)
        p.monitor.configure(MODEL, ModelMonitorConfig(window_ms=WINDOW_MS, allowed_lateness_ms=0))

        def load(label: str) -> tuple[Any, Counter[str]]:
            counts: Counter[str] = Counter()
            load_task = progress.add_task(f"  load run: {label}", total=None)

            def call(ids: list[str]) -> None:
                res = p.predict(MODEL, ids)
                counts.update(res.variants)
                progress.update(load_task, advance=len(ids))

            result = run_stage(
                TargetSpec(
                    kind="null",
                    model=MODEL,
                    batch=4,
                    entities=EntitySpec(count=n, prefix="rider-"),
                ),
                StagePlan(mode="open", rate=rate, duration_s=load_seconds, warmup_s=0.2, seed=3),
                make_target=lambda: CallableTarget(call),
            )
            progress.remove_task(load_task)
            return result, counts

        stage("load run (in-process target)")
        result, counts = load("baseline")
        total = sum(counts.values())
        canary = counts["canary"] / total if total else 0.0
        lat = result.latency
        summary["latency"] = f"p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms"
        summary["split"] = (
            f"{1 - canary:.1%} v{champion} / {canary:.1%} v{challenger} "
            f"(target {1 - CANARY_SHARE:.0%}/{CANARY_SHARE:.0%} ± {split_tolerance(n):.1%})"
        )
        done(
            "load run",
            f"{result.ok:,}/{result.requests:,} requests ok at {result.achieved_rate:.0f}/s, "
            f"{summary['latency']}",
            result.requests > 0 and result.ok == result.requests,
        )
        done(
            "traffic split",
            summary["split"],
            total > 0 and abs(canary - CANARY_SHARE) <= split_tolerance(n),
        )

        # 7. Monitoring on unshifted traffic: no feature drifts.
        stage("monitoring: baseline")
        before = [
            a
            for a in p.monitor.run()
            if a.kind == "drift" and a.state == "firing" and a.version == champion
        ]
        false_alarms = sorted({a.subject for a in before if a.subject != "__prediction__"})
        done(
            "monitoring (baseline)",
            "no feature drift" if not false_alarms else f"unexpected drift on {false_alarms}",
            not false_alarms,
        )

        # 8. Shift one feature online, serve again, and expect the alert to name it.
        stage(f"shift {SHIFTED} and monitor")
        shifted = _latest(trips).reset_index()
        sd = float(trips[SHIFTED].std())
        shifted[SHIFTED] = shifted[SHIFTED] + 3.0 * sd
        shifted["event_timestamp"] = time.time_ns() // 1000 - 1_000_000
        p.features.ingest("trips", shifted)
        p.features.materialize("trips", full=True)
        p.flush_predictions()  # a fresh gateway: the cache drops the old values
        load("shifted")
        after = [
            a
            for a in p.monitor.run()
            if a.kind == "drift" and a.state == "firing" and a.version == champion
        ]
        drifted = sorted({a.subject for a in after})
        features_drifted = [s for s in drifted if s != "__prediction__"]
        summary["drift"] = (
            f"{SHIFTED} shifted +3 sd -> alerts on {drifted}" if drifted else "no alert"
        )
        done(
            "drift alert",
            summary["drift"],
            features_drifted == [SHIFTED],
        )
        summary["versions"] = ", ".join(
            f"v{v} {est} (auc {auc:.3f}{', production' if v == champion else ', canary'})"
            for v, (est, auc) in sorted(versions.items())
        )
        summary["retrain"] = "not done (retraining on the alert is a later slice)"
    return _finish(console, checks, summary, started)


def _finish(console: Console, checks: _Check, summary: dict[str, str], started: float) -> int:
    table = Table(title="Carrara demo: features -> training -> registry -> serving -> monitoring")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("check", justify="center")
    for stage, detail, ok in checks.rows:
        table.add_row(stage, detail, "[green]ok[/]" if ok else "[red]FAILED[/]")
    console.print(table)
    for key in ("latency", "split", "drift", "versions", "retrain"):
        if key in summary:
            console.print(f"{key}: {summary[key]}")
    verdict = "all checks passed" if checks.ok else "SOME CHECKS FAILED"
    console.print(f"demo {verdict} in {time.perf_counter() - started:.1f} s")
    return 0 if checks.ok else 1
