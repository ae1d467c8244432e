"""Rejections and the approval queue: an approver's latest decision gates a high-stakes
promotion (and live traffic), ``pending_approvals`` lists what waits for one, over the SDK,
HTTP and the CLI, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from carrara import errors
from carrara.cli import main
from carrara.registry import ModelRegistry, Principal, TrafficSplit, VariantSplit
from carrara.registry.api import create_app
from carrara.registry.client import TOKEN_ACTOR, RegistryClient
from carrara.registry.migrations import COMPONENT, MIGRATIONS
from carrara.sql import connect

from .conftest import ADMIN, APPROVER, DEPLOYER, READER, register, serve, snapshot

CAROL = Principal("carol", frozenset({"approver"}))


def _pending(reg: ModelRegistry | RegistryClient) -> list[tuple[str, int, list[str]]]:
    return [
        (p.model, p.version, [d.decision for d in p.decisions]) for p in reg.pending_approvals()
    ]


def test_a_rejection_blocks_promotion_until_a_new_approval(registry: ModelRegistry) -> None:
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    register(registry, "credit", metrics={"auc": 0.91})
    assert _pending(registry) == [("credit", 1, [])]

    registry.approve("credit", 1, actor=APPROVER, comment="fairness ok")
    assert _pending(registry) == []
    rejection = registry.reject("credit", 1, actor=CAROL, reason="leaks the label")
    assert (rejection.decision, rejection.approver, rejection.comment) == (
        "rejected",
        "carol",
        "leaks the label",
    )
    entry = registry.audit("credit")[-1]
    assert (entry.action, entry.actor, entry.version) == ("version.reject", "carol", 1)
    assert entry.detail == {"version": 1, "reason": "leaks the label"}

    (pending,) = registry.pending_approvals()
    assert (pending.model, pending.version, pending.status) == ("credit", 1, "STAGING")
    assert (pending.created_by, pending.metrics, pending.high_stakes) == (
        "trainer",
        {"auc": 0.91},
        True,
    )
    assert [(d.approver, d.decision, d.comment) for d in pending.decisions] == [
        ("bob", "approved", "fairness ok"),
        ("carol", "rejected", "leaks the label"),
    ]

    with pytest.raises(
        errors.FailedPreconditionError, match="rejected by 'carol': 'leaks the label'"
    ):
        registry.promote("credit", 1, actor=DEPLOYER)
    assert registry.audit("credit")[-1].action == "version.promote_refused"
    assert registry.get_version("credit", 1).status == "STAGING"

    # The same approver may approve again after a rejection (hers or anyone's).
    registry.approve("credit", 1, actor=APPROVER, comment="label fixed upstream")
    assert _pending(registry) == []
    assert [a.decision for a in registry.approvals("credit", 1)] == [
        "approved",
        "rejected",
        "approved",
    ]
    result = registry.promote("credit", 1, actor=DEPLOYER)
    assert result.version.status == "PRODUCTION"
    assert registry.audit("credit")[-1].detail["approvers"] == ["bob"]
    assert _pending(registry) == []  # no longer STAGING


def test_decision_rules(registry: ModelRegistry) -> None:
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    register(registry, "credit")
    before = snapshot(registry)
    for who in (DEPLOYER, ADMIN, READER):
        with pytest.raises(errors.PermissionDeniedError, match="role 'approver'"):
            registry.reject("credit", 1, actor=who, reason="no")
    for reason in ("", "   "):
        with pytest.raises(errors.InvalidArgumentError, match="needs a reason"):
            registry.reject("credit", 1, actor=APPROVER, reason=reason)
    assert snapshot(registry) == before

    # Two approvals in a row by one person are one too many; approve, reject, approve is not.
    registry.approve("credit", 1, actor=APPROVER)
    with pytest.raises(errors.AlreadyExistsError, match="already approved"):
        registry.approve("credit", 1, actor=APPROVER)
    registry.reject("credit", 1, actor=APPROVER, reason="second thoughts")
    registry.reject("credit", 1, actor=APPROVER, reason="still no")  # rejections may repeat
    registry.approve("credit", 1, actor=APPROVER)
    registry.approve("credit", 1, actor=CAROL)  # a second person's sign-off
    assert [(a.approver, a.decision) for a in registry.approvals("credit", 1)] == [
        ("bob", "approved"),
        ("bob", "rejected"),
        ("bob", "rejected"),
        ("bob", "approved"),
        ("carol", "approved"),
    ]

    # Only STAGING versions can be decided.
    registry.promote("credit", 1, actor=DEPLOYER)
    with pytest.raises(errors.FailedPreconditionError, match="only STAGING versions can be"):
        registry.reject("credit", 1, actor=APPROVER, reason="too late")
    with pytest.raises(errors.NotFoundError):
        registry.reject("credit", 9, actor=APPROVER, reason="no such version")


def test_rejections_of_other_models_are_recorded_but_do_not_block(
    registry: ModelRegistry,
) -> None:
    registry.create_model("fraud", actor=ADMIN)
    register(registry)
    registry.reject("fraud", 1, actor=APPROVER, reason="not convinced")
    assert _pending(registry) == []  # the queue is high-stakes models only
    assert [a.decision for a in registry.approvals("fraud", 1)] == ["rejected"]
    assert registry.promote("fraud", 1, actor=DEPLOYER).version.status == "PRODUCTION"


def test_the_queue_is_newest_first_across_models(registry: ModelRegistry) -> None:
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    registry.create_model("loans", actor=ADMIN, high_stakes=True)
    register(registry, "credit")
    register(registry, "loans")
    register(registry, "credit")
    assert _pending(registry) == [("credit", 2, []), ("loans", 1, []), ("credit", 1, [])]
    registry.approve("credit", 2, actor=APPROVER)
    registry.reject("loans", 1, actor=APPROVER, reason="stale data")
    registry.archive("credit", 1, actor=DEPLOYER)
    assert _pending(registry) == [("loans", 1, ["rejected"])]


def test_a_rejected_version_may_not_take_live_traffic(registry: ModelRegistry) -> None:
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    register(registry, "credit")
    register(registry, "credit")
    registry.approve("credit", 1, actor=APPROVER)
    registry.promote("credit", 1, actor=DEPLOYER)
    registry.deploy("credit", 1, actor=DEPLOYER)
    registry.approve("credit", 2, actor=APPROVER)
    registry.reject("credit", 2, actor=CAROL, reason="canary showed bias")
    split = TrafficSplit(
        variants=[
            VariantSplit(name="a", version=1, weight_bp=9_000),
            VariantSplit(name="b", version=2, weight_bp=1_000, canary=True),
        ]
    )
    with pytest.raises(errors.FailedPreconditionError, match="rejected since"):
        registry.deploy("credit", 2, split, actor=DEPLOYER)
    registry.approve("credit", 2, actor=APPROVER)
    assert registry.deploy("credit", 2, split, actor=DEPLOYER).is_active


def test_the_migration_keeps_existing_approvals(db_url: str, tmp_path: Path) -> None:
    with connect(db_url) as db:
        db.migrate(COMPONENT, MIGRATIONS[:2])  # the schema before decisions
        with db.transaction() as tx:
            tx.execute(
                "INSERT INTO models (name, created_by, created_at, high_stakes)"
                " VALUES ('credit', 'alice', '2024-01-01T00:00:00Z', 1)"
            )
            tx.execute(
                "INSERT INTO model_versions (model_id, version_number, created_by, created_at)"
                " VALUES (1, 1, 'trainer', '2024-01-01T00:00:00Z')"
            )
            tx.execute(
                "UPDATE models SET last_version = 1 WHERE model_id = 1",
            )
            tx.execute(
                "INSERT INTO approvals (version_id, approver, comment, created_at)"
                " VALUES (1, 'bob', 'ok', '2024-01-02T00:00:00Z')"
            )
    with ModelRegistry.open(db_url, tmp_path / "artifacts") as reg:
        (old,) = reg.approvals("credit", 1)
        assert (old.approver, old.comment, old.decision) == ("bob", "ok", "approved")
        assert reg.pending_approvals() == []
        reg.reject("credit", 1, actor=APPROVER, reason="re-reviewed")
        reg.approve("credit", 1, actor=APPROVER)  # (version, approver) is no longer unique
        assert [a.decision for a in reg.approvals("credit", 1)] == [
            "approved",
            "rejected",
            "approved",
        ]


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def http_env(registry: ModelRegistry) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    tokens = {role: registry.tokens.create(f"user-{role}", [role]) for role in ("reader",)}
    tokens["approver"] = registry.tokens.create("dana", ["approver"])
    with serve(create_app(registry)) as url, httpx.Client(base_url=url) as http:
        yield http, tokens


def test_reject_and_the_queue_over_http(
    registry: ModelRegistry, http_env: tuple[httpx.Client, dict[str, str]]
) -> None:
    http, tokens = http_env
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    register(registry, "credit", metrics={"auc": 0.9})
    path = "/models/credit/versions/1/reject"

    def auth(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[role]}"}

    assert http.post(path, json={"reason": "x"}).status_code == 401
    r = http.post(path, json={"reason": "x"}, headers=auth("reader"))
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    for body in ({"reason": ""}, {}, None):
        r = http.post(path, json=body, headers=auth("approver"))
        assert r.status_code == 400, body
        assert r.json()["error"] == "INVALID_ARGUMENT" and "needs a reason" in r.json()["message"]
    assert http.post(path, json={"why": "x"}, headers=auth("approver")).status_code == 400
    assert registry.approvals("credit", 1) == []

    r = http.post(path, json={"reason": "leaks the label"}, headers=auth("approver"))
    assert r.status_code == 201
    assert r.json() == {
        "model": "credit",
        "version": 1,
        "approver": "dana",
        "comment": "leaks the label",
        "created_at": r.json()["created_at"],
        "decision": "rejected",
    }
    pending = http.get("/approvals/pending")  # open, like every read
    assert pending.status_code == 200
    (item,) = pending.json()
    assert set(item) == {
        "model",
        "version",
        "status",
        "created_by",
        "created_at",
        "metrics",
        "high_stakes",
        "decisions",
    }
    assert (item["model"], item["version"], item["status"], item["metrics"]) == (
        "credit",
        1,
        "STAGING",
        {"auc": 0.9},
    )
    assert [d["decision"] for d in item["decisions"]] == ["rejected"]
    r = http.post("/models/credit/versions/1/promote", headers=auth("approver"))
    assert r.status_code == 403  # approvers do not promote

    missing = http.post(
        "/models/credit/versions/9/reject", json={"reason": "x"}, headers=auth("approver")
    )
    assert missing.status_code == 404
    spec = http.get("/openapi.json").json()
    assert "/approvals/pending" in spec["paths"]
    assert "PendingApproval" in spec["components"]["schemas"]
    assert "RejectRequest" in spec["components"]["schemas"]


def test_the_remote_client_rejects_like_the_registry(
    registry: ModelRegistry, http_env: tuple[httpx.Client, dict[str, str]]
) -> None:
    http, tokens = http_env
    registry.create_model("credit", actor=ADMIN, high_stakes=True)
    register(registry, "credit")
    approver = RegistryClient(token=tokens["approver"], http=http)
    reader = RegistryClient(token=tokens["reader"], http=http)
    with pytest.raises(errors.PermissionDeniedError):
        reader.reject("credit", 1, actor=TOKEN_ACTOR, reason="x")
    with pytest.raises(errors.InvalidArgumentError, match="needs a reason"):
        approver.reject("credit", 1, actor=TOKEN_ACTOR, reason="")
    got = approver.reject("credit", 1, actor=TOKEN_ACTOR, reason="no")
    assert (got.decision, got.approver) == ("rejected", "dana")
    assert _pending(reader) == [("credit", 1, ["rejected"])]
    assert reader.pending_approvals() == registry.pending_approvals()
    approver.approve("credit", 1, actor=TOKEN_ACTOR)
    assert reader.pending_approvals() == []


def test_cli_reject_and_pending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "carrara.toml"
    config.write_text(f'[carrara]\nhome = "{tmp_path / "home"}"\n')
    c = ["--config", str(config)]
    assert main(["models", "token", "create", "--subject", "ann", "--role", "admin", *c]) == 0
    admin = capsys.readouterr().out.strip()
    assert main(["models", "token", "create", "--subject", "rob", "--role", "approver", *c]) == 0
    approver = capsys.readouterr().out.strip()
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    assert main(["models", "create", "credit", "--high-stakes", *c, "--token", admin]) == 0
    assert (
        main(
            [
                "models",
                "register",
                "credit",
                "--serving",
                str(onnx),
                "--framework",
                "sklearn",
                *c,
                "--token",
                admin,
            ]
        )
        == 0
    )
    capsys.readouterr()
    argv = ["models", "reject", "credit", "1", "--reason", "bias", *c, "--token", approver]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["decision"], out["comment"], out["approver"]) == ("rejected", "bias", "rob")
    assert main(["models", "pending", *c]) == 0
    pending = msgspec.json.decode(capsys.readouterr().out)
    assert [(p["model"], p["version"]) for p in pending] == [("credit", 1)]
