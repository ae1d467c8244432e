"""The gateway follows the registry: initial load, hot swap on a `deployments` event under
continuous load (no failed request), rollback, and refusal of a tampered artifact."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, encode_feature_vector
from carrara.errors import NotFoundError
from carrara.eventlog import EventLog, open_event_log
from carrara.gateway.engine import ServingEngine
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.registry_source import DeploymentWatcher, load_active, serving_spec
from carrara.registry.auth import Principal
from carrara.registry.registry import ModelRegistry
from carrara.registry.types import TrafficSplit, VariantSplit

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


def register(registry: ModelRegistry, tmp_path: Path, weight: float) -> int:
    path = write_linear_model(tmp_path / f"w{weight}.onnx", [weight])
    version = registry.register(
        "scorer",
        actor=ACTOR,
        serving_artifact=path.read_bytes(),
        framework="onnx",
        feature_store_version=["u:1"],
        serving_spec=serving_spec(SPEC),
    )
    return version.version


def test_follow_the_registry(setup: tuple[ModelRegistry, EventLog], tmp_path: Path) -> None:
    registry, log = setup
    v1 = register(registry, tmp_path, 1.0)
    v2 = register(registry, tmp_path, 2.0)
    registry.deploy("scorer", v1, actor=ACTOR)
    engine = ServingEngine(Store())
    with pytest.raises(NotFoundError, match="model 'unknown' does not exist"):
        load_active(registry, engine, ["unknown"])
    assert load_active(registry, engine, ["scorer"]) == ["scorer"]
    assert engine.predict("scorer", ["a"]).outputs[0, 0] == 1.0

    changes: list[int] = []
    watcher = DeploymentWatcher(
        registry, engine, log, poll_ms=50, on_change=lambda m, d: changes.append(d)
    )
    watcher.start()
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

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 20
        while len(changes) < n:
            assert time.monotonic() < deadline, "deployment event not applied"
            time.sleep(0.02)

    try:
        # The first deploy's event is also in the log: the watcher re-applies it (idempotent).
        split = TrafficSplit(
            variants=[
                VariantSplit(name="old", version=v1, weight_bp=5_000),
                VariantSplit(name="new", version=v2, weight_bp=5_000),
            ]
        )
        registry.deploy("scorer", v2, split, actor=ACTOR)
        wait_for(2)
        time.sleep(0.2)
        assert outputs >= {1.0, 2.0}
        names = {v.name for v in engine.deployment("scorer").variants}
        assert names == {"old", "new"}

        registry.rollback("scorer", actor=ACTOR)
        wait_for(3)
        assert [v.version for v in engine.deployment("scorer").variants] == [v1]

        # Tamper with v2's artifact, then deploy it: the gateway refuses it and keeps v1.
        artifact = registry.get_version("scorer", v2).artifact_path
        os.chmod(artifact, 0o644)
        Path(artifact).write_bytes(Path(artifact).read_bytes() + b"tampered")
        failed = watcher.failed
        registry.deploy("scorer", v2, actor=ACTOR)
        deadline = time.monotonic() + 20
        while watcher.failed == failed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [v.version for v in engine.deployment("scorer").variants] == [v1]
        assert engine.predict("scorer", ["z"]).outputs[0, 0] == 1.0
    finally:
        stop.set()
        for t in threads:
            t.join()
        watcher.stop()
        engine.close()
    assert not errors, errors[:3]
    assert np.isfinite(list(outputs)).all()
