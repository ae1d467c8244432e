"""``carrara.Client`` against the composed control-plane app in-process (embedded stores), the
transport's error map, and ``carrara up``'s configuration and routes (the signatures shared
with ``carrara.Platform``: ``test_sdk_signatures.py``)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carrara.client import Client
from carrara.config import Settings
from carrara.errors import (
    ConfigError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup
from carrara.monitoring import DriftThresholds, ModelMonitorConfig
from carrara.platform import Platform
from carrara.registry.client import TOKEN_ACTOR
from carrara.services import ControlPlane, check_routes
from carrara.transport import raise_for_error
from carrara.up import ChildExitedError, Services, UpConfig, load_up_config, settings_env
from tests.servers import serve_app

TOKEN = "unit-bootstrap"
T0_US = 1_780_000_000_000_000

# -- the control plane in-process ----------------------------------------------------------------


_serve = serve_app


def _definitions() -> Definitions:
    return Definitions(
        entities=(Entity(name="rider", join_key="rider_id"),),
        groups=(
            FeatureGroup(
                name="trips",
                entity="rider",
                ttl_days=0,
                features=(Feature(name="a"), Feature(name="b")),
            ),
        ),
    )


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    settings = Settings(home=str(tmp_path), online_store_url="memory://", api_token=TOKEN)
    cp = ControlPlane(settings)
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture
def url(plane: ControlPlane) -> Iterator[str]:
    with _serve(plane.app) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url, TOKEN) as c:
        yield c


def test_health_and_merged_openapi(url: str) -> None:
    import httpx

    with httpx.Client(base_url=url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready", "training_api": True}
        paths = http.get("/openapi.json").json()["paths"]
        missing = http.get("/no/such/route")
    for path in ("/models/{model_id}", "/features/groups/{group}/get-online", "/training-jobs"):
        assert path in paths
    assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"


def test_features_through_the_client(client: Client) -> None:
    changes = client.features.apply(_definitions())
    assert [(c.kind, c.name, c.action) for c in changes] == [
        ("entity", "rider", "created"),
        ("group", "trips", "created"),
    ]
    assert client.features.apply(_definitions(), dry_run=True)[1].action == "unchanged"
    rows = pd.DataFrame(
        {
            "rider_id": ["r1", "r2", "r1"],
            "event_timestamp": [T0_US, T0_US, T0_US + 10],
            "a": [1.0, 2.0, 3.0],
            "b": [10.0, None, 30.0],
        }
    )
    assert client.features.ingest("trips", rows) == 3
    row = {"rider_id": "r3", "event_timestamp": T0_US, "a": 7.0, "b": None}
    assert client.features.ingest("trips", [row]) == 1  # JSON rows, not Arrow
    [result] = client.features.materialize(full=True)
    assert (result.group, result.written) == ("trips", 3)
    online = client.features.get_online("trips", ["r1", "r2", "r3", "zz"])
    assert online.features == ["a", "b"] and online.version == 1
    np.testing.assert_array_equal(
        online.values, np.array([[3, 30], [2, 0], [7, 0], [0, 0]], np.float32)
    )
    assert online.missing.tolist() == [[False, False], [False, True], [False, True], [True, True]]
    assert online.found.tolist() == [True, True, True, False]
    assert online.to_dicts()[1] == {"a": 2.0, "b": None}
    assert client.features.group("trips").definition.feature_names == ("a", "b")
    assert [g.definition.name for g in client.features.list_groups()] == ["trips"]

    labels = pd.DataFrame(
        {"rider_id": ["r1", "r1", "r2"], "event_timestamp": [T0_US + 5, T0_US + 20, T0_US - 1]}
    )
    ts = client.features.get_training_set(labels, ["trips:a"])
    frame = ts.to_pandas()
    # point in time: r1 at +5 sees a=1, at +20 sees a=3; r2 before its first row sees nothing
    assert frame["trips__a"].tolist()[:2] == [1.0, 3.0] and np.isnan(frame["trips__a"].iloc[2])
    assert ts.snapshot_ref
    with pytest.raises(NotFoundError, match="nope"):
        client.features.get_online("trips", ["r1"], ["nope"])
    with pytest.raises(InvalidArgumentError):
        client.features.get_online("trips", "r1")
    with pytest.raises(FailedPreconditionError, match="in-process"):
        client.features.transform_rows(client.features.group("trips"), rows)


def test_writes_need_a_token_with_the_role(url: str, plane: ControlPlane) -> None:
    with Client(url) as anonymous:
        with pytest.raises(UnauthenticatedError, match="Bearer"):
            anonymous.features.apply(_definitions())
        with pytest.raises(UnauthenticatedError):
            anonymous.registry.create_model("m", actor=anonymous.actor)
        assert anonymous.features.apply(_definitions(), dry_run=True)  # a read
    reader = plane.registry.tokens.create("ro", ["reader"])
    with Client(url, reader) as ro:
        with pytest.raises(PermissionDeniedError, match="publisher"):
            ro.features.apply(_definitions())
        with pytest.raises(PermissionDeniedError):
            ro.monitor.configure("m", ModelMonitorConfig())
    with Client(url, "wrong") as bad, pytest.raises(UnauthenticatedError, match="unknown"):
        bad.features.apply(_definitions())


def test_registry_and_monitoring_through_the_client(client: Client) -> None:
    model = client.registry.create_model("churn", actor=client.actor, framework="sklearn")
    assert model.name == "churn"
    assert client.registry.production_version("churn") is None
    assert client.registry.active_deployment("churn") is None
    assert client.registry.version_for_run("churn", "run-1") is None
    assert client.registry.version_for_run("nope", "run-1") is None
    with pytest.raises(NotFoundError):
        client.registry.active_deployment("nope")

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"x": rng.normal(0, 1, 500), "y": rng.normal(5, 2, 500)})
    client.monitor.set_reference("churn", 1, frame, rng.random(500), baseline={"auc": 0.8})
    config = ModelMonitorConfig(window_ms=1_000, drift=DriftThresholds(min_samples=10))
    client.monitor.configure("churn", config)
    assert client.monitor.active("churn") == []
    assert client.monitor.run() == []  # nothing logged yet
    assert "churn" in client.monitor.report("churn", 1)


def test_error_answers_map_to_classes() -> None:
    import httpx

    from carrara.errors import PayloadTooLargeError, ResourceExhaustedError

    def response(status: int, body: object) -> httpx.Response:
        return httpx.Response(status, content=msgspec.json.encode(body))

    with pytest.raises(NotFoundError, match="x: gone"):
        raise_for_error(response(404, {"error": "NOT_FOUND", "message": "gone"}), "x")
    with pytest.raises(InvalidArgumentError, match="bad"):
        raise_for_error(response(400, {"error": "INVALID_ARGUMENT", "message": "bad"}), "x")
    with pytest.raises(PayloadTooLargeError):  # RESOURCE_EXHAUSTED refined by its 413
        raise_for_error(response(413, {"error": "RESOURCE_EXHAUSTED", "message": "big"}), "x")
    with pytest.raises(ResourceExhaustedError) as shed:
        raise_for_error(response(429, {"error": "RESOURCE_EXHAUSTED", "message": "shed"}), "x")
    assert not isinstance(shed.value, PayloadTooLargeError)
    with pytest.raises(NotFoundError):  # no body of ours: the status says which
        raise_for_error(httpx.Response(404, content=b"<html>"), "x")
    with pytest.raises(NotFoundError, match="x: unknown model"):  # KServe's shape
        raise_for_error(response(404, {"error": "unknown model"}), "x")
    raise_for_error(response(200, {}), "x")
    # Every class a service answers with comes back as itself (the map is derived from each
    # class's grpc_code and http_status, so a new class needs no second list).
    from carrara.errors import GRPC_CODES

    for cls in [*GRPC_CODES.values(), PayloadTooLargeError]:
        with pytest.raises(cls) as caught:
            raise_for_error(
                response(cls.http_status, {"error": cls.grpc_code, "message": "m"}), "x"
            )
        assert type(caught.value) is cls


def test_predict_and_serve_need_a_gateway(client: Client) -> None:
    with pytest.raises(FailedPreconditionError, match="gateway="):
        client.predict("churn", ["a"])
    with pytest.raises(FailedPreconditionError, match="in-process"), client.serve():
        pass


# -- training, against the training API contract ------------------------------------------------


def _job_spec() -> Any:
    from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec

    return JobSpec(
        model_name="churn",
        dataset=DatasetSpec(
            features=["t:a"], label_source="/data/l", label_column="y", entity_column="e"
        ),
        model=ModelSpec(estimator="logistic_regression"),
    )


def _fake_training_api() -> Starlette:
    """The contract of ``training/api.py``: ``JobView`` JSON (the spec as an object)."""
    state = {"polls": 0}
    job = {
        "job_id": "j1",
        "model_name": "churn",
        "state": "QUEUED",
        "spec": msgspec.to_builtins(_job_spec()),
        "submitted_by": "me",
        "submitted_at_us": 1,
        "started_at_us": None,
        "finished_at_us": None,
        "heartbeat_at_us": None,
        "worker": None,
        "attempts": 0,
        "cancel_requested": False,
        "error": "",
        "result": {},
        "gpus_requested": 0,
        "node": None,
        "gpus": [],
        "trigger": "",
    }

    async def submit(request: Request) -> Response:
        body = msgspec.json.decode(await request.body())
        assert body["submitted_by"] == "me" and body["spec"]["model_name"] == "churn"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        return JSONResponse(job, 201)

    async def get(request: Request) -> Response:
        if request.path_params["job_id"] != "j1":
            return JSONResponse({"error": "NOT_FOUND", "message": "no job"}, 404)
        state["polls"] += 1
        done = state["polls"] >= 3
        return JSONResponse(
            {
                **job,
                "state": "SUCCEEDED" if done else "RUNNING",
                "result": {"version": 1} if done else {},
            }
        )

    async def listing(request: Request) -> Response:
        wanted = request.query_params.get("state")
        return JSONResponse({"jobs": [job] if wanted in (None, "QUEUED") else []})

    async def logs(request: Request) -> Response:
        after = int(request.query_params.get("after", "0"))
        lines = [{"seq": i, "ts_us": i, "level": "INFO", "message": f"line {i}"} for i in (1, 2, 3)]
        return JSONResponse({"lines": [x for x in lines if x["seq"] > after]})

    return Starlette(
        routes=[
            Route("/training-jobs", submit, methods=["POST"]),
            Route("/training-jobs", listing, methods=["GET"]),
            Route("/training-jobs/{job_id}", get, methods=["GET"]),
            Route("/training-jobs/{job_id}/logs", logs, methods=["GET"]),
        ]
    )


def test_training_client_follows_the_contract() -> None:
    spec = _job_spec()
    with _serve(_fake_training_api()) as base, Client(base, TOKEN) as c:
        job = c.training.submit(spec, submitted_by="me")
        assert (job.job_id, job.state) == ("j1", "QUEUED")
        assert job.spec() == spec
        assert [line.seq for line in c.training.logs("j1", after=1)] == [2, 3]
        done = c.training.wait("j1", poll_s=0.01)
        assert (done.state, done.result) == ("SUCCEEDED", {"version": 1})
        assert [j.job_id for j in c.training.list()] == ["j1"]
        assert [j.state for j in c.training.run_pending()] == ["SUCCEEDED"]
        with pytest.raises(NotFoundError, match="no job"):
            c.training.get("zz")


# -- carrara up: configuration and composition ------------------------------------------------


def test_route_clashes_are_refused() -> None:
    async def h(request: Request) -> Response:
        return Response()

    a = [Route("/x", h, methods=["GET"]), Route("/healthz", h)]
    b = [Route("/x", h, methods=["POST"])]
    assert [r.path for r in check_routes([("a", a), ("b", b)])] == ["/x", "/x"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="GET /x is defined by both the a and the c API"):
        check_routes([("a", a), ("c", [Route("/x", h, methods=["GET"])])])


def test_up_config_from_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "carrara.toml"
    path.write_text(
        'home = "/srv/c"\nonline_store_url = "redis://h:6379/0"\n'
        "[up]\nworkers = 3\napi_port = 9000\n"
    )
    monkeypatch.delenv("CARRARA_CONFIG", raising=False)
    monkeypatch.setenv("CARRARA_HOME", "/from/env")  # the environment wins over the file
    settings, up = load_up_config(path, api_port=9100, workers=None)
    assert (settings.home, settings.online_store_url) == ("/from/env", "redis://h:6379/0")
    assert (up.workers, up.api_port, up.gateway_grpc_port) == (3, 9100, 8001)
    nested = tmp_path / "nested.toml"
    nested.write_text('[carrara]\nhome = "/n"\n[up]\nmonitor = false\n')
    monkeypatch.delenv("CARRARA_HOME")
    settings, up = load_up_config(nested)
    assert settings.home == "/n" and up.monitor is False
    bad = tmp_path / "bad.toml"
    bad.write_text("[up]\nworkerz = 1\n")
    with pytest.raises(ConfigError, match="workerz"):
        load_up_config(bad)


def test_services_refuse_a_per_process_online_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="redis://"):
        Services(Settings(home=str(tmp_path)))
    settings = Settings(home=str(tmp_path), online_store_url="redis://h:1/0", cache_ttl_seconds=2.5)
    env = settings_env(settings)
    assert env["CARRARA_CACHE_TTL_SECONDS"] == "2.5" and env["CARRARA_HOME"] == str(tmp_path)
    from carrara.config import load_settings

    assert load_settings(None, env=env) == settings  # the children read back the same settings
    svc = Services(settings, UpConfig(api_port=0, gateway_http_port=0, gateway_grpc_port=0))
    assert svc.api_url.startswith("http://127.0.0.1:") and svc.api_port > 0
    assert "CARRARA_CONFIG" not in svc._env


def test_a_child_that_exits_is_reported_by_name_and_the_rest_are_stopped(tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    # The api child fails at once; the others would run until stopped.
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *_api*) echo "api cannot start: boom"; exit 3;; esac\n'
        "exec sleep 30\n"
    )
    fake.chmod(0o755)
    settings = Settings(home=str(tmp_path / "home"), online_store_url="redis://127.0.0.1:1/0")
    up = UpConfig(api_port=0, gateway_http_port=0, gateway_grpc_port=0, workers=2, stop_timeout_s=5)
    svc = Services(settings, up, python=str(fake))
    started = time.monotonic()
    with pytest.raises(ChildExitedError, match=r"api exited with code 3(.|\n)*boom"):
        svc.start()
    assert time.monotonic() - started < 10
    codes = {c.name: c.process.returncode for c in svc.children}
    assert codes["api"] == 3
    assert {"gateway", "worker-1", "worker-2", "monitor", "materializer"} <= set(codes)
    assert all(code == -signal.SIGTERM for name, code in codes.items() if name != "api")
    assert (tmp_path / "home" / "run" / "logs" / "api.log").read_text().startswith("api cannot")


def test_deploy_waits_for_the_exact_versions_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over HTTP as over gRPC, ``Client.deploy`` returns only once the gateway's KServe model
    metadata lists exactly the deployment's versions (not as soon as the model is listed)."""
    from carrara.registry.types import DeployedVariant, Deployment, TrafficSplit, VariantSplit

    polls = {"n": 0}

    async def metadata(request: Request) -> Response:
        polls["n"] += 1
        if request.path_params["model"] != "m":
            return JSONResponse({"error": "unknown model"}, 404)
        versions = ["1"] if polls["n"] < 4 else ["1", "2"]  # the old deployment first
        return JSONResponse({"name": "m", "versions": versions, "platform": "carrara"})

    gateway = Starlette(routes=[Route("/v2/models/{model}", metadata, methods=["GET"])])

    def variant(name: str, version: int, weight: int) -> DeployedVariant:
        return DeployedVariant(
            name=name,
            version=version,
            role="routed",
            weight_bp=weight,
            canary=False,
            artifact_path="a",
            artifact_sha256="0" * 64,
            serving_spec={},
        )

    deployment = Deployment(
        deployment_id=2,
        model="m",
        version=2,
        traffic_split=TrafficSplit(variants=[VariantSplit(name="v2", version=2, weight_bp=10_000)]),
        variants=[variant("v1", 1, 5_000), variant("v2", 2, 5_000)],
        serving_endpoint="",
        created_by="me",
        created_at="now",
        is_active=True,
    )
    with (
        _serve(gateway) as gw,
        Client("http://127.0.0.1:9", TOKEN, gateway=gw, deploy_wait_s=10) as client,
    ):
        monkeypatch.setattr(client.registry, "deploy", lambda *a, **k: deployment)
        assert client.deploy("m", 2) is deployment
        assert polls["n"] == 4  # it waited through three polls of the old versions
        # A model the gateway never lists: a clear deadline error, not an early return.
        other = msgspec.structs.replace(deployment, model="other")
        monkeypatch.setattr(client.registry, "deploy", lambda *a, **k: other)
        client.deploy_wait_s = 0.5
        with pytest.raises(DeadlineExceededError, match=r"does not serve other versions \[1, 2\]"):
            client.deploy("other", 2)


