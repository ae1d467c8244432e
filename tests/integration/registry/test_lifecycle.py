"""Promotion gates, approvals, the one-PRODUCTION rule, audit, and concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from carrara.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from carrara.registry import Gate, ModelRegistry
from carrara.registry.auth import require_role

from .conftest import ADMIN, APPROVER, DEPLOYER, PUBLISHER, register, snapshot

GATES = [Gate(metric="auc", dataset="holdout", threshold=0.8, max_regression=0.02)]


def _statuses(reg: ModelRegistry, name: str = "fraud") -> dict[int, str]:
    return {v.version: v.status for v in reg.list_versions(name)}


def _auc(value: float) -> dict[str, dict[str, float]]:
    return {"holdout": {"auc": value}}


def test_promote_archives_previous_production(registry: ModelRegistry) -> None:
    registry.create_model("fraud", actor=ADMIN, gates=GATES)
    register(registry, evaluations=_auc(0.85))
    register(registry, evaluations=_auc(0.86))
    first = registry.promote("fraud", 1, actor=DEPLOYER)
    assert first.archived_version is None
    assert [(r.gate, r.passed) for r in first.gate_results] == [
        ("threshold", True),
        ("regression", True),
    ]
    second = registry.promote("fraud", 2, actor=DEPLOYER)
    assert second.archived_version == 1
    assert second.version.status == "PRODUCTION" and second.version.promoted_by == "ops"
    assert _statuses(registry) == {1: "ARCHIVED", 2: "PRODUCTION"}
    assert registry.get_model("fraud").production_version == 2
    changes = [
        (a.version, a.detail["from"], a.detail["to"])
        for a in registry.audit("fraud")
        if a.action == "version.status"
    ]
    assert changes == [
        (1, "STAGING", "PRODUCTION"),
        (1, "PRODUCTION", "ARCHIVED"),
        (2, "STAGING", "PRODUCTION"),
    ]


@pytest.mark.parametrize(
    ("candidate", "passes", "message"),
    [
        (0.79, False, "auc@holdout = 0.79, must be at least 0.8"),  # under the threshold
        (0.879, False, "may be worse by at most 0.02"),  # 0.021 worse than production 0.9
        (0.881, True, ""),  # 0.019 worse: inside the margin
        (0.95, True, ""),
    ],
)
def test_gates_threshold_and_regression_margin(
    registry: ModelRegistry, candidate: float, passes: bool, message: str
) -> None:
    registry.create_model("fraud", actor=ADMIN, gates=GATES)
    register(registry, evaluations=_auc(0.9))
    registry.promote("fraud", 1, actor=DEPLOYER)
    register(registry, evaluations=_auc(candidate))
    if passes:
        registry.promote("fraud", 2, actor=DEPLOYER)
        assert _statuses(registry) == {1: "ARCHIVED", 2: "PRODUCTION"}
        return
    with pytest.raises(FailedPreconditionError, match="refused") as exc:
        registry.promote("fraud", 2, actor=DEPLOYER)
    assert message in str(exc.value)
    assert _statuses(registry) == {1: "PRODUCTION", 2: "STAGING"}
    # The refusal is on record: its gate results and an audit entry.
    assert not all(r.passed for r in registry.gate_results("fraud", 2))
    assert registry.audit("fraud")[-1].action == "version.promote_refused"


def test_lower_is_better_metric(registry: ModelRegistry) -> None:
    gate = Gate(
        metric="rmse", dataset="eval", threshold=5.0, max_regression=0.5, higher_is_better=False
    )
    registry.create_model("eta", actor=ADMIN, gates=[gate])
    register(registry, "eta", evaluations={"eval": {"rmse": 4.0}})
    registry.promote("eta", 1, actor=DEPLOYER)
    register(registry, "eta", evaluations={"eval": {"rmse": 4.6}})  # 0.6 worse
    with pytest.raises(FailedPreconditionError, match=r"worse by at most 0\.5"):
        registry.promote("eta", 2, actor=DEPLOYER)
    register(registry, "eta", evaluations={"eval": {"rmse": 4.4}})
    registry.promote("eta", 3, actor=DEPLOYER)


def test_missing_evaluation_refuses_then_recorded_evaluation_passes(
    registry: ModelRegistry,
) -> None:
    registry.create_model("fraud", actor=ADMIN, gates=GATES)
    register(registry)
    with pytest.raises(
        FailedPreconditionError, match="no 'auc' recorded on evaluation dataset 'holdout'"
    ):
        registry.promote("fraud", 1, actor=DEPLOYER)
    registry.record_evaluation("fraud", 1, "holdout", {"auc": 0.83}, actor=PUBLISHER)
    assert registry.promote("fraud", 1, actor=DEPLOYER).version.status == "PRODUCTION"


def test_evaluator_hook_fills_missing_metrics(db_url: str, tmp_path: object) -> None:
    calls: list[tuple[int, str]] = []

    def evaluator(v: object, dataset: str) -> dict[str, float]:
        calls.append((getattr(v, "version", -1), dataset))
        return {"auc": 0.88}

    with ModelRegistry.open(db_url, f"{tmp_path}/a", evaluator=evaluator) as reg:
        reg.create_model("fraud", actor=ADMIN, gates=GATES)
        register(reg)
        reg.promote("fraud", 1, actor=DEPLOYER)
        assert calls == [(1, "holdout")]
        assert reg.get_version("fraud", 1).evaluations == {"holdout": {"auc": 0.88}}


def test_high_stakes_needs_an_approver(registry: ModelRegistry) -> None:
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    register(registry, "credit")
    with pytest.raises(
        FailedPreconditionError, match="needs an approval from a user with the 'approver' role"
    ):
        registry.promote("credit", 1, actor=ADMIN)
    before = snapshot(registry)
    # Deployers and admins cannot approve: approval is a separate role.
    for who in (DEPLOYER, ADMIN):
        with pytest.raises(PermissionDeniedError, match="role 'approver'"):
            registry.approve("credit", 1, actor=who)
    assert snapshot(registry) == before
    registry.approve("credit", 1, actor=APPROVER, comment="reviewed fairness report")
    with pytest.raises(AlreadyExistsError):
        registry.approve("credit", 1, actor=APPROVER)
    result = registry.promote("credit", 1, actor=ADMIN)
    assert result.version.status == "PRODUCTION"
    assert [a.approver for a in registry.approvals("credit", 1)] == ["bob"]
    actions = [a.action for a in registry.audit("credit")]
    assert actions == [
        "model.create",
        "version.register",
        "version.promote_refused",
        "version.approve",
        "version.status",
    ]
    assert registry.audit("credit")[-1].detail["approvers"] == ["bob"]


def test_archived_and_production_versions_cannot_be_promoted(registry: ModelRegistry) -> None:
    register(registry)
    register(registry)
    registry.promote("fraud", 1, actor=DEPLOYER)
    before = snapshot(registry)
    with pytest.raises(FailedPreconditionError, match="already the PRODUCTION version"):
        registry.promote("fraud", 1, actor=DEPLOYER)
    assert snapshot(registry) == before
    registry.promote("fraud", 2, actor=DEPLOYER)
    with pytest.raises(FailedPreconditionError, match="archived versions cannot return"):
        registry.promote("fraud", 1, actor=DEPLOYER)


def test_role_errors() -> None:
    with pytest.raises(UnauthenticatedError, match="bearer token"):
        require_role(None, "deployer", "promoting")
    with pytest.raises(PermissionDeniedError, match="has roles: publisher"):
        require_role(PUBLISHER, "deployer", "promoting")
    assert require_role(ADMIN, "deployer", "promoting") is ADMIN


def test_concurrent_registrations_get_consecutive_numbers(
    registry: ModelRegistry, db_url: str, tmp_path: Path
) -> None:
    n = 16
    # Four independent registries (own pools/connections, as separate processes would have)
    # plus the fixture's, all racing to register the first and following versions.
    others = [ModelRegistry.open(db_url, tmp_path / "artifacts") for _ in range(3)]
    writers = [registry, *others]
    try:
        with ThreadPoolExecutor(n) as pool:
            versions = list(
                pool.map(
                    lambda i: register(writers[i % len(writers)], run_id=f"job-{i}").version,
                    range(n),
                )
            )
    finally:
        for other in others:
            other.close()
    assert sorted(versions) == list(range(1, n + 1))
    listed = registry.list_versions("fraud")
    assert [v.version for v in listed] == list(range(1, n + 1))
    assert sorted(v.run_id for v in listed) == sorted(f"job-{i}" for i in range(n))
    assert registry.get_model("fraud").latest_version == n


def test_concurrent_promotions_leave_one_production(registry: ModelRegistry) -> None:
    n = 8
    for _ in range(n):
        register(registry)

    def promote(version: int) -> bool:
        try:
            registry.promote("fraud", version, actor=DEPLOYER)
        except FailedPreconditionError:
            return False
        return True

    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(promote, range(1, n + 1)))
    statuses = _statuses(registry)
    production = [v for v, s in statuses.items() if s == "PRODUCTION"]
    assert len(production) == 1
    # Every promotion that succeeded archived its predecessor (none failed: no gates).
    assert all(outcomes)
    assert sorted(s for s in statuses.values()) == ["ARCHIVED"] * (n - 1) + ["PRODUCTION"]
    last = [
        a
        for a in registry.audit("fraud")
        if a.action == "version.status" and a.detail["to"] == "PRODUCTION"
    ][-1]
    assert last.version == production[0]
