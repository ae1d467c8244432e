"""The gateway follows the registry through `deployments` events alone: hot swap under load
(no failed request), rollback, refusal of a bad artifact, restart from local state with the
event log and the artifact store down, a follower that outlives event-log outages and
PostgreSQL session kills, and no consumer group left behind."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import numpy as np
import pytest
import redis

from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, encode_feature_vector, serving_spec
from carrara.errors import NotFoundError
from carrara.eventlog import EventLog, open_event_log
from carrara.gateway.engine import ServingEngine
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.registry_source import DeploymentFollower, load_active
from carrara.gateway.service import Gateway
from carrara.registry.artifacts import ArtifactStore
from carrara.registry.auth import Principal
from carrara.registry.registry import ModelRegistry
from carrara.registry.types import TrafficSplit, VariantSplit
from carrara.types import Topic

from .conftest import PrivateRedis

SPEC = AssemblerSpec(groups=(GroupSchema("u", 1, ("x",)),), features=(FeatureRef("u", "x"),))
ACTOR = Principal("ci", frozenset({"publisher", "deployer"}))


class Store:
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [encode_feature_vector(k.rsplit(":", 1)[-1], "u", 1, [1.0]) for k in keys]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def setup(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ModelRegistry, EventLog]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
        log = open_event_log(f"local:///{tmp_path / 'events.db'}")
    else:
        url = request.getfixturevalue("postgres_url")
        ns = request.getfixturevalue("redis_namespace")
        redis_url = request.getfixturevalue("redis_url")
        log = open_event_log(f"{redis_url}?prefix={ns}")
    registry = ModelRegistry.open(url, tmp_path / "artifacts", events=log)
    yield registry, log
    registry.close()
    log.close()


def register(registry: ModelRegistry, tmp_path: Path, weight: float, model: str = "scorer") -> int:
    path = write_linear_model(tmp_path / f"{model}-w{weight}.onnx", [weight])
    version = registry.register(
        model,
        actor=ACTOR,
        serving_artifact=path.read_bytes(),
        framework="onnx",
        feature_store_version=["u:1"],
        serving_spec=serving_spec(SPEC),
    )
    return version.version


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def follower(
    engine: ServingEngine, log: EventLog, artifacts: Path | None, state: Path, **kw: object
) -> DeploymentFollower:
    store = ArtifactStore(artifacts) if artifacts is not None else None
    return DeploymentFollower(engine, log, store, state_dir=state, poll_ms=50, **kw)  # type: ignore[arg-type]


def test_load_active_in_process(setup: tuple[ModelRegistry, EventLog], tmp_path: Path) -> None:
    registry, _ = setup
    registry.deploy("scorer", register(registry, tmp_path, 1.0), actor=ACTOR)
    engine = ServingEngine(Store())
    try:
        with pytest.raises(NotFoundError, match="model 'unknown' does not exist"):
            load_active(registry, engine, ["unknown"])
        assert load_active(registry, engine, ["scorer"]) == ["scorer"]
        assert engine.predict("scorer", ["a"]).outputs[0, 0] == 1.0
    finally:
        engine.close()


def test_follow_the_registry(setup: tuple[ModelRegistry, EventLog], tmp_path: Path) -> None:
    registry, log = setup
    v1 = register(registry, tmp_path, 1.0)
    v2 = register(registry, tmp_path, 2.0)
    v3 = register(registry, tmp_path, 3.0)
    registry.deploy("scorer", v3, actor=ACTOR)  # replaced below before the gateway starts
    registry.deploy("scorer", v1, actor=ACTOR)
    engine = ServingEngine(Store())
    changes: list[int] = []
    f = follower(
        engine,
        log,
        tmp_path / "artifacts",
        tmp_path / "state",
        on_change=lambda m, d: changes.append(d),
    )
    assert f.restore() == []  # no local state yet
    f.start()
    # The replay of the topic loads only the newest deployment of the model.
    wait_until(lambda: len(changes) == 1, "initial deployment not applied")
    assert [v.version for v in engine.deployment("scorer").variants] == [v1]
    assert f.applied == 1

    errors: list[BaseException] = []
    outputs: set[float] = set()
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                outputs.add(float(engine.predict("scorer", [f"e{i % 1000}"]).outputs[0, 0]))
            except BaseException as exc:
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        split = TrafficSplit(
            variants=[
                VariantSplit(name="old", version=v1, weight_bp=5_000),
                VariantSplit(name="new", version=v2, weight_bp=5_000),
            ]
        )
        registry.deploy("scorer", v2, split, actor=ACTOR)
        wait_until(lambda: len(changes) == 2, "hot swap not applied")
        time.sleep(0.2)
        assert outputs >= {1.0, 2.0}
        assert {v.name for v in engine.deployment("scorer").variants} == {"old", "new"}

        registry.rollback("scorer", actor=ACTOR)
        wait_until(lambda: len(changes) == 3, "rollback not applied")
        assert [v.version for v in engine.deployment("scorer").variants] == [v1]

        # An event whose artifact does not match its sha256 (published by hand: the registry
        # itself refuses such a deploy) is refused; v1 keeps serving.
        active = registry.active_deployment("scorer")
        assert active is not None
        forged = msgspec.structs.replace(
            active,
            deployment_id=active.deployment_id + 100,
            variants=[msgspec.structs.replace(active.variants[0], artifact_sha256="0" * 64)],
        )
        failed = f.failed
        log.append(Topic.DEPLOYMENTS, msgspec.json.encode(forged))
        wait_until(lambda: f.failed > failed, "forged deployment not refused")
        assert [v.version for v in engine.deployment("scorer").variants] == [v1]
        status = f.status().models["scorer"]
        assert status.state == "serving" and status.failed_deployment_id == forged.deployment_id
        assert "integrity" in (status.error or "")
        # An older event arriving late (a replay) never undoes the newer deployment.
        log.append(Topic.DEPLOYMENTS, msgspec.json.encode(registry.deployments("scorer")[1]))
        time.sleep(0.5)
        assert [v.version for v in engine.deployment("scorer").variants] == [v1]
    finally:
        stop.set()
        for t in threads:
            t.join()
        f.stop()
        engine.close()
    assert not errors, errors[:3]
    assert np.isfinite(list(outputs)).all()


def test_restart_from_local_state_with_everything_down(tmp_path: Path) -> None:
    """A restarted gateway serves its last good state with the event log gone and the
    artifact store emptied; a model whose state is broken is unavailable, the other serves."""
    registry = ModelRegistry.open(
        f"sqlite:///{tmp_path / 'registry.db'}",
        tmp_path / "artifacts",
        events=(log := open_event_log(f"local:///{tmp_path / 'events.db'}")),
    )
    registry.deploy("scorer", register(registry, tmp_path, 2.0), actor=ACTOR)
    registry.deploy("other", register(registry, tmp_path, 5.0, model="other"), actor=ACTOR)
    engine = ServingEngine(Store())
    f = follower(engine, log, tmp_path / "artifacts", tmp_path / "state")
    f.start()
    wait_until(lambda: f.applied == 2, "deployments not applied")
    f.stop()
    engine.close()
    registry.close()
    log.close()

    # Everything the gateway read is gone: the registry database, the event log, the store.
    (tmp_path / "registry.db").unlink()
    (tmp_path / "events.db").unlink()
    shutil.rmtree(tmp_path / "artifacts")
    # ... and one model's cached artifact is corrupted.
    state = msgspec.json.decode((tmp_path / "state" / "deployments.json").read_bytes())
    other_sha = state["deployments"]["other"]["variants"][0]["artifact_sha256"]
    (tmp_path / "state" / "artifacts" / f"{other_sha}.onnx").write_bytes(b"garbage")

    class DownLog:
        def read_after(self, *args: object, **kw: object) -> list[object]:
            raise ConnectionError("event log unreachable")

    engine = ServingEngine(Store())
    f = DeploymentFollower(
        engine,
        DownLog(),  # type: ignore[arg-type]
        ArtifactStore(tmp_path / "artifacts-empty"),
        state_dir=tmp_path / "state",
        backoff_s=(0.05, 0.1),
    )
    gateway = Gateway(engine, follower=f, max_staleness_s=0.5)
    try:
        assert f.restore() == ["scorer"]
        f.start()
        assert engine.predict("scorer", ["a"]).outputs[0, 0] == 2.0
        assert f.unavailable().keys() == {"other"}
        with pytest.raises(NotFoundError):
            engine.predict("other", ["a"])
        wait_until(lambda: "ConnectionError" in (f.status().last_error or ""), "no read error")
        time.sleep(0.6)
        ready, body = gateway.readiness()
        assert not ready  # stale past max_staleness_s
        assert body["deployments"]["connected"] is False
        assert body["deployments"]["stale_s"] > 0.5
        assert body["unavailable"].keys() == {"other"}
        metrics = gateway.metrics.render().decode()
        assert 'carrara_model_available{model="other"} 0.0' in metrics
        assert 'carrara_model_available{model="scorer"} 1.0' in metrics
        assert "carrara_deployments_connected 0.0" in metrics
        assert f.alive
    finally:
        f.stop()
        engine.close()


@pytest.mark.integration
def test_follower_outlives_event_log_and_database_faults(
    private_redis: PrivateRedis, postgres_url: str, tmp_path: Path
) -> None:
    """The gateway's follower keeps going through a Redis kill and restart and through
    PostgreSQL sessions being terminated (it never holds one), and leaves no consumer group."""
    import psycopg

    url = f"redis://127.0.0.1:{private_redis.port}/0"
    log = open_event_log(url)
    registry = ModelRegistry.open(postgres_url, tmp_path / "artifacts", events=log)
    v1 = register(registry, tmp_path, 1.0)
    v2 = register(registry, tmp_path, 2.0)
    v3 = register(registry, tmp_path, 3.0)
    registry.deploy("scorer", v1, actor=ACTOR)
    engine = ServingEngine(Store())
    gateway_log = open_event_log(url)
    f = follower(
        engine, gateway_log, tmp_path / "artifacts", tmp_path / "state", backoff_s=(0.05, 0.2)
    )
    gateway = Gateway(engine, follower=f)
    f.start()
    try:
        wait_until(lambda: f.applied == 1, "first deployment not applied")
        # Every session of the registry's database is terminated.
        dbname = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_url.rsplit("/", 1)[0] + "/test", autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        registry.deploy("scorer", v2, actor=ACTOR)  # the registry reconnects
        wait_until(lambda: f.applied == 2, "deploy after the session kill not applied")
        assert engine.predict("scorer", ["a"]).outputs[0, 0] == 2.0

        # The event log goes away: the follower reports it and keeps serving.
        private_redis.kill()
        wait_until(lambda: not f.status().connected, "follower did not notice the outage")
        assert engine.predict("scorer", ["a"]).outputs[0, 0] == 2.0
        ready, body = gateway.readiness()
        assert ready and body["deployments"]["last_error"]
        private_redis.start()  # empty: the stream is recreated by the next deploy
        # The registry's outbox re-publishes nothing old; a new deploy arrives.
        registry.deploy("scorer", v3, actor=ACTOR)
        wait_until(lambda: f.applied == 3, "deploy after the event-log restart not applied")
        assert f.status().connected and f.alive
        assert engine.predict("scorer", ["a"]).outputs[0, 0] == 3.0
        client = redis.Redis(port=private_redis.port)
        groups = client.xinfo_groups(f"carrara:events:{Topic.DEPLOYMENTS}")
        client.close()
        assert groups == []  # following leaves no consumer group behind
    finally:
        f.stop()
        engine.close()
        registry.close()
        gateway_log.close()
        log.close()