def _tour_registry_calls(p: Any, register: Any) -> list[str]:
    """The README tour's registry calls on a Platform or a Client, with the tour's own
    arguments (``actor=p.actor``); ``register`` stands in for the training job."""
    from carrara.registry.types import Gate

    p.registry.create_model(
        "churn",
        actor=p.actor,
        framework="sklearn",
        gates=[Gate(metric="auc", dataset="holdout", threshold=0.7)],
    )
    register()
    p.registry.record_evaluation("churn", 1, "holdout", {"auc": 0.8}, actor=p.actor)
    result = p.registry.promote("churn", 1, actor=p.actor)
    return [result.version.status, *(g.detail for g in result.gate_results)]


def test_the_tours_registry_calls_run_alike_embedded_and_remote(
    tmp_path: Path, plane: ControlPlane, client: Client
) -> None:
    from carrara.registry.auth import Principal

    admin = Principal("test", frozenset({"admin"}))
    with Platform.local(tmp_path / "embedded") as p:
        embedded = _tour_registry_calls(
            p,
            lambda: p.registry.register(
                "churn", actor=admin, serving_artifact=b"onnx", framework="sklearn"
            ),
        )
    assert client.actor == TOKEN_ACTOR  # a stand-in: the token is who acts
    remote = _tour_registry_calls(
        client,
        lambda: plane.registry.register(
            "churn", actor=admin, serving_artifact=b"onnx", framework="sklearn"
        ),
    )
    assert embedded == remote == ["PRODUCTION", "auc@holdout = 0.8, must be at least 0.7"]
