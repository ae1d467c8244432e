"""The JSON read API of monitoring (models, drift, distributions, performance) on a real
monitoring run, and alert acknowledgement: values checked against what was fed and stored."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest

from carrara.auth import Principal
from carrara.eventlog import EventLog
from carrara.http import api_app, openapi_spec
from carrara.monitoring import MonitoringConsumer, active_alerts, submit_labels
from carrara.monitoring.alerts import (
    Condition,
    acknowledge_alert,
    apply_conditions,
    firing_alerts,
)
from carrara.monitoring.api import PATH_PARAMS, create_routes, endpoints
from carrara.monitoring.performance import roc_auc
from carrara.monitoring.schema import ensure_schema
from carrara.monitoring.store import drift_history
from carrara.monitoring.traffic import SyntheticModel
from carrara.sql import Database

from .helpers import MODEL, WINDOW_MS, publish, register, traffic

TOKENS = {
    "reader-token": Principal("rita", frozenset({"reader"})),
    "deployer-token": Principal("dana", frozenset({"deployer"})),
}
READER = {"authorization": "Bearer reader-token"}
DEPLOYER = {"authorization": "Bearer deployer-token"}
PER_WINDOW = 500


class Fed:
    """What the test fed: the baseline and the labelled records per window."""

    def __init__(self, baseline: float, by_window: dict[int, tuple[list[float], list[float]]]):
        self.baseline = baseline
        self.by_window = by_window


def feed(db: Database, event_log: EventLog) -> Fed:
    """Two stable windows, then two with ``x2`` shifted by one std; every prediction labelled."""
    sm = SyntheticModel(seed=12)
    baseline = register(db, sm)
    records = traffic(sm, [(2, {}), (2, {"x2": 1.0})], per_window=PER_WINDOW)
    publish(event_log, records)
    p = np.array([r.prediction[0] for r in records])
    y = sm.labels(p, np.random.default_rng(1))
    submit_labels(db, sm.label_records(records, y, timestamp_ms=1))
    consumer = MonitoringConsumer(db, event_log)
    consumer.run(stop_when_idle=True, block_ms=0)
    consumer.judge(flush=True)
    by_window: dict[int, tuple[list[float], list[float]]] = {}
    for r, label in zip(records, y.tolist(), strict=True):
        ys, ps = by_window.setdefault(r.timestamp_ms - r.timestamp_ms % WINDOW_MS, ([], []))
        ys.append(label)
        ps.append(r.prediction[0])
    return Fed(baseline, by_window)


class Client:
    """Calls of the monitoring API app in-process (httpx over ASGI)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                return await client.request(method, path, **kw)

        return asyncio.run(go())

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)


@pytest.fixture
def client(db: Database, event_log: EventLog) -> Client:
    return Client(api_app(create_routes(db, event_log, tokens=TOKENS)))


def get(client: Client, path: str, status: int = 200) -> Any:
    r = client.get(path)
    assert r.status_code == status, r.text
    return r.json()


