"""Deployments: split validation, history, rollback, and publishing on the event log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carrara.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from carrara.eventlog import EventLog, open_event_log
from carrara.registry import (
    Deployment,
    ModelRegistry,
    TrafficSplit,
    VariantSplit,
    VersionRef,
)
from carrara.registry.deployments import decode_deployment
from carrara.types import Topic

from .conftest import DEPLOYER, PUBLISHER, register, snapshot


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.integration)])
def events(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    if request.param == "local":
        url = f"local:///{tmp_path / 'events.db'}"
    else:
        namespace = request.getfixturevalue("redis_namespace")
        url = f"{request.getfixturevalue('redis_url')}?prefix={namespace}"
    log = open_event_log(url)
    try:
        yield log
    finally:
        log.close()


@pytest.fixture
def published(registry: ModelRegistry, events: EventLog) -> ModelRegistry:
    registry.events = events
    return registry


def _canary(stable: int, canary: int, canary_bp: int = 1_000) -> TrafficSplit:
    return TrafficSplit(
        variants=[
            VariantSplit(name="stable", version=stable, weight_bp=10_000 - canary_bp),
            VariantSplit(name="canary", version=canary, weight_bp=canary_bp, canary=True),
        ],
        shadows=[VersionRef(name="shadow", version=3)],
        fallback=VersionRef(name="stable", version=stable),
    )


def _read_all(log: EventLog) -> list[Deployment]:
    events = log.read(Topic.DEPLOYMENTS, "gateways", "gw-1", count=100)
    log.ack(Topic.DEPLOYMENTS, "gateways", [e.id for e in events])
    return [decode_deployment(e.payload) for e in events]


def test_deploy_history_rollback_and_events(published: ModelRegistry, events: EventLog) -> None:
    reg = published
    spec = {"groups": [{"name": "trips", "version": 3}], "features": ["trips.fare_mean"]}
    for _ in range(3):
        register(reg, serving_spec=spec)
    first = reg.deploy("fraud", 1, actor=DEPLOYER, serving_endpoint="gw-eu")
    assert first.traffic_split.variants == [VariantSplit(name="v1", version=1, weight_bp=10_000)]
    second = reg.deploy("fraud", 2, _canary(1, 2), actor=DEPLOYER)
    assert [(v.name, v.version, v.role, v.weight_bp) for v in second.variants] == [
        ("stable", 1, "routed", 9_000),
        ("canary", 2, "routed", 1_000),
        ("shadow", 3, "shadow", 0),
    ]
    assert {v.artifact_sha256 for v in second.variants} == {
        reg.get_version("fraud", n).artifact_sha256 for n in (1, 2, 3)
    }
    active = reg.active_deployment("fraud")
    assert active is not None and active.deployment_id == second.deployment_id
    back = reg.rollback("fraud", actor=DEPLOYER)
    assert back.rollback_of == second.deployment_id
    assert back.traffic_split == first.traffic_split and back.serving_endpoint == "gw-eu"
    history = reg.deployments("fraud")
    assert [(d.deployment_id, d.is_active) for d in history] == [
        (first.deployment_id, False),
        (second.deployment_id, False),
        (back.deployment_id, True),
    ]
    # Gateways see each change, in order, with what they need to load it.
    seen = _read_all(events)
    assert [(d.deployment_id, d.version, d.rollback_of) for d in seen] == [
        (first.deployment_id, 1, None),
        (second.deployment_id, 2, None),
        (back.deployment_id, 1, second.deployment_id),
    ]
    assert seen[1].variants == second.variants
    assert all(v.serving_spec == spec for d in seen for v in d.variants)
    assert reg.publish_pending() == 0  # nothing left in the outbox
    actions = [a.action for a in reg.audit("fraud") if a.action.startswith("deployment.")]
    assert actions == ["deployment.create", "deployment.create", "deployment.rollback"]


def test_rollback_without_history_is_refused(registry: ModelRegistry) -> None:
    register(registry)
    with pytest.raises(FailedPreconditionError, match="not deployed"):
        registry.rollback("fraud", actor=DEPLOYER)
    registry.deploy("fraud", 1, actor=DEPLOYER)
    before = snapshot(registry)
    with pytest.raises(FailedPreconditionError, match="no earlier deployment"):
        registry.rollback("fraud", actor=DEPLOYER)
    assert snapshot(registry) == before


@pytest.mark.parametrize(
    ("split", "error", "message"),
    [
        (
            TrafficSplit(
                variants=[
                    VariantSplit(name="a", version=1, weight_bp=6_000),
                    VariantSplit(name="b", version=2, weight_bp=3_000),
                ]
            ),
            InvalidArgumentError,
            "sum to 9000 bp",
        ),
        (
            TrafficSplit(variants=[VariantSplit(name="a", version=2, weight_bp=10_000)]),
            InvalidArgumentError,
            "routes no traffic to version 1",
        ),
        (
            TrafficSplit(
                variants=[
                    VariantSplit(name="a", version=1, weight_bp=5_000),
                    VariantSplit(name="a", version=2, weight_bp=5_000),
                ]
            ),
            InvalidArgumentError,
            "used twice",
        ),
        (
            TrafficSplit(
                variants=[VariantSplit(name="a", version=1, weight_bp=10_000, canary=True)]
            ),
            InvalidArgumentError,
            "canary",
        ),
        (
            TrafficSplit(
                variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
                shadows=[VersionRef(name="s", version=9)],
            ),
            NotFoundError,
            r"version\(s\) \[9\].*latest is 3",
        ),
        (
            TrafficSplit(
                variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
                fallback=VersionRef(name="old", version=3),
            ),
            FailedPreconditionError,
            r"archived version\(s\) \[3\]",
        ),
        (
            TrafficSplit(
                variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
                fallback=VersionRef(name="a", version=2),
            ),
            InvalidArgumentError,
            "match the version",
        ),
    ],
)
def test_bad_split_is_refused_and_changes_nothing(
    registry: ModelRegistry, split: TrafficSplit, error: type[Exception], message: str
) -> None:
    for _ in range(3):
        register(registry)
    registry.archive("fraud", 3, actor=DEPLOYER)
    registry.deploy("fraud", 2, actor=DEPLOYER)
    before = snapshot(registry)
    with pytest.raises(error, match=message):
        registry.deploy("fraud", 1, split, actor=DEPLOYER)
    assert snapshot(registry) == before


def test_deploy_needs_deployer_and_known_model(registry: ModelRegistry) -> None:
    register(registry)
    before = snapshot(registry)
    with pytest.raises(PermissionDeniedError):
        registry.deploy("fraud", 1, actor=PUBLISHER)
    with pytest.raises(NotFoundError, match="model 'nope' does not exist"):
        registry.deploy("nope", 1, actor=DEPLOYER)
    with pytest.raises(NotFoundError, match="has no version 4; latest is 1"):
        registry.deploy("fraud", 4, actor=DEPLOYER)
    assert snapshot(registry) == before


def test_archiving_a_deployed_version_is_refused(registry: ModelRegistry) -> None:
    register(registry)
    registry.deploy("fraud", 1, actor=DEPLOYER)
    with pytest.raises(FailedPreconditionError, match="active deployment"):
        registry.archive("fraud", 1, actor=DEPLOYER)


def test_event_log_outage_keeps_the_event_in_the_outbox(registry: ModelRegistry) -> None:
    class Down:
        def __init__(self) -> None:
            self.up = False
            self.sent: list[tuple[str, bytes]] = []

        def append(self, topic: str, payload: bytes) -> str:
            if not self.up:
                raise ConnectionError("event log down")
            self.sent.append((topic, payload))
            return str(len(self.sent))

    log = Down()
    registry.events = log
    register(registry)
    with pytest.raises(UnavailableError, match="recorded but not yet published"):
        registry.deploy("fraud", 1, actor=DEPLOYER)
    # The deployment itself committed; its event waits in the outbox.
    assert registry.active_deployment("fraud") is not None
    log.up = True
    assert registry.publish_pending() == 1
    assert [t for t, _ in log.sent] == [Topic.DEPLOYMENTS]
    assert registry.publish_pending() == 0


def test_deploy_refuses_a_tampered_artifact_and_records_nothing(
    published: ModelRegistry, events: EventLog
) -> None:
    reg = published
    register(reg)
    register(reg)
    reg.deploy("fraud", 1, actor=DEPLOYER)
    _read_all(events)
    path = Path(reg.get_version("fraud", 2).artifact_path)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"tampered")
    before = snapshot(reg)
    with pytest.raises(FailedPreconditionError, match="fails its integrity check"):
        reg.deploy("fraud", 2, actor=DEPLOYER)
    assert snapshot(reg) == before  # no active row, no history, no outbox event
    active = reg.active_deployment("fraud")
    assert active is not None and active.version == 1
    assert _read_all(events) == []
    # A missing artifact is refused the same way.
    path.unlink()
    with pytest.raises(NotFoundError, match="missing from the artifact store"):
        reg.deploy("fraud", 2, actor=DEPLOYER)
    assert snapshot(reg) == before


def test_deploy_refused_by_prepare_records_nothing(registry: ModelRegistry) -> None:
    register(registry)
    before = snapshot(registry)
    seen: list[Deployment] = []

    def prepare(d: Deployment) -> None:
        seen.append(d)
        raise FailedPreconditionError("the embedded gateway cannot load it")

    with pytest.raises(FailedPreconditionError, match="cannot load it"):
        registry.deploy("fraud", 1, actor=DEPLOYER, prepare=prepare)
    assert [d.version for d in seen] == [1]
    assert snapshot(registry) == before
    assert registry.active_deployment("fraud") is None


def test_high_stakes_live_traffic_needs_an_approval(registry: ModelRegistry) -> None:
    from .conftest import ADMIN, APPROVER

    registry.create_model("fraud", actor=ADMIN, high_stakes=True)
    for _ in range(3):
        register(registry)
    before = snapshot(registry)
    # All traffic, a canary, or the fallback: each is live traffic to an unapproved version.
    for split in (
        None,
        _canary(1, 2),
        TrafficSplit(
            variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
            fallback=VersionRef(name="b", version=2),
        ),
    ):
        with pytest.raises(FailedPreconditionError, match=r"high-stakes.*no approval"):
            registry.deploy("fraud", 1, split, actor=DEPLOYER)
    assert snapshot(registry) == before
    # A shadow answers nobody: allowed once the routed version is approved.
    registry.approve("fraud", 1, actor=APPROVER)
    shadowed = TrafficSplit(
        variants=[VariantSplit(name="a", version=1, weight_bp=10_000)],
        shadows=[VersionRef(name="s", version=3)],
    )
    assert registry.deploy("fraud", 1, shadowed, actor=DEPLOYER).version == 1
    with pytest.raises(FailedPreconditionError, match=r"version\(s\) \[2\] have no approval"):
        registry.deploy("fraud", 1, _canary(1, 2), actor=DEPLOYER)
    registry.approve("fraud", 2, actor=APPROVER)
    assert registry.deploy("fraud", 2, _canary(1, 2), actor=DEPLOYER).version == 2
