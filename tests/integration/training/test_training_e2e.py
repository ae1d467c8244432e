"""A training job end to end: feature groups applied and ingested, labels written, the job
submitted and run by a worker; the registered version carries lineage and a serving spec, its
ONNX model matches sklearn, and it serves through the gateway's OnnxBackend."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import joblib
import msgspec
import numpy as np
import pandas as pd
import pytest

from carrara.core import AssemblerSpec, FeatureCache
from carrara.eventlog import open_event_log
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.embedded import StoreReader
from carrara.gateway.engine import ServingEngine
from carrara.gateway.registry_source import load_active
from carrara.registry.auth import Principal
from carrara.registry.registry import ModelRegistry
from carrara.training.queue import JobEvent, JobQueue
from carrara.training.spec import load_spec
from carrara.training.worker import Worker
from carrara.types import Topic

DAY_US = 86_400_000_000
DEPLOYER = Principal("ci", frozenset({"deployer"}))
T0_US = 1_780_000_000_000_000  # 2026-05-28

SPEC = """
model_name: churn
dataset:
  features: ["activity:a", "activity:b", "profile:age"]
  label_source: labels.parquet
  label_column: churned
  entity_column: user_id
  start: "2026-05-28T00:00:00Z"
  end: "2026-07-01T00:00:00Z"
  validation_fraction: 0.25
model:
  framework: sklearn
  estimator: logistic_regression
  task: classification
  params: {C: 1.0}
