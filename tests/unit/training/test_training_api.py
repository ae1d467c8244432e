"""The training REST API through starlette's TestClient against SQLite: jobs, logs, cancel,
triggers, auth, and the error shape."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from starlette.applications import Starlette

from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.registry.auth import Principal
from carrara.training.api import create_app
from carrara.training.queue import JobQueue

with warnings.catch_warnings():
    # Starlette asks for httpx2 with its TestClient; plain httpx (what we ship) still works.
    warnings.simplefilter("ignore", Warning)
    from starlette.testclient import TestClient

SPEC: dict[str, Any] = {
    "model_name": "churn",
    "dataset": {
        "features": ["trips:x"],
        "label_source": "l.parquet",
        "label_column": "y",
        "entity_column": "id",
        "start": "2026-01-01T00:00:00Z",
        "end": "2026-02-01T00:00:00Z",
    },
    "model": {"estimator": "ridge", "task": "regression"},
}
PUB = {"Authorization": "Bearer pub-token"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TestClient, JobQueue]]:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with (
        JobQueue.open(url, gpus_per_node=2) as queue,
        FeatureService.open(catalog_url=url, offline_path=str(tmp_path / "off")) as features,
    ):
        features.apply(
            Definitions(
                entities=(Entity(name="driver", join_key="id"),),
                groups=(
                    FeatureGroup(name="trips", entity="driver", features=(Feature(name="x"),)),
                ),
            )
        )
        tokens = {
            "pub-token": Principal("ana", frozenset({"publisher"})),
            "read-token": Principal("bob", frozenset({"reader"})),
            "admin-token": Principal("root", frozenset({"admin"})),
        }
        app = Starlette(routes=create_app(queue, features, tokens=tokens))
        with TestClient(app) as client:
            yield client, queue


def with_(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            out[section][key] = value
        else:
            out[section] = value
    return out


def test_submit_get_list_logs_cancel(env: tuple[TestClient, JobQueue]) -> None:
    client, queue = env
    r = client.post("/training-jobs", json={"spec": SPEC}, headers=PUB)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "QUEUED" and job["model_name"] == "churn"
    assert job["submitted_by"] == "ana"  # from the token when the body does not say
    assert job["spec"]["dataset"]["features"] == ["trips:x"] and job["attempts"] == 0
    assert job["gpus"] == [] and job["trigger"] == "" and job["error"] == ""
    jid = job["job_id"]
    assert client.get(f"/training-jobs/{jid}").json()["job_id"] == jid
    other = client.post(
        "/training-jobs", json={"spec": SPEC, "submitted_by": "ana"}, headers=PUB
    ).json()
    assert other["submitted_by"] == "ana"  # naming yourself is fine
    listed = client.get("/training-jobs", params={"limit": 1}).json()["jobs"]
    assert [j["job_id"] for j in listed] == [other["job_id"]]
    assert len(client.get("/training-jobs", params={"state": "QUEUED"}).json()["jobs"]) == 2

    claimed = queue.claim("w1")
    assert claimed is not None and claimed.job_id == jid
    queue.log(jid, "epoch 1 loss=0.5")
    queue.log(jid, "epoch 2 loss=0.25", "DEBUG")
    lines = client.get(f"/training-jobs/{jid}/logs").json()["lines"]
    assert [(ln["seq"], ln["level"], ln["message"]) for ln in lines] == [
        (1, "INFO", "epoch 1 loss=0.5"),
        (2, "DEBUG", "epoch 2 loss=0.25"),
    ]
    assert isinstance(lines[0]["ts_us"], int)
    after = client.get(f"/training-jobs/{jid}/logs", params={"after": 1}).json()["lines"]
    assert [ln["seq"] for ln in after] == [2]

    r = client.post(f"/training-jobs/{jid}/cancel", headers=PUB)
    assert r.status_code == 200 and r.json()["state"] == "RUNNING" and r.json()["cancel_requested"]
    r = client.post(f"/training-jobs/{other['job_id']}/cancel", headers=PUB)
    assert r.json()["state"] == "CANCELLED"
    r = client.post(f"/training-jobs/{other['job_id']}/cancel", headers=PUB)
    assert r.status_code == 409 and r.json()["error"] == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (with_(SPEC, dataset__features=["trips:nope"]), "unknown feature 'trips:nope'"),
        (with_(SPEC, dataset__features=["ghost:x"]), "unknown feature group 'ghost'"),
        (with_(SPEC, dataset__end="2025-01-01T00:00:00Z"), "empty time range"),
        (with_(SPEC, resources={"gpus": 3}), "3 GPU(s) requested but the largest node has 2"),
        (with_(SPEC, resources={"nodes": 2}), "only framework 'pytorch'"),
        (with_(SPEC, model={"estimator": "ridge", "task": "regression", "x": 1}), "unknown field"),
    ],
)
def test_bad_specs_are_400_with_the_reason(
    env: tuple[TestClient, JobQueue], spec: dict[str, Any], message: str
) -> None:
    client, queue = env
    r = client.post("/training-jobs", json={"spec": spec}, headers=PUB)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "INVALID_ARGUMENT" and message in r.json()["message"]
    assert queue.list() == []


def test_errors_and_auth(env: tuple[TestClient, JobQueue]) -> None:
    client, _ = env
    r = client.get("/training-jobs/nope")
    assert (
        r.status_code == 404 and r.json()["error"] == "NOT_FOUND" and "nope" in r.json()["message"]
    )
    assert client.get("/training-jobs/nope/logs").status_code == 404
    assert client.post("/training-jobs/nope/cancel", headers=PUB).status_code == 404
    r = client.post("/training-jobs", json={"spec": SPEC})
    assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED"
    assert "publisher" in r.json()["message"]
    r = client.post(
        "/training-jobs", json={"spec": SPEC}, headers={"Authorization": "Bearer read-token"}
    )
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    r = client.post("/training-jobs", json={"spec": SPEC}, headers={"Authorization": "Bearer zzz"})
    assert r.status_code == 401
    r = client.post("/training-jobs", content=b"{not json", headers=PUB)
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    r = client.get("/training-jobs", params={"state": "DONE"})
    assert r.status_code == 400 and "unknown job state" in r.json()["message"]
    r = client.get("/training-jobs", params={"limit": "x"})
    assert r.status_code == 400
    doc = client.get("/training/openapi.json").json()
    assert set(doc["paths"]) == {
        "/training-jobs",
        "/training-jobs/{job_id}",
        "/training-jobs/{job_id}/cancel",
        "/training-jobs/{job_id}/logs",
        "/training-triggers",
        "/training-triggers/{name}",
        "/training-triggers/{name}/run",
    }
    assert doc["paths"]["/training-jobs"]["post"]["security"] == [{"bearer": []}]


def test_trigger_crud_and_run(env: tuple[TestClient, JobQueue]) -> None:
    client, queue = env
    body = {"name": "nightly", "kind": "schedule", "schedule": "0 3 * * *", "spec": SPEC}
    assert client.post("/training-triggers", json=body).status_code == 401
    r = client.post("/training-triggers", json=body, headers=PUB)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "nightly" and r.json()["created_by"] == "ana"
    assert client.post("/training-triggers", json=body, headers=PUB).status_code == 409
    bad = dict(body, name="b2", schedule="61 * * * *")
    r = client.post("/training-triggers", json=bad, headers=PUB)
    assert r.status_code == 400 and "Bad minute (minute 0-59" in r.json()["message"]
    assert [t["name"] for t in client.get("/training-triggers").json()["triggers"]] == ["nightly"]
    r = client.post("/training-triggers/nightly/run", headers=PUB)
    assert r.status_code == 201 and r.json()["outcome"] == "submitted"
    job_id = r.json()["job_id"]
    r = client.post("/training-triggers/nightly/run", headers=PUB)
    assert r.status_code == 200 and r.json()["outcome"] == "deferred"
    assert (
        client.get("/training-jobs", params={"trigger": "nightly"}).json()["jobs"][0]["job_id"]
        == job_id
    )
    assert client.delete("/training-triggers/nightly").status_code == 401
    assert client.delete("/training-triggers/nightly", headers=PUB).json()["name"] == "nightly"
    assert client.delete("/training-triggers/nightly", headers=PUB).status_code == 404
    assert queue.get(job_id).trigger == "nightly"  # the run outlives its trigger


def test_open_when_no_tokens(tmp_path: Path) -> None:
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}") as queue:
        app = Starlette(routes=create_app(queue, None))
        with TestClient(app) as client:
            r = client.post("/training-jobs", json={"spec": SPEC, "submitted_by": "me"})
            assert r.status_code == 201 and r.json()["submitted_by"] == "me"


def test_the_token_decides_who_submitted_a_job(env: tuple[TestClient, JobQueue]) -> None:
    client, queue = env
    r = client.post("/training-jobs", json={"spec": SPEC, "submitted_by": "ceo"}, headers=PUB)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "PERMISSION_DENIED" and "'ana'" in r.json()["message"]
    assert queue.list() == []  # nothing queued under a borrowed name
    admin = {"Authorization": "Bearer admin-token"}
    r = client.post("/training-jobs", json={"spec": SPEC, "submitted_by": "ceo"}, headers=admin)
    assert r.status_code == 201 and r.json()["submitted_by"] == "ceo"  # on someone's behalf
    r = client.post("/training-jobs", json={"spec": SPEC}, headers=admin)
    assert r.json()["submitted_by"] == "root"


def test_label_sources_must_lie_under_the_data_roots(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "escape").symlink_to("/etc")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with JobQueue.open(url, data_roots=[str(data)]) as queue:
        tokens = {"pub-token": Principal("ana", frozenset({"publisher"}))}
        app = Starlette(routes=create_app(queue, None, tokens=tokens))
        with TestClient(app) as client:

            def submit(source: str) -> Any:
                spec = with_(SPEC, dataset__label_source=source)
                return client.post("/training-jobs", json={"spec": spec}, headers=PUB)

            for source in (
                "/etc/passwd",
                f"{data}/../../../etc/passwd",  # ".." resolved first
                f"{data}/escape/passwd",  # a symlink out of the root
                "file:///etc/passwd",
            ):
                r = submit(source)
                assert r.status_code == 403, (source, r.text)
                assert r.json()["error"] == "PERMISSION_DENIED"
                assert "outside the folders training jobs may read" in r.json()["message"]
            for source, why in (
                ("s3://bucket/labels.parquet", "scheme is not supported"),
                ("http://evil.example/x.csv", "scheme is not supported"),
                ("labels.parquet", "must be an absolute path"),
            ):
                r = submit(source)
                assert r.status_code == 400, (source, r.text)
                assert r.json()["error"] == "INVALID_ARGUMENT" and why in r.json()["message"]
            assert queue.list() == []
            r = submit(str(data / "labels.parquet"))  # under a root, but missing: a 400
            assert r.status_code == 400 and "no such file" in r.json()["message"], r.text
            (data / "labels.parquet").write_text("id,event_timestamp\n")
            r = submit(str(data / "labels.parquet"))  # not Parquet
            assert r.status_code == 400 and "not a readable Parquet" in r.json()["message"]
            pd.DataFrame({"id": [1], "event_timestamp": [0], "y": [1.0]}).to_parquet(
                data / "labels.parquet"
            )
            assert submit(str(data / "labels.parquet")).status_code == 201
            assert submit(f"file://{data}/sub/../labels.parquet").status_code == 201