def test_models_drift_distributions_and_performance(
    db: Database, event_log: EventLog, client: Client
) -> None:
    fed = feed(db, event_log)
    starts = [k * WINDOW_MS for k in range(4)]

    alerts = get(client, "/monitoring/alerts")["alerts"]
    assert "churn:v1:drift:x2" in {a["key"] for a in alerts}
    assert get(client, "/monitoring/models") == {
        "models": [{"model": MODEL, "versions": [1], "active_alerts": len(alerts)}]
    }

    drift = get(client, f"/monitoring/models/{MODEL}/drift")  # the newest version: 1
    assert drift["model"] == MODEL and drift["version"] == 1
    assert drift["thresholds"]["psi_alert"] == 0.2 and drift["thresholds"]["psi_warn"] == 0.1
    assert [w["window_start"] for w in drift["windows"]] == starts  # oldest first
    assert {(w["window_ms"], w["n"]) for w in drift["windows"]} == {(WINDOW_MS, PER_WINDOW)}
    stored = {(s, r.feature): r for s, r in drift_history(db, MODEL, 1)}
    for w in drift["windows"]:
        for feature, point in w["features"].items():
            r = stored[(w["window_start"], feature)]
            assert point == {"psi": r.psi, "ks": r.ks_statistic, "js": r.js, "status": r.status}
    newest = drift["windows"][-1]["features"]
    assert newest["x2"]["psi"] > drift["thresholds"]["psi_alert"]
    assert newest["x2"]["status"] == "alert"
    assert newest["x0"]["psi"] < drift["thresholds"]["psi_warn"]
    assert drift["windows"][0]["features"]["x2"]["status"] != "alert"
    # KS for numeric features, JS for categorical ones; null where not computed.
    assert newest["x2"]["ks"] > 0.1 and newest["x2"]["js"] is None
    assert newest["segment"]["ks"] is None and newest["segment"]["js"] is not None
    assert (
        get(client, f"/monitoring/models/{MODEL}/drift?version=1&limit=2")["windows"]
        == (drift["windows"][-2:])
    )

    dist = get(client, f"/monitoring/models/{MODEL}/distributions")
    assert dist["version"] == 1 and dist["window_start"] == starts[-1]
    by_feature = {f["feature"]: f for f in dist["features"]}
    assert set(by_feature) == {"x0", "x1", "x2", "x3", "segment", "__prediction__"}
    for f in dist["features"]:
        assert len(f["bins"]) == len(f["reference"]) == len(f["current"]), f["feature"]
        assert sum(f["reference"]) == pytest.approx(1.0)
        assert sum(f["current"]) == pytest.approx(1.0)
        assert f["n"] == PER_WINDOW
    x2, x0, segment = by_feature["x2"], by_feature["x0"], by_feature["segment"]
    assert x2["kind"] == "numeric" and x2["status"] == "alert"
    assert max(abs(c - r) for c, r in zip(x2["current"], x2["reference"], strict=True)) > 0.1
    assert max(abs(c - r) for c, r in zip(x0["current"], x0["reference"], strict=True)) < 0.05
    assert x2["bins"][0].startswith("≤") and x2["bins"][-1].startswith(">")
    assert segment["kind"] == "categorical" and segment["bins"][-1] == "other"

    perf = get(client, f"/monitoring/models/{MODEL}/performance")
    assert perf["version"] == 1
    [auc] = perf["metrics"]
    assert auc["metric"] == "auc" and auc["baseline"] == pytest.approx(fed.baseline)
    assert auc["allowed"] == 0.05 and auc["higher_is_better"] is True
    assert auc["threshold"] == pytest.approx(fed.baseline - 0.05)
    assert [(w["window_start"], w["n"]) for w in auc["windows"]] == [
        (s, PER_WINDOW) for s in starts
    ]
    for w in auc["windows"]:
        ys, ps = fed.by_window[w["window_start"]]
        assert w["value"] == pytest.approx(roc_auc(ys, ps))
    last = get(client, f"/monitoring/models/{MODEL}/performance?limit=1")["metrics"][0]
    assert last["windows"] == auc["windows"][-1:]


def test_reads_answer_404_and_400_with_a_message(
    db: Database, event_log: EventLog, client: Client
) -> None:
    assert get(client, "/monitoring/models") == {"models": []}
    body = get(client, "/monitoring/models/nope/drift", 404)
    assert body["error"] == "NOT_FOUND" and "no monitored model 'nope'" in body["message"]
    register(db, SyntheticModel(seed=3))  # profiled, nothing judged yet
    assert get(client, "/monitoring/models")["models"] == [
        {"model": MODEL, "versions": [1], "active_alerts": 0}
    ]
    assert get(client, f"/monitoring/models/{MODEL}/drift")["windows"] == []
    dist = get(client, f"/monitoring/models/{MODEL}/distributions")
    assert dist["window_start"] is None and {sum(f["current"]) for f in dist["features"]} == {0}
    assert [
        m["windows"] for m in get(client, f"/monitoring/models/{MODEL}/performance")["metrics"]
    ] == [[]]
    for view in ("drift", "distributions", "performance"):
        body = get(client, f"/monitoring/models/{MODEL}/{view}?version=9", 404)
        assert "churn v9" in body["message"] and "versions: [1]" in body["message"]
        for bad in ("abc", "1.5", "9" * 30):
            body = get(client, f"/monitoring/models/{MODEL}/{view}?version={bad}", 400)
            assert body["error"] == "INVALID_ARGUMENT" and "version" in body["message"]
    for view in ("drift", "performance"):
        for bad in ("0", "201", "x"):
            body = get(client, f"/monitoring/models/{MODEL}/{view}?limit={bad}", 400)
            assert "limit" in body["message"]


