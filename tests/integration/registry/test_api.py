"""The REST API and its SDK client, end to end over HTTP (ASGI), on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from carrara import errors
from carrara.registry import Gate, ModelRegistry, TrafficSplit, VariantSplit
from carrara.registry.api import create_app
from carrara.registry.client import TOKEN_ACTOR as ACTOR
from carrara.registry.client import RegistryClient

from .conftest import ONNX_BYTES, serve, snapshot


class Env(msgspec.Struct):
    registry: ModelRegistry
    http: httpx.Client
    tokens: dict[str, str]

    def client(self, who: str | None) -> RegistryClient:
        return RegistryClient(token=self.tokens[who] if who else None, http=self.http)


@pytest.fixture
def env(registry: ModelRegistry) -> Iterator[Env]:
    tokens = {
        role: registry.tokens.create(f"user-{role}", [role])
        for role in ("reader", "publisher", "deployer", "approver", "admin")
    }
    with serve(create_app(registry)) as url, httpx.Client(base_url=url) as http:
        yield Env(registry, http, tokens)


def _register(env: Env, name: str = "fraud") -> Any:
    return env.client("publisher").register(
        name,
        actor=ACTOR,
        framework="sklearn",
        serving_artifact=ONNX_BYTES,
        evaluations={"holdout": {"auc": 0.9}},
        feature_store_version=["trips:3"],
        training_dataset_ref="snap-7",
        run_id="job-1",
    )


def test_full_flow_over_http(env: Env) -> None:
    admin = env.client("admin")
    admin.create_model(
        "fraud",
        actor=ACTOR,
        high_stakes=True,
        gates=[Gate(metric="auc", dataset="holdout", threshold=0.8)],
    )
    v1 = _register(env)
    assert (v1.version, v1.status, v1.feature_store_version) == (1, "STAGING", ["trips:3"])
    assert admin.load_artifact("fraud", 1) == ONNX_BYTES
    with pytest.raises(errors.FailedPreconditionError, match="needs an approval"):
        env.client("deployer").promote("fraud", 1, actor=ACTOR)
    env.client("approver").approve("fraud", 1, actor=ACTOR, comment="ok")
    result = env.client("deployer").promote("fraud", 1, actor=ACTOR)
    assert result.version.status == "PRODUCTION"
    assert [(g.gate, g.passed) for g in result.gate_results] == [("threshold", True)]
    dep = env.client("deployer").deploy("fraud", 1, actor=ACTOR)
    assert dep.variants[0].artifact_sha256 == v1.artifact_sha256
    _register(env)
    split = TrafficSplit(
        variants=[
            VariantSplit(name="a", version=1, weight_bp=9_500),
            VariantSplit(name="b", version=2, weight_bp=500, canary=True),
        ]
    )
    # A canary is live traffic: on a high-stakes model it needs the version approved.
    with pytest.raises(errors.FailedPreconditionError, match="no approval"):
        env.client("deployer").deploy("fraud", 2, split, actor=ACTOR)
    env.client("approver").approve("fraud", 2, actor=ACTOR, comment="canary ok")
    env.client("deployer").deploy("fraud", 2, split, actor=ACTOR)
    back = env.client("deployer").rollback("fraud", actor=ACTOR)
    assert back.traffic_split == dep.traffic_split
    approvals = env.client(None).approvals("fraud", 1)
    assert [(a.approver, a.comment) for a in approvals] == [("user-approver", "ok")]
    assert env.http.get("/readyz").json() == {"status": "ready"}
    reader = env.client(None)
    assert [d.is_active for d in reader.deployments("fraud")] == [False, False, True]
    assert reader.lineage("fraud", 1).training_dataset_ref == "snap-7"
    assert [(v.model, v.version) for v in reader.versions_using("trips:3")] == [
        ("fraud", 1),
        ("fraud", 2),
    ]
    assert [v.version for v in reader.list_versions("fraud", status="STAGING")] == [2]
    actions = [a.action for a in reader.audit("fraud")]
    assert actions.count("version.status") == 1 and actions.count("version.approve") == 2
    assert reader.audit("fraud")[0].actor == "user-admin"


def test_raw_deploy_endpoint_and_openapi(env: Env) -> None:
    _register(env)
    auth = {"authorization": f"Bearer {env.tokens['deployer']}"}
    body = {"traffic_split": {"variants": [{"name": "main", "version": 1, "weight_bp": 10000}]}}
    r = env.http.post("/models/fraud/versions/1/deploy", json=body, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["variants"][0]["name"] == "main"
    spec = env.http.get("/openapi.json").json()
    op = spec["paths"]["/models/{model_id}/versions/{version_id}/deploy"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/DeployRequest"
    assert "TrafficSplit" in spec["components"]["schemas"]
    assert op["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/models"]["get"]


def _raw(env: Env, method: str, path: str, who: str | None, body: Any = None) -> Any:
    headers = {"authorization": f"Bearer {env.tokens[who]}"} if who else {}
    return env.http.request(method, path, json=body, headers=headers)


GOOD_REGISTER = {"framework": "sklearn", "serving_artifact": base64.b64encode(b"x").decode()}
BAD_SPLIT = {"traffic_split": {"variants": [{"name": "a", "version": 1, "weight_bp": 50}]}}


BAD_REQUESTS = [
    (
        "POST",
        "/models/fraud/versions",
        None,
        GOOD_REGISTER,
        401,
        "UNAUTHENTICATED",
        "bearer token",
    ),
    (
        "POST",
        "/models/fraud/versions",
        "reader",
        GOOD_REGISTER,
        403,
        "PERMISSION_DENIED",
        "publisher",
    ),
    (
        "POST",
        "/models/fraud/versions/1/promote",
        "publisher",
        None,
        403,
        "PERMISSION_DENIED",
        "deployer",
    ),
    (
        "POST",
        "/models/fraud/versions/1/approve",
        "admin",
        None,
        403,
        "PERMISSION_DENIED",
        "approver",
    ),
    (
        "POST",
        "/models/fraud/versions/1/deploy",
        "approver",
        None,
        403,
        "PERMISSION_DENIED",
        "deployer",
    ),
    (
        "POST",
        "/models/nope/versions/1/promote",
        "deployer",
        None,
        404,
        "NOT_FOUND",
        "'nope' does not exist",
    ),
    (
        "POST",
        "/models/fraud/versions/9/deploy",
        "deployer",
        None,
        404,
        "NOT_FOUND",
        "latest is 1",
    ),
    (
        "POST",
        "/models/fraud/versions/1/deploy",
        "deployer",
        BAD_SPLIT,
        400,
        "INVALID_ARGUMENT",
        "sum to 50 bp",
    ),
    (
        "POST",
        "/models/fraud/versions/1/deploy",
        "deployer",
        {"traffic_split": 3},
        400,
        "INVALID_ARGUMENT",
        "invalid request body",
    ),
    (
        "POST",
        "/models/fraud/versions",
        "publisher",
        {"framework": "x"},
        400,
        "INVALID_ARGUMENT",
        "needs an artifact",
    ),
    (
        "POST",
        "/models/fraud/versions",
        "publisher",
        {"oops": 1},
        400,
        "INVALID_ARGUMENT",
        "unknown field",
    ),
    ("GET", "/models/fraud/versions/abc", None, None, 404, "NOT_FOUND", "no route"),
    (
        "POST",
        "/models/fraud/deployments/rollback",
        "deployer",
        None,
        409,
        "FAILED_PRECONDITION",
        "not deployed",
    ),
]


def test_bad_requests_get_4xx_and_change_nothing(env: Env) -> None:
    # One server and database for all cases (each checked on its own): keeps the suite fast.
    _register(env)
    before = snapshot(env.registry)
    files = sorted(Path(env.registry.artifacts.root).rglob("*"))
    for method, path, who, body, status, code, message in BAD_REQUESTS:
        case = f"{method} {path} as {who}"
        r = _raw(env, method, path, who, body)
        assert r.status_code == status, (case, r.text)
        assert r.json()["error"] == code, case
        assert message in r.json()["message"], case
        assert snapshot(env.registry) == before, case
        assert sorted(Path(env.registry.artifacts.root).rglob("*")) == files, case


def test_bad_and_revoked_tokens(env: Env) -> None:
    _register(env)
    before = snapshot(env.registry)
    r = env.http.post("/models/fraud/versions/1/promote", headers={"authorization": "Bearer nope"})
    assert (r.status_code, r.json()["error"]) == (401, "UNAUTHENTICATED")
    r = env.http.post("/models/fraud/versions/1/promote", headers={"authorization": "Basic abc"})
    assert r.status_code == 401 and "Bearer <token>" in r.json()["message"]
    info = next(t for t in env.registry.tokens.list() if t.subject == "user-deployer")
    env.registry.tokens.revoke(info.token_id)
    after_revoke = snapshot(env.registry)
    with pytest.raises(errors.UnauthenticatedError, match="revoked"):
        env.client("deployer").promote("fraud", 1, actor=ACTOR)
    assert snapshot(env.registry) == after_revoke
    assert before["model_versions"] == after_revoke["model_versions"]


def test_bootstrap_token_is_admin(registry: ModelRegistry) -> None:
    app = create_app(registry, bootstrap_token="s3cret")
    with serve(app) as url, httpx.Client(base_url=url) as http:
        client = RegistryClient(token="s3cret", http=http)
        assert client.create_model("churn", actor=ACTOR).created_by == "bootstrap"
        with pytest.raises(errors.UnauthenticatedError):
            RegistryClient(token="s3cret-not", http=http).create_model("other", actor=ACTOR)


def test_oversized_body_is_refused(registry: ModelRegistry) -> None:
    token = registry.tokens.create("ci", ["publisher"])
    before = snapshot(registry)
    app = create_app(registry, max_body_bytes=1_000)
    with serve(app) as url, httpx.Client(base_url=url) as http:
        client = RegistryClient(token=token, http=http)
        with pytest.raises(errors.PayloadTooLargeError, match="over the limit of 1000"):
            client.register(
                "fraud", actor=ACTOR, serving_artifact=b"x" * 2_000, framework="sklearn"
            )
        r = http.post(
            "/models/fraud/versions",
            content=b"{" * 2_000,
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        assert r.status_code == 413
    assert snapshot(registry) == before


def test_tampered_artifact_download_is_refused(env: Env) -> None:
    v = _register(env)
    path = Path(v.artifact_path)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    r = env.http.get("/models/fraud/versions/1/artifact")
    assert r.status_code == 409
    assert "fails its integrity check" in r.json()["message"]


def test_control_characters_and_huge_path_params_are_400_on_every_route(env: Env) -> None:
    # PostgreSQL refuses NUL in text: a NUL that reached a query used to answer 500 (and
    # drop the connection); now no route gets that far.
    _register(env)
    before = snapshot(env.registry)
    admin = {"authorization": f"Bearer {env.tokens['admin']}"}
    checked = 0
    for route in create_app(env.registry).routes:
        path = getattr(route, "path", "")
        if "{model_id}" not in path and "{group_version}" not in path:
            continue
        for bad in ("a%00b", "%00", "a%0Ab", "m" * 300):
            url = (
                path.replace("{model_id}", bad)
                .replace("{group_version}", bad)
                .replace("{version_id:int}", "1")
            )
            for method in sorted(set(route.methods or ()) - {"HEAD"}):  # type: ignore[attr-defined]
                r = env.http.request(method, url, headers=admin, json={})
                assert r.status_code == 400, (method, url, r.text)
                assert r.json()["error"] == "INVALID_ARGUMENT"
                checked += 1
    assert checked >= 76  # 19 routes x 4 values
    assert snapshot(env.registry) == before
    assert env.http.get("/models/fraud").status_code == 200  # the connection still works


def test_models_cli_against_the_server(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``carrara models --server`` calls the same registry methods through the REST client;
    the token, not ``actor=``, decides who acts."""
    from carrara.cli import main

    config = tmp_path / "carrara.toml"
    config.write_text(f'[carrara]\nhome = "{tmp_path / "cli-home"}"\n')
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(ONNX_BYTES)
    server = ["--config", str(config), "--server", str(env.http.base_url)]

    def run(*argv: str, who: str | None = None) -> tuple[int, str, str]:
        token = ["--token", env.tokens[who]] if who else []
        code = main(["models", *argv, *server, *token])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("create", "churn", "--framework", "sklearn")
    assert code == 2 and "bearer token" in err
    assert run("create", "churn", "--framework", "sklearn", who="admin")[0] == 0
    code, out, err = run(
        "register", "churn", "--serving", str(onnx), "--framework", "sklearn", who="publisher"
    )
    assert code == 0, err
    assert msgspec.json.decode(out)["created_by"] == "user-publisher"
    assert run("promote", "churn", "1", who="deployer")[0] == 0
    assert run("deploy", "churn", "1", who="deployer")[0] == 0
    code, out, _ = run("audit", "churn")
    actors = [line.split("\t")[1] for line in out.splitlines()]
    assert actors[:2] == ["user-admin", "user-publisher"]
