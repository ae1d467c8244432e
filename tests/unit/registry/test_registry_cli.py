"""``carrara models ...`` against an embedded registry (SQLite + local event log)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from carrara.cli import main
from carrara.eventlog import open_event_log
from carrara.registry import Deployment
from carrara.types import Topic


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "carrara.toml"
    path.write_text(f'[carrara]\nhome = "{tmp_path / "home"}"\n')
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_cli_end_to_end(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", config]
    code, token, _ = run(
        capsys, "models", "token", "create", "--subject", "ci", "--role", "admin", *c
    )
    assert code == 0 and token.startswith("crt_")
    admin = [*c, "--token", token.strip()]
    code, out, _ = run(
        capsys, "models", "create", "fraud", "--gate", "auc:holdout:0.8:0.05", *admin
    )
    assert code == 0 and json.loads(out)["gates"][0]["threshold"] == 0.8
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx-bytes")
    for auc in ("0.85", "0.84"):
        code, out, err = run(
            capsys,
            "models",
            "register",
            "fraud",
            "--serving",
            str(onnx),
            "--framework",
            "sklearn",
            "--eval",
            f"holdout:auc={auc}",
            "--feature-group",
            "trips:3",
            "--run-id",
            "job-9",
            *admin,
        )
        assert code == 0, err
    assert json.loads(out)["version"] == 2
    # No token: refused with how to get one; nothing promoted.
    code, _, err = run(capsys, "models", "promote", "fraud", "1", *c)
    assert code == 2 and "bearer token" in err
    code, out, _ = run(capsys, "models", "promote", "fraud", "1", *admin)
    assert code == 0 and json.loads(out)["version"]["status"] == "PRODUCTION"
    split = {
        "variants": [
            {"name": "a", "version": 1, "weight_bp": 9000},
            {"name": "b", "version": 2, "weight_bp": 1000, "canary": True},
        ]
    }
    code, out, err = run(
        capsys, "models", "deploy", "fraud", "2", "--split", json.dumps(split), *admin
    )
    assert code == 0, err
    bad = {"variants": [{"name": "a", "version": 1, "weight_bp": 9000}]}
    code, _, err = run(capsys, "models", "deploy", "fraud", "1", "--split", json.dumps(bad), *admin)
    assert code == 2 and "sum to 9000 bp" in err
    # Policy change: v2 now needs an approver's sign-off; the refusal says how to get it.
    code, out, _ = run(capsys, "models", "update", "fraud", "--high-stakes", *admin)
    assert code == 0 and json.loads(out)["high_stakes"] is True
    code, _, err = run(capsys, "models", "promote", "fraud", "2", *admin)
    assert code == 2 and "carrara models approve fraud 2" in err
    code, approver, _ = run(
        capsys, "models", "token", "create", "--subject", "bob", "--role", "approver", *c
    )
    code, _, err = run(capsys, "models", "approve", "fraud", "2", "--token", approver.strip(), *c)
    assert code == 0, err
    code, out, _ = run(capsys, "models", "lineage", "--feature-group", "trips:3", *c)
    assert out.splitlines() == ["fraud\t1\tPRODUCTION", "fraud\t2\tSTAGING"]
    code, out, _ = run(capsys, "models", "audit", "fraud", *c)
    assert [line.split("\t")[2] for line in out.splitlines()][-3:] == [
        "model.update",
        "version.promote_refused",
        "version.approve",
    ]
    code, out, _ = run(capsys, "models", "versions", "fraud", *c)
    assert [line.split("\t")[:2] for line in out.splitlines()] == [
        ["1", "PRODUCTION"],
        ["2", "STAGING"],
    ]
    code, out, _ = run(capsys, "models", "list", *c)
    assert out == "fraud\tlatest=2\tproduction=1\n"
    with open_event_log(f"local:///{tmp_path / 'home' / 'events.db'}") as log:
        events = log.read(Topic.DEPLOYMENTS, "gw", "gw-1")
    deployed = [msgspec.json.decode(e.payload, type=Deployment) for e in events]
    assert [[v.weight_bp for v in d.variants] for d in deployed] == [[9000, 1000]]


def test_direct_cli_accepts_the_configured_api_token_as_the_bootstrap_admin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARRARA_API_TOKEN", raising=False)
    path = tmp_path / "carrara.toml"
    path.write_text(f'[carrara]\nhome = "{tmp_path / "home"}"\napi_token = "boot-secret"\n')
    c = ["--config", str(path)]
    code, out, err = run(capsys, "models", "list", *c)
    assert code == 0, err  # was: "unknown bearer token"
    code, out, err = run(capsys, "models", "create", "fraud", *c)  # admin, as the API has it
    assert code == 0, err
    code, out, err = run(capsys, "models", "list", *c)
    assert code == 0 and out.startswith("fraud\t"), err
    # Any other token is still checked against the token table.
    code, _, err = run(capsys, "models", "create", "other", "--token", "crt_nope", *c)
    assert code == 2 and "unknown bearer token" in err