def condition(active: bool, subject: str) -> Condition:
    return Condition(
        model="m", version=2, kind="drift", subject=subject, active=active, value=0.3, threshold=0.2
    )


def test_acknowledge_needs_a_deployer_and_a_firing_alert(db: Database, client: Client) -> None:
    ensure_schema(db)
    with db.transaction() as tx:  # a key with '/' and ':' in its subject
        apply_conditions(tx, [condition(True, "a/b:c"), condition(True, "x1")], now_ms=1)
    key = "m:v2:drift:a/b:c"
    path = "/monitoring/alerts/acknowledge"
    assert client.post(path, json={"key": key}).status_code == 401
    r = client.post(path, json={"key": key}, headers=READER)
    assert r.status_code == 403 and "deployer" in r.json()["message"]

    r = client.post(path, json={"key": key, "comment": "looking into it"}, headers=DEPLOYER)
    assert r.status_code == 200, r.text
    acked = r.json()
    assert acked["key"] == key and acked["state"] == "firing"
    assert acked["acknowledged_by"] == "dana" and acked["ack_comment"] == "looking into it"
    assert isinstance(acked["acknowledged_at_ms"], int)
    listed = {a["key"]: a for a in get(client, "/monitoring/alerts?model=m")["alerts"]}
    assert listed[key] == acked
    assert listed["m:v2:drift:x1"]["acknowledged_by"] is None
    assert listed["m:v2:drift:x1"]["acknowledged_at_ms"] is None
    assert listed["m:v2:drift:x1"]["ack_comment"] == ""
    # Again: the newest acknowledgement replaces the earlier one.
    r = client.post(path, json={"key": key}, headers=DEPLOYER)
    assert r.status_code == 200 and r.json()["ack_comment"] == ""

    r = client.post(path, json={"key": "m:v2:drift:zz"}, headers=DEPLOYER)
    assert r.status_code == 404 and "no alert 'm:v2:drift:zz'" in r.json()["message"]
    for bad in ({"key": key, "comment": 5}, {"comment": "no key"}, {"key": key, "x": 1}):
        r = client.post(path, json=bad, headers=DEPLOYER)
        assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT", bad
    assert client.post(path, headers=DEPLOYER).status_code == 400  # no body

    with db.transaction() as tx:
        apply_conditions(tx, [condition(False, "a/b:c")], now_ms=2)  # resolves
    r = client.post(path, json={"key": key}, headers=DEPLOYER)
    assert r.status_code == 409 and "not firing" in r.json()["message"]
    with db.transaction() as tx:
        apply_conditions(tx, [condition(True, "a/b:c")], now_ms=3)  # fires again
    [again] = [a for a in firing_alerts(db, "m") if a.key == key]
    assert (again.acknowledged_by, again.acknowledged_at_ms, again.ack_comment) == (None, None, "")
    assert again.started_ms == 3


def test_the_new_endpoints_are_in_the_openapi_document(db: Database, event_log: EventLog) -> None:
    doc = openapi_spec("monitoring", endpoints(db, event_log), PATH_PARAMS)
    paths = doc["paths"]
    ack = paths["/monitoring/alerts/acknowledge"]["post"]
    assert ack["x-role"] == "deployer" and {"404", "409"} <= set(ack["responses"])
    for path in ("", "/{model}/drift", "/{model}/distributions", "/{model}/performance"):
        op = paths["/monitoring/models" + path]["get"]
        assert "security" not in op and "200" in op["responses"], path
    schemas = doc["components"]["schemas"]
    assert {"acknowledged_by", "acknowledged_at_ms", "ack_comment"} <= set(
        schemas["ActiveAlert"]["properties"]
    )


def test_acknowledging_directly(db: Database) -> None:
    ensure_schema(db)
    with db.transaction() as tx:
        apply_conditions(tx, [condition(True, "x1")], now_ms=1)
    acked = acknowledge_alert(db, "m:v2:drift:x1", "ops", "ok", now_ms=7)
    assert (acked.acknowledged_by, acked.acknowledged_at_ms, acked.ack_comment) == ("ops", 7, "ok")
    assert firing_alerts(db) == [acked] == active_alerts(db)