"""


def _definitions() -> Definitions:
    return Definitions(
        entities=(Entity(name="user", join_key="user_id"),),
        groups=(
            FeatureGroup(
                name="activity",
                entity="user",
                ttl_days=10,
                features=(Feature(name="a"), Feature(name="b"), Feature(name="c")),
            ),
            FeatureGroup(
                name="profile", entity="user", ttl_days=60, features=(Feature(name="age"),)
            ),
        ),
    )


def _generate(features: FeatureService, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    users = [f"u{i}" for i in range(150)]
    activity: list[dict[str, Any]] = []
    profile: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    for i, u in enumerate(users):
        for day in (0, 5, 10):
            activity.append(
                {
                    "user_id": u,
                    "event_timestamp": T0_US + day * DAY_US,
                    "a": float(rng.normal()),
                    "b": float(rng.normal()),
                    "c": float(rng.normal()),
                }
            )
        if i % 5:  # every fifth user has no profile: filled with the default
            profile.append(
                {"user_id": u, "event_timestamp": T0_US, "age": float(rng.integers(18, 70))}
            )
    features.ingest("activity", pd.DataFrame(activity))
    features.ingest("profile", pd.DataFrame(profile))
    # Labels after each activity row; the PIT value is the latest row at or before it.
    by_user: dict[str, list[dict[str, Any]]] = {}
    for row in activity:
        by_user.setdefault(row["user_id"], []).append(row)
    for u, rows in by_user.items():
        for row in rows:
            ts = row["event_timestamp"] + DAY_US
            logit = 2.0 * row["a"] - 1.5 * row["b"] + rng.normal() * 0.5
            labels.append({"user_id": u, "event_timestamp": ts, "churned": int(logit > 0)})
    pd.DataFrame(labels).to_parquet(tmp_path / "labels.parquet")
    (tmp_path / "job.yaml").write_text(SPEC)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def test_job_trains_exports_and_registers(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    events = open_event_log("local://")
    features = FeatureService.open(catalog_url=url, offline_path=str(tmp_path / "offline"))
    registry = ModelRegistry.open(url, tmp_path / "artifacts")
    queue = JobQueue.open(url, events=events)
    try:
        features.apply(_definitions())
        _generate(features, tmp_path)
        spec = load_spec(tmp_path / "job.yaml")
        job = queue.submit(spec, submitted_by="ana")

        finished = Worker(
            queue, features=features, registry=registry, heartbeat_interval_s=0.2
        ).run(until_idle=True)
        assert [j.job_id for j in finished] == [job.job_id]
        done = queue.get(job.job_id)
        assert done.state == "SUCCEEDED", done.error
        result = done.result
        assert result["columns"] == ["activity__a", "activity__b", "profile__age"]

        v = registry.get_version("churn", result["version"])
        activity_v = features.group("activity").version
        profile_v = features.group("profile").version
        assert v.run_id == job.job_id
        assert v.framework == "sklearn" and v.framework_version
        assert v.native_format == "joblib"
        assert v.feature_store_version == [f"activity:{activity_v}", f"profile:{profile_v}"]
        assert v.training_dataset_ref == result["snapshot_ref"] != ""
        assert v.metrics["auc"] > 0.8 and "log_loss" in v.metrics
        assert v.metrics["onnx_parity_max_abs_diff"] <= 1e-4

        assembler = msgspec.convert(v.serving_spec, AssemblerSpec)
        assert [(g.name, g.version, g.features) for g in assembler.groups] == [
            ("activity", activity_v, ("a", "b", "c")),
            ("profile", profile_v, ("age",)),
        ]
        assert [(f.group, f.feature) for f in assembler.features] == [
            ("activity", "a"),
            ("activity", "b"),
            ("profile", "age"),
        ]
        # Missing ages are filled with the training mean, which is the serving default.
        assert 18.0 <= assembler.features[2].default <= 70.0
        assert [f.default for f in assembler.features] == pytest.approx(result["defaults"])

        # The ONNX model serves through the gateway backend and matches sklearn.
        model = joblib.load(io.BytesIO(registry.load_artifact("churn", v.version, "native")))
        backend_model = OnnxBackend(registry.load_artifact("churn", v.version))
        assert backend_model.info.input_dim == 3 and backend_model.info.output_dim == 1
        x = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
        x[:, 2] = x[:, 2] * 10 + 40
        got = backend_model.infer(x)
        np.testing.assert_allclose(got[:, 0], model.predict_proba(x)[:, 1], atol=1e-4)

        # Deployed and served by the gateway engine: fresh feature rows (profile missing for
        # some users) give exactly sklearn's probability on the same values, with missing
        # ages filled by the registered default.
        now_us = time.time_ns() // 1000
        users = [f"u{i}" for i in range(0, 150, 7)]
        rng = np.random.default_rng(11)
        fresh = pd.DataFrame(
            {
                "user_id": users,
                "event_timestamp": [now_us - 1_000_000] * len(users),
                "a": rng.normal(size=len(users)),
                "b": rng.normal(size=len(users)),
                "c": rng.normal(size=len(users)),
            }
        )
        aged = users[::2]
        ages = rng.integers(18, 70, size=len(aged)).astype(float)
        features.ingest("activity", fresh)
        features.ingest(
            "profile",
            pd.DataFrame(
                {"user_id": aged, "event_timestamp": [now_us - 1_000_000] * len(aged), "age": ages}
            ),
        )
        features.materialize(full=True)
        registry.deploy("churn", v.version, actor=DEPLOYER)
        engine = ServingEngine(StoreReader(features.online), cache=FeatureCache(capacity=1_000))
        try:
            assert load_active(registry, engine, ["churn"]) == ["churn"]
            served = engine.predict("churn", users).outputs[:, 0]
        finally:
            engine.close()
        age_of = dict(zip(aged, ages, strict=True))
        expected_x = np.array(
            [
                [a, b, age_of.get(u, assembler.features[2].default)]
                for u, a, b in zip(users, fresh["a"], fresh["b"], strict=True)
            ],
            np.float32,
        )
        np.testing.assert_allclose(served, model.predict_proba(expected_x)[:, 1], atol=1e-4)
    finally:
        queue.close()
        registry.close()
        features.close()

    states = [
        msgspec.json.decode(e.payload, type=JobEvent).state
        for e in events.read(Topic.TRAINING_EVENTS, "t", "c", count=10)
    ]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_failed_job_records_the_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with (
        FeatureService.open(catalog_url=url, offline_path=str(tmp_path / "offline")) as features,
        ModelRegistry.open(url, tmp_path / "artifacts") as registry,
        JobQueue.open(url) as queue,
    ):
        features.apply(_definitions())
        (tmp_path / "job.yaml").write_text(SPEC)  # no labels file
        job = queue.submit(load_spec(tmp_path / "job.yaml"))
        (done,) = Worker(queue, features=features, registry=registry).run(until_idle=True)
        assert done.job_id == job.job_id and done.state == "FAILED"
        assert "labels.parquet does not exist" in done.error
        assert registry.list_models() == []
