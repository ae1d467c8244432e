"""``carrara.Platform.local``: the embedded facade end to end on small data (apply -> ingest ->
materialize -> train through the queue -> register -> deploy -> predict == sklearn), and the
lazy export from ``carrara``."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import joblib
import numpy as np
import pandas as pd
import pytest

import carrara
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup
from carrara.gateway.grpc_client import predict_stub
from carrara.registry.types import TrafficSplit, VariantSplit
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec
from carrara.v1 import predict_pb2

DAY_US = 86_400_000_000


def _definitions() -> Definitions:
    return Definitions(
        entities=(Entity(name="user", join_key="user_id"),),
        groups=(
            FeatureGroup(
                name="activity",
                entity="user",
                ttl_days=30,
                features=(Feature(name="a"), Feature(name="b")),
            ),
            FeatureGroup(
                name="profile", entity="user", ttl_days=30, features=(Feature(name="age"),)
            ),
        ),
    )


def _spec(label_path: Path, estimator: str, params: dict[str, Any]) -> JobSpec:
    return JobSpec(
        model_name="churn",
        dataset=DatasetSpec(
            features=["activity:a", "activity:b", "profile:age"],
            label_source=str(label_path),
            label_column="churned",
            entity_column="user_id",
            validation_fraction=0.25,
        ),
        model=ModelSpec(estimator=estimator, params=params),
    )


def test_import_carrara_does_not_load_the_platform() -> None:
    code = "import sys, carrara; print('carrara.platform' in sys.modules, carrara.Platform)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.startswith("False <class 'carrara.platform.Platform'>")
    assert "Platform" in carrara.__all__
    with pytest.raises(AttributeError):
        getattr(carrara, "NoSuchThing")  # noqa: B009


def test_local_platform_end_to_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    now_us = time.time_ns() // 1000
    t0 = now_us - 5 * DAY_US
    users = [f"u{i}" for i in range(120)]
    activity = pd.DataFrame(
        [
            {
                "user_id": u,
                "event_timestamp": t0 + day * DAY_US,
                "a": float(rng.normal()),
                "b": float(rng.normal()),
            }
            for u in users
            for day in (0, 1, 2)
        ]
    )
    profile = pd.DataFrame(
        {
            "user_id": users,
            "event_timestamp": [t0] * len(users),
            "age": rng.integers(18, 70, len(users)).astype(float),
        }
    )
    logit = 2.0 * activity["a"] - 1.5 * activity["b"] + rng.normal(0, 0.5, len(activity))
    labels = pd.DataFrame(
        {
            "user_id": activity["user_id"],
            "event_timestamp": activity["event_timestamp"] + DAY_US // 2,
            "churned": (logit > 0).astype(int),
        }
    )
    label_path = tmp_path / "labels.parquet"
    labels.to_parquet(label_path)

    with carrara.Platform.local(tmp_path / "platform") as p:
        p.features.apply(_definitions())
        assert p.features.ingest("activity", activity) == len(activity)
        assert p.features.ingest("profile", profile) == len(profile)
        assert len(p.features.materialize(full=True)) == 2

        jobs = [
            p.training.submit(_spec(label_path, "logistic_regression", {"C": 1.0})),
            p.training.submit(_spec(label_path, "gradient_boosting", {"n_estimators": 20})),
        ]
        finished = p.training.run_pending(heartbeat_interval_s=0.2)
        assert [j.job_id for j in finished] == [j.job_id for j in jobs]
        assert all(j.state == "SUCCEEDED" for j in finished), [j.error for j in finished]
        v1, v2 = (int(j.result["version"]) for j in finished)
        assert p.registry.get_version("churn", v1).run_id == jobs[0].job_id

        # All traffic to v1 first, then a 50/50 split: predictions follow the registry.
        p.deploy("churn", v1)
        latest = activity[activity["event_timestamp"] == t0 + 2 * DAY_US].set_index("user_id")
        age = profile.set_index("user_id")["age"]
        x = np.column_stack(
            [latest.loc[users, "a"], latest.loc[users, "b"], age.loc[users]]
        ).astype(np.float32)
        native = {
            v: joblib.load(io.BytesIO(p.registry.load_artifact("churn", v, "native")))
            for v in (v1, v2)
        }
        served = p.predict("churn", users)
        assert set(served.versions) == {v1}
        np.testing.assert_allclose(
            served.outputs[:, 0], native[v1].predict_proba(x)[:, 1], atol=1e-4
        )

        p.deploy(
            "churn",
            v1,
            TrafficSplit(
                variants=[
                    VariantSplit(name="a", version=v1, weight_bp=5_000),
                    VariantSplit(name="b", version=v2, weight_bp=5_000),
                ]
            ),
        )
        served = p.predict("churn", users)
        assert set(served.versions) == {v1, v2}
        expected = np.array(
            [native[v].predict_proba(x[i : i + 1])[0, 1] for i, v in enumerate(served.versions)]
        )
        np.testing.assert_allclose(served.outputs[:, 0], expected, atol=1e-4)

        # The same deployment over the gateway's gRPC front on loopback.
        with p.serve() as server, grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            response = predict_stub(ch)(
                predict_pb2.PredictRequest(model="churn", entity_ids=users), timeout=10.0
            )
        got = np.array([r.values[0] for r in response.predictions], np.float32)
        np.testing.assert_allclose(got, served.outputs[:, 0], atol=1e-6)
        assert p.predict("churn", users[:3]).versions == served.versions[:3]  # serving goes on

        # The predictions reach the platform's event log for monitoring.
        assert p.monitor.run() == []  # no reference profile yet: nothing judged
        assert p.monitor.consumer.metrics is not None

    for name in ("registry.db", "events.db", "offline", "artifacts"):
        assert (tmp_path / "platform" / name).exists(), name


def test_platform_open_puts_each_part_where_settings_say(tmp_path: Path) -> None:
    from carrara.config import Settings
    from carrara.eventlog import LocalEventLog
    from carrara.feature_cache.online_store import EmbeddedOnlineStore

    settings = Settings(
        home=str(tmp_path / "home"),
        registry_url=f"sqlite:///{tmp_path / 'db' / 'reg.db'}",
        offline_store_path=str(tmp_path / "offline-elsewhere"),
        event_log_url="local://",  # in memory
        online_store_url="memory://?namespace=demo-ns",
        artifact_path=str(tmp_path / "blobs"),
        cache_ttl_seconds=5.0,
    )
    with carrara.Platform.open(settings) as p:
        p.features.apply(_definitions())
        assert isinstance(p.events, LocalEventLog)
        assert isinstance(p.features.online, EmbeddedOnlineStore)
        assert p.features.online.namespace == "demo-ns"
        assert p._cache_ttl_seconds == 5.0
        assert p.actor.subject == "local" and "deployer" in p.actor.roles
        p.monitor.consumer  # noqa: B018 - creates the monitoring tables in the same database
    assert (tmp_path / "db" / "reg.db").is_file()
    assert not (tmp_path / "home").exists()  # nothing fell back to the home folder
    with carrara.sql.connect(settings.resolved_registry_url) as db, db.transaction() as tx:
        tables = {r[0] for r in tx.fetchall("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"models", "feature_groups", "training_jobs", "monitoring_alerts"} <= tables


def test_platform_open_closes_what_it_opened_on_a_bad_url(tmp_path: Path) -> None:
    from carrara.config import Settings
    from carrara.errors import ConfigError

    settings = Settings(home=str(tmp_path), online_store_url="memcached://nowhere")
    with pytest.raises(ConfigError, match="unsupported online store URL"):
        carrara.Platform.open(settings)


def test_platform_deploy_that_cannot_load_records_nothing(tmp_path: Path) -> None:
    """A version whose artifact passes its sha256 but is no model: the embedded gateway cannot
    load it, so the deploy raises and the registry keeps the deployment it had."""
    from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, serving_spec
    from carrara.gateway.onnx_models import write_linear_model

    spec = AssemblerSpec(groups=(GroupSchema("u", 1, ("x",)),), features=(FeatureRef("u", "x"),))
    with carrara.Platform.local(tmp_path) as p:
        good = write_linear_model(tmp_path / "good.onnx", [2.0])
        for artifact in (good.read_bytes(), b"not an onnx model"):
            p.registry.register(
                "m",
                actor=p.actor,
                serving_artifact=artifact,
                framework="onnx",
                serving_spec=serving_spec(spec),
            )
        p.deploy("m", 1)
        with pytest.raises(carrara.CarraraError):
            p.deploy("m", 2)
        active = p.registry.active_deployment("m")
        assert active is not None and active.version == 1
        assert len(p.registry.deployments("m")) == 1
        assert p.predict("m", ["a"], {"x": 1.0}).outputs[0, 0] == 2.0


def test_platform_open_gives_the_features_service_the_event_log(tmp_path: Path) -> None:
    from carrara.config import Settings

    settings = Settings(home=str(tmp_path), event_log_url="local://")  # in memory
    with carrara.Platform.open(settings) as p:
        p.features.apply(_definitions())
        assert p.features.event_log is p.events  # one log, not a second in-memory one
        ids = p.features.publish("profile", [{"user_id": 1, "age": 30, "event_timestamp": 0}])
        assert len(ids) == 1
    settings = Settings(home=str(tmp_path / "file-log"))  # the default local:/// file log
    with carrara.Platform.open(settings) as p:
        assert p.features.event_log is p.events


def test_embedded_training_and_monitor_take_the_clients_calls(tmp_path: Path) -> None:
    """``list``/``cancel``/``logs``/``wait`` and ``monitor.report`` exist embedded too (the
    signatures match the client's: ``test_sdk_signatures``)."""
    from carrara.errors import NotFoundError

    label_path = tmp_path / "labels.parquet"
    pd.DataFrame({"user_id": ["u1"], "event_timestamp": [0], "churned": [1]}).to_parquet(label_path)
    with carrara.Platform.local(tmp_path / "platform") as p:
        p.features.apply(_definitions())
        job = p.training.submit(_spec(label_path, "logistic_regression", {"C": 1.0}))
        assert [j.job_id for j in p.training.list(state="QUEUED")] == [job.job_id]
        assert p.training.cancel(job.job_id).state == "CANCELLED"
        assert p.training.wait(job.job_id, timeout_s=5).state == "CANCELLED"
        assert isinstance(p.training.logs(job.job_id), list)
        assert p.training.run_pending(timeout_s=5) == []
        with pytest.raises(NotFoundError, match="no monitored model"):
            p.monitor.report("churn")
