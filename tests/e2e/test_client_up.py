"""``carrara up`` + ``carrara.Client`` end to end on the real PostgreSQL and Redis.

``Services`` starts the control-plane API, the gateway, a training worker and the monitoring
consumer as child processes; everything after that goes through ``Client`` only: feature
groups applied, rows ingested and materialized, two sklearn versions trained by the worker,
one promoted through an AUC gate, a 90/10 deploy, predictions that equal the ONNX models run
here on the online features, and a drift alert after one feature is shifted.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from carrara import Client
from carrara.core import AssemblerSpec
from carrara.errors import FailedPreconditionError, UnauthenticatedError
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup
from carrara.monitoring import DriftThresholds, ModelMonitorConfig
from carrara.registry.types import Gate, TrafficSplit, VariantSplit
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec
from carrara.up import Services

from ..servers import up_config_on_real_stores

pytestmark = pytest.mark.integration

TOKEN = "e2e-bootstrap-token"
MODEL = "rider_churn"
N = 500
DAYS = 3
DAY_US = 86_400_000_000
TRIPS = ("ride_count", "avg_fare", "cancel_rate")
PAYMENTS = ("avg_amount", "decline_rate")
REFS = [f"trips:{f}" for f in TRIPS] + [f"payments:{f}" for f in PAYMENTS]
SHIFTED = "avg_fare"


def _definitions() -> Definitions:
    return Definitions(
        entities=(Entity(name="rider", join_key="rider_id"),),
        groups=(
            FeatureGroup(
                name="trips",
                entity="rider",
                ttl_days=30,
                features=tuple(Feature(name=f) for f in TRIPS),
            ),
            FeatureGroup(
                name="payments",
                entity="rider",
                ttl_days=30,
                features=tuple(Feature(name=f) for f in PAYMENTS),
            ),
        ),
    )


def _data(now_us: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Daily snapshots (the same distribution every day) and labels half a day later."""
    rng = np.random.default_rng(11)
    n = N * DAYS
    riders = [f"rider-{i}" for i in range(N)] * DAYS
    ts = np.repeat([now_us - (DAYS - d) * DAY_US for d in range(DAYS)], N)
    trips = pd.DataFrame(
        {
            "rider_id": riders,
            "event_timestamp": ts,
            "ride_count": rng.gamma(3.0, 2.0, n),
            "avg_fare": rng.normal(20.0, 4.0, n),
            "cancel_rate": rng.beta(2.0, 10.0, n),
        }
    )
    pays = pd.DataFrame(
        {
            "rider_id": riders,
            "event_timestamp": ts,
            "avg_amount": rng.normal(30.0, 6.0, n),
            "decline_rate": rng.beta(1.0, 12.0, n),
        }
    )

    def z(v: pd.Series) -> np.ndarray:
        a = v.to_numpy(float)
        return (a - a.mean()) / a.std()

    logit = 1.5 * z(trips["cancel_rate"]) - 1.0 * z(trips["ride_count"])
    logit += 0.8 * z(pays["decline_rate"]) + rng.normal(0, 0.6, n)
    labels = pd.DataFrame(
        {
            "rider_id": riders,
            "event_timestamp": ts + DAY_US // 2,
            "churned": (logit > 0.4).astype(int),
        }
    )
    return trips, pays, labels


def _run_onnx(artifact: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {session.get_inputs()[0].name: x})[0]
    return out


def _feature_matrix(client: Client, spec: AssemblerSpec, ids: list[str]) -> np.ndarray:
    """The model's input rows as the gateway assembles them, from the online store via the
    feature API (every rider has every value here, so no defaults are involved)."""
    columns = []
    for ref in spec.features:
        online = client.features.get_online(ref.group, ids, [ref.feature])
        assert online.found.all() and not online.missing.any()
        columns.append(online.values[:, 0])
    return np.stack(columns, axis=1).astype(np.float32)


