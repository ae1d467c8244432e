"""The serving loop end to end on the real servers: feature rows -> offline store -> batch
materialization into Redis; an ONNX model registered in a PostgreSQL registry and deployed;
the gateway (gRPC front) answers, and every prediction equals running the ONNX model directly
on the point-in-time-correct feature values (the PIT join as of now)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from carrara.core import AssemblerSpec, FeatureCache, FeatureRef, GroupSchema, serving_spec
from carrara.eventlog import open_event_log
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.gateway.embedded import StoreReader
from carrara.gateway.engine import ServingEngine
from carrara.gateway.grpc_client import predict_stub
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.registry_source import load_active
from carrara.registry.auth import Principal
from carrara.registry.registry import ModelRegistry
from carrara.v1 import predict_pb2
from tests.servers import running_gateway

pytestmark = pytest.mark.integration

ACTOR = Principal("e2e", frozenset({"publisher", "deployer"}))


def test_gateway_predictions_equal_onnx_on_point_in_time_features(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_namespace: str
) -> None:
    defs = Definitions(
        entities=(Entity(name="driver", join_key="driver_id"),),
        groups=(
            FeatureGroup(
                name="trips",
                entity="driver",
                ttl_days=2,
                features=tuple(Feature(name=f"t{i}") for i in range(4)),
            ),
            FeatureGroup(
                name="rating",
                entity="driver",
                ttl_days=30,
                features=(Feature(name="stars"), Feature(name="votes")),
            ),
        ),
    )
    features = FeatureService.open(
        catalog_url=postgres_url,
        offline_path=str(tmp_path / "offline"),
        online_url=f"{redis_url}?namespace={redis_namespace}",
    )
    rng = np.random.default_rng(3)
    now_us = time.time_ns() // 1000
    day = 86_400_000_000
    drivers = [f"d{i}" for i in range(60)]
    try:
        features.apply(defs)
        # Several rows per driver at different times, including stale ones (beyond TTL) and
        # drivers with no rating at all: the latest in-TTL row must win everywhere.
        trips_rows, rating_rows = [], []
        for i, d in enumerate(drivers):
            for age_days in (5.0, 1.5, 0.5) if i % 3 else (5.0,):  # every third: only stale
                trips_rows.append(
                    {
                        "driver_id": d,
                        "event_timestamp": now_us - int(age_days * day),
                        **{f"t{k}": float(rng.normal()) for k in range(4)},
                    }
                )
            if i % 4:
                rating_rows.append(
                    {
                        "driver_id": d,
                        "event_timestamp": now_us - 3 * day,
                        "stars": float(rng.uniform(1, 5)),
                        "votes": float(rng.integers(1, 500)),
                    }
                )
        features.ingest("trips", pd.DataFrame(trips_rows))
        features.ingest("rating", pd.DataFrame(rating_rows))
        features.materialize(full=True)

        trips_v = features.group("trips").version
        rating_v = features.group("rating").version
        spec = AssemblerSpec(
            groups=(
                GroupSchema("trips", trips_v, tuple(f"t{k}" for k in range(4))),
                GroupSchema("rating", rating_v, ("stars", "votes")),
            ),
            features=(
                FeatureRef("trips", "t0"),
                FeatureRef("trips", "t3"),
                FeatureRef("rating", "stars"),
                FeatureRef("rating", "votes"),
            ),
        )
        weights = np.array([0.5, -1.0, 0.25, 0.002], np.float32)
        model_path = write_linear_model(tmp_path / "eta.onnx", weights, 0.1, sigmoid=True)
        events = open_event_log(f"{redis_url}?prefix={redis_namespace}:ev")
        registry = ModelRegistry.open(postgres_url, tmp_path / "artifacts", events=events)
        version = registry.register(
            "eta",
            actor=ACTOR,
            serving_artifact=model_path.read_bytes(),
            framework="onnx",
            feature_store_version=[f"trips:{trips_v}", f"rating:{rating_v}"],
            serving_spec=serving_spec(spec),
        ).version
        registry.deploy("eta", version, actor=ACTOR)

        engine = ServingEngine(StoreReader(features.online), cache=FeatureCache(capacity=1_000))
        assert load_active(registry, engine, ["eta"]) == ["eta"]
        with (
            running_gateway(engine) as server,
            grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
        ):
            call = predict_stub(channel)
            response = call(predict_pb2.PredictRequest(model="eta", entity_ids=drivers))
            again = call(predict_pb2.PredictRequest(model="eta", entity_ids=drivers))  # cached

        # Independent reference: the PIT join as of now, missing -> the spec's default (0.0),
        # then ONNX Runtime directly.
        labels = pd.DataFrame(
            {"driver_id": drivers, "event_timestamp": [now_us + 1_000_000] * len(drivers)}
        )
        labels["event_timestamp"] = pd.to_datetime(labels["event_timestamp"], unit="us", utc=True)
        ts = features.get_training_set(
            labels, ["trips:t0", "trips:t3", "rating:stars", "rating:votes"]
        ).to_pandas()
        ts = ts.set_index("driver_id").loc[drivers]
        columns = ["trips__t0", "trips__t3", "rating__stars", "rating__votes"]
        x = ts[columns].to_numpy(dtype=np.float32, na_value=0.0)
        session = ort.InferenceSession(model_path.read_bytes(), providers=["CPUExecutionProvider"])
        (reference,) = session.run(None, {"features": x})
        got = np.array([p.values[0] for p in response.predictions], np.float32)
        np.testing.assert_allclose(got, reference[:, 0], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got, [p.values[0] for p in again.predictions])
        assert {p.model_version for p in response.predictions} == {version}
        stale = [i for i in range(len(drivers)) if i % 3 == 0]
        assert np.isnan(
            ts["trips__t0"].to_numpy(dtype=float)[stale]
        ).all()  # the reference saw them stale
        registry.close()
        events.close()
    finally:
        features.close()