def test_client_drives_every_service_started_by_up(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_namespace: str
) -> None:
    settings, up = up_config_on_real_stores(
        tmp_path,
        postgres_url,
        redis_url,
        redis_namespace,
        TOKEN,
        settings={"cache_ttl_seconds": 0.5},  # the gateway sees the shifted values quickly
    )
    now_us = time.time_ns() // 1000
    trips, pays, labels = _data(now_us)
    # The worker reads it: same machine, under the home (a default data root: label sources
    # elsewhere are refused).
    label_path = tmp_path / "home" / "labels.parquet"
    label_path.parent.mkdir(parents=True, exist_ok=True)
    labels.to_parquet(label_path)

    with (
        Services(settings, up) as svc,
        Client(svc.api_url, TOKEN, gateway=f"grpc://{svc.grpc_target}") as client,
        Client(svc.api_url, TOKEN, gateway=svc.gateway_url) as over_http,
    ):
        names = {c.name for c in svc.children}
        assert {"api", "gateway", "worker-1", "monitor", "materializer", "triggers"} <= names
        # The gateway holds no registry database credentials (it serves from events).
        gw = next(c for c in svc.children if c.name == "gateway")
        environ = Path(f"/proc/{gw.process.pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith(b"CARRARA_REGISTRY_URL=")]

        # Writes need the token; reads do not.
        with Client(svc.api_url) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.features.apply(_definitions())
        with pytest.raises(FailedPreconditionError), client.serve():
            pass

        # 1. Features: apply, ingest, materialize, read back.
        changes = client.features.apply(_definitions())
        assert {(c.name, c.action) for c in changes if c.kind == "group"} == {
            ("trips", "created"),
            ("payments", "created"),
        }
        assert client.features.ingest("trips", trips) == len(trips)
        assert client.features.ingest("payments", pays) == len(pays)
        written = {m.group: m.written for m in client.features.materialize(full=True)}
        assert written == {"trips": N, "payments": N}
        assert sorted(g.definition.name for g in client.features.list_groups()) == [
            "payments",
            "trips",
        ]
        last = trips[trips["event_timestamp"] == trips["event_timestamp"].max()].set_index(
            "rider_id"
        )
        online = client.features.get_online("trips", ["rider-3", "rider-4", "nobody"])
        assert online.found.tolist() == [True, True, False]
        np.testing.assert_allclose(
            online.values[:2], last.loc[["rider-3", "rider-4"], list(TRIPS)].to_numpy(), rtol=1e-6
        )

        # Streaming: rows published to feature-updates reach the online store through the
        # materializer process.
        client.features.publish(
            "payments",
            [
                {
                    "rider_id": "late",
                    "event_timestamp": now_us,
                    "avg_amount": 9.5,
                    "decline_rate": 0.5,
                }
            ],
        )
        deadline = time.monotonic() + 20
        while not (late := client.features.get_online("payments", ["late"])).found[0]:
            assert time.monotonic() < deadline, svc.log_tail("materializer")
            time.sleep(0.2)
        assert late.values[0].tolist() == [9.5, 0.5]

        ts = client.features.get_training_set(labels, REFS).to_pandas()
        assert len(ts) == len(labels)
        assert ts[[r.replace(":", "__") for r in REFS]].notna().all(axis=None)

        # 2. Two versions trained by the worker of `up`.
        client.registry.create_model(
            MODEL,
            actor=client.actor,
            framework="sklearn",
            gates=[Gate(metric="auc", dataset="holdout", threshold=0.6)],
        )
        dataset = DatasetSpec(
            features=REFS,
            label_source=str(label_path),
            label_column="churned",
            entity_column="rider_id",
            validation_fraction=0.25,
        )
        jobs = [
            client.training.submit(
                JobSpec(model_name=MODEL, dataset=dataset, model=ModelSpec(estimator=e, params=p))
            )
            for e, p in (
                ("logistic_regression", {"C": 1.0}),
                ("gradient_boosting", {"n_estimators": 30, "max_depth": 2}),
            )
        ]
        done = [client.training.wait(j.job_id, timeout_s=120) for j in jobs]
        assert [j.state for j in done] == ["SUCCEEDED", "SUCCEEDED"], [j.error for j in done]
        assert client.training.logs(jobs[0].job_id), "the worker logs progress through the queue"
        auc = {int(j.result["version"]): float(j.result["metrics"]["auc"]) for j in done}
        assert sorted(auc) == [1, 2] and min(auc.values()) > 0.6

        # 3. Gate, promote, deploy 90/10.
        for v, value in auc.items():
            client.registry.record_evaluation(
                MODEL, v, "holdout", {"auc": value}, actor=client.actor
            )
        champion = max(auc, key=lambda v: auc[v])
        challenger = 3 - champion
        promoted = client.registry.promote(MODEL, champion, actor=client.actor)
        assert promoted.version.status == "PRODUCTION"
        assert [(g.metric, g.passed) for g in promoted.gate_results] == [("auc", True)]
        assert client.registry.production_version(MODEL).version == champion  # type: ignore[union-attr]
        split = TrafficSplit(
            variants=[
                VariantSplit(name="champion", version=champion, weight_bp=9_000),
                VariantSplit(name="canary", version=challenger, weight_bp=1_000, canary=True),
            ],
            salt="e2e",
        )
        deployment = client.deploy(MODEL, champion, split)
        assert client.registry.active_deployment(MODEL) == deployment

        # 4. Served predictions == the registered ONNX models on the online features.
        ids = [f"rider-{i}" for i in range(N)]
        served = client.predict(MODEL, ids)
        assert served.entity_ids == ids and not any(served.degraded)
        counts = Counter(served.versions)
        assert set(counts) == {champion, challenger}
        assert abs(counts[challenger] / N - 0.10) < 4 * np.sqrt(0.09 / N)
        by_http = over_http.predict(MODEL, ids)
        np.testing.assert_array_equal(by_http.outputs, served.outputs)
        assert by_http.versions == served.versions
        expected = np.empty(N, np.float32)
        for v in (champion, challenger):
            spec = msgspec.convert(
                client.registry.get_version(MODEL, v).serving_spec, AssemblerSpec
            )
            rows = [i for i, sv in enumerate(served.versions) if sv == v]
            x = _feature_matrix(client, spec, [ids[i] for i in rows])
            expected[rows] = _run_onnx(client.registry.load_artifact(MODEL, v), x)[:, 0]
        np.testing.assert_allclose(served.outputs[:, 0], expected, atol=1e-6)

        # 5. Monitoring: reference = the champion on its training set; no drift on baseline.
        spec = msgspec.convert(
            client.registry.get_version(MODEL, champion).serving_spec, AssemblerSpec
        )
        reference = pd.DataFrame(
            {f.feature: ts[f"{f.group}__{f.feature}"].to_numpy(np.float32) for f in spec.features}
        )
        outputs = _run_onnx(client.registry.load_artifact(MODEL, champion), reference.to_numpy())
        client.monitor.set_reference(MODEL, champion, reference, outputs[:, 0])
        client.monitor.configure(
            MODEL,
            ModelMonitorConfig(
                window_ms=2_000, allowed_lateness_ms=0, drift=DriftThresholds(min_samples=100)
            ),
        )
        for _ in range(2):
            client.predict(MODEL, ids)  # the first pass of step 4 predates the reference
        client.flush_predictions()
        baseline = [
            a
            for a in client.monitor.run()
            if a.kind == "drift" and a.state == "firing" and a.subject != "__prediction__"
        ]
        assert baseline == [], [a.message for a in baseline]

        # 6. Shift one feature online; the monitor raises a drift alert naming it.
        shifted = last.reset_index()
        shifted[SHIFTED] += 3.0 * float(trips[SHIFTED].std())
        shifted["event_timestamp"] = time.time_ns() // 1000 - 1_000_000
        client.features.ingest("trips", shifted)
        client.features.materialize("trips", full=True)
        time.sleep(settings.cache_ttl_seconds + 0.1)
        moved = client.predict(MODEL, ids)
        assert float(np.abs(moved.outputs - served.outputs).max()) > 0  # new values are served
        fired: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            client.predict(MODEL, ids)
            client.flush_predictions()
            client.monitor.run()
            fired = sorted(
                {
                    a.subject
                    for a in client.monitor.active(MODEL)
                    if a.kind == "drift" and a.version == champion and a.subject != "__prediction__"
                }
            )
            if fired:
                break
        assert fired == [SHIFTED]
        assert SHIFTED in client.monitor.report(MODEL, champion)
        # The JSON views behind the console, through the SDK.
        drift = client.monitor.drift(MODEL, champion)
        assert drift.version == champion and drift.windows
        assert any(w.features[SHIFTED].status == "alert" for w in drift.windows)
        psi_alert = drift.thresholds.psi_alert
        assert max(w.features[SHIFTED].psi or 0.0 for w in drift.windows) >= psi_alert
        dists = {f.feature: f for f in client.monitor.distributions(MODEL, champion).features}
        assert sum(dists[SHIFTED].current) == pytest.approx(1.0)
        assert dists[SHIFTED].current != dists[SHIFTED].reference
        assert client.monitor.performance(MODEL, champion).version == champion
        key = f"{MODEL}:v{champion}:drift:{SHIFTED}"
        acked = client.monitor.acknowledge(key, "looking into it")
        assert (acked.acknowledged_by, acked.ack_comment) == ("bootstrap", "looking into it")
        svc.check()  # every child is still running

    # Stopped gracefully: every child exited on SIGTERM (workers and the monitor by the signal).
    assert {c.process.returncode for c in svc.children} <= {0, -signal.SIGTERM}
