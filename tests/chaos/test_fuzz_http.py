"""HTTP fuzzing of every route of the control plane (registry, features, feature admin,
monitoring, training) and of the gateway's HTTP front (``/predict``, KServe v2 REST), both on
real uvicorn servers: random bytes, truncated JSON, wrong types, NaN/Inf, 20 MB bodies, deep
JSON, unicode, NUL and path-like names (``../../etc/passwd``, ``%00``, very long), with and
without tokens. Asserted: no answer is a 5xx, no request fails at the transport (no dropped
connection, no crash), nothing is written without a token (every table and file of the control
plane unchanged after the unauthenticated round), and both servers still answer afterwards.

The routes are enumerated from the apps, so a new route is fuzzed without a change here. Inputs
come from a seeded generator (``CARRARA_CHAOS_SEED``); ``CARRARA_CHAOS_FULL=1`` (``make chaos``)
multiplies the corpus. Counts (requests, status histogram per API) go to
``build/chaos/http_fuzz.json`` and to the test's output.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from starlette.routing import Route

from carrara.config import Settings
from carrara.core import (
    AssemblerSpec,
    FeatureRef,
    GroupSchema,
    encode_feature_vector,
)
from carrara.gateway.http_front import create_app as gateway_app
from carrara.gateway.service import Gateway
from carrara.services import ControlPlane
from tests.chaos.record import FULL, CaseRecord, rss_mb
from tests.servers import scorer_engine, serve_app

pytestmark = [pytest.mark.chaos]

SEED = int(os.environ.get("CARRARA_CHAOS_SEED", "20240607"))
SCALE = 10 if FULL else 1
TOKEN = "fuzz-bootstrap-token"
MODEL, GROUP = "fraud", "trips"
BIG = 20 << 20  # the "20 MB body"

#: Path parameter values (already percent-encoded where they must be).
NAMES = [
    MODEL, GROUP, "1", "0", "-1", "9" * 30, "NaN", "m", "模型", "💥🔥", "é" * 300, "a" * 5000,
    "%00", "a%00b", "a%0Ab", "%1B", "%7F", "..%2F..%2Fetc%2Fpasswd", "..", ".", "%2e%2e",
    "%s%n%x", "{model_id}", "m;DROP TABLE models", "%E2%80%AEm", "%EF%BB%BFm", "%ff%fe",
    "trips:1", "trips:x",
]  # fmt: skip
QUERIES = [
    "", "?version=abc", "?version=-1", "?version=" + "9" * 30, "?version=1", "?dry_run=1",
    "?status=%00", "?status=PRODUCTION", "?kind=..%2F..%2Fx", "?kind=native", "?limit=0",
    "?limit=" + "9" * 30, "?after=-5", "?after=" + "9" * 30, "?state=%00", "?flush=x",
    "?model=%00", "?model=" + "m" * 5000, "?trigger=%0A",
]  # fmt: skip
AUTH = {
    "none": {},
    "unknown": {"authorization": "Bearer not-a-token"},
    "basic": {"authorization": "Basic Zm9vOmJhcg=="},
    "empty bearer": {"authorization": "Bearer"},
    "huge": {"authorization": "Bearer " + "x" * 10_000},
}
SPEC: dict[str, Any] = {
    "model_name": MODEL,
    "dataset": {
        "features": [f"{GROUP}:a"],
        "label_source": "l.parquet",
        "label_column": "y",
        "entity_column": "rider_id",
    },
    "model": {"estimator": "ridge", "task": "regression"},
}
ARTIFACT = base64.b64encode(b"\x08\x07fake-onnx-model").decode()
#: A well-formed body per route (the seeds of mutation); routes without one get {"x": 1}.
EXAMPLES: dict[tuple[str, str], Any] = {
    ("POST", "/models"): {"name": "fz", "framework": "sklearn", "description": "d", "gates": []},
    ("PATCH", "/models/{model_id}"): {"description": "x", "high_stakes": False, "gates": []},
    ("POST", "/models/{model_id}/versions"): {
        "framework": "sklearn",
        "serving_artifact": ARTIFACT,
        "metrics": {"auc": 0.9},
        "tags": {"k": "v"},
        "serving_spec": {"a": [1, 2]},
    },
    ("POST", "/models/{model_id}/versions/{version_id:int}/evaluations"): {
        "dataset": "holdout",
        "metrics": {"auc": 0.5},
    },
    ("POST", "/models/{model_id}/versions/{version_id:int}/approve"): {"comment": "ok"},
    ("POST", "/models/{model_id}/versions/{version_id:int}/deploy"): {
        "traffic_split": {"variants": [{"name": "main", "version": 1, "weight_bp": 10000}]}
    },
    ("POST", "/features/groups/{group}/get-online"): {"entity_ids": ["r1", "r2"]},
    ("POST", "/features/apply"): {
        "entities": [{"name": "rider", "join_key": "rider_id"}],
        "groups": [{"name": GROUP, "entity": "rider", "features": [{"name": "a"}], "ttl_days": 0}],
    },
    ("POST", "/features/groups/{group}/ingest"): [
        {"rider_id": "r1", "event_timestamp": 1_700_000_000_000_000, "a": 1.0}
    ],
    ("POST", "/features/groups/{group}/write-offline"): [
        {"rider_id": "r1", "event_timestamp": 1_700_000_000_000_000, "a": 1.0}
    ],
    ("POST", "/features/groups/{group}/publish"): [{"rider_id": "r1", "a": 1.0}],
    ("POST", "/features/materialize"): {"group": GROUP, "full": False, "overlap_s": 1.0},
    ("POST", "/features/training-set"): {"entity_df": "AAAA", "features": [f"{GROUP}:a"]},
    ("PUT", "/monitoring/models/{model}/config"): {"window_ms": 60_000},
    ("POST", "/training-jobs"): {"spec": SPEC},
    ("POST", "/training-triggers"): {"name": "t1", "kind": "manual", "spec": SPEC},
    ("POST", "/predict/{model}"): {"entity_ids": ["u1", "u2"], "overrides": {"a": 1.0}},
    ("POST", "/v2/models/{model}/infer"): {
        "inputs": [{"name": "entity_ids", "shape": [1], "datatype": "BYTES", "data": ["u1"]}],
        "parameters": {"binary_data_output": False},
    },
}
EXAMPLES[("POST", "/v2/models/{model}/versions/{version}/infer")] = EXAMPLES[
    ("POST", "/v2/models/{model}/infer")
]
WRONG = [None, True, -1, 0, 1e308, -1e308, 2**64, "", "x" * 300, "\u0000", "模型", [], {}, [[[]]]]


# -- corpus -----------------------------------------------------------------------------------


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        out = [path] if path else []
        for k, v in value.items():
            out += _leaves(v, (*path, k))
        return out
    if isinstance(value, list):
        out = [path] if path else []
        for i, v in enumerate(value):
            out += _leaves(v, (*path, i))
        return out
    return [path]


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


def _deep(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def bodies(rng: random.Random, example: Any, n: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(kind, body, extra headers) inputs for one route, seeded."""
    raw = json.dumps(example).encode()
    js = {"content-type": "application/json"}
    out: list[tuple[str, bytes, dict[str, str]]] = [
        ("valid", raw, js),
        ("empty", b"", js),
        ("null", b"null", js),
        ("nan", raw.replace(b"1", b"NaN", 1) if b"1" in raw else b'{"x": NaN}', js),
        ("inf", b'{"x": Infinity, "y": -Infinity, "z": 1e999}', js),
        ("deep 100", _deep(100), js),
        ("deep 100k", b"[" * 100_000 + b"]" * 100_000, js),
        ("nul string", b'{"name": "a\\u0000b", "x": "\\u0000"}', js),
        ("lone surrogate", b'{"name": "\\ud800", "description": "\\udfff"}', js),
        ("unicode", json.dumps({"name": "模型💥\u202e", "x": "é" * 1000}).encode(), js),
        ("not utf-8", b'{"name": "\xff\xfe"}', js),
        ("arrow junk", rng.randbytes(64), {"content-type": "application/vnd.apache.arrow.stream"}),
        ("msgpack junk", rng.randbytes(64), {"content-type": "application/msgpack"}),
        ("gzip junk", b"\x1f\x8b" + rng.randbytes(30), {**js, "content-encoding": "gzip"}),
        ("gzip ok", gzip.compress(raw), {**js, "content-encoding": "gzip"}),
        ("bad encoding", raw, {**js, "content-encoding": "br"}),
    ]
    leaves = _leaves(example)
    for _ in range(n):
        cut = rng.randrange(0, max(1, len(raw)))
        out.append(("truncated", raw[:cut], js))
        out.append(("random bytes", rng.randbytes(rng.choice([1, 7, 100, 4096])), js))
        flipped = bytearray(raw)
        if flipped:
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        out.append(("bit flip", bytes(flipped), js))
        if leaves:
            wrong = _replace(example, rng.choice(leaves), rng.choice(WRONG))
            out.append(("wrong type", json.dumps(wrong).encode(), js))
        deep_leaf = _replace(example, rng.choice(leaves), "__D__") if leaves else "__D__"
        nested = json.dumps(deep_leaf).encode().replace(b'"__D__"', _deep(rng.choice([70, 3000])))
        out.append(("deep leaf", nested, js))
    return out


# -- servers ----------------------------------------------------------------------------------


def serve(app: Any) -> Any:
    return serve_app(app, log_level="critical")


class _Store:
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            entity = key.rsplit(":", 1)[-1]
            out.append(encode_feature_vector(entity, "user", 1, [1.0, 2.0]) if entity else None)
        return out


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ControlPlane]:
    """The control plane on SQLite, and on the real PostgreSQL (which refuses NUL in text:
    where a NUL in a path parameter used to reach the database and answer 500)."""
    url = "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))
    settings = Settings(
        home=str(tmp_path / "home"), registry_url=url, online_store_url="memory://", api_token=TOKEN
    )
    cp = ControlPlane(settings)
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    refs = (FeatureRef("user", "a"), FeatureRef("user", "b"))
    spec = AssemblerSpec(groups=(GroupSchema("user", 1, ("a", "b")),), features=refs)
    engine = scorer_engine(
        tmp_path_factory.mktemp("fuzz-model"),
        spec,
        np.eye(2, dtype=np.float32),
        [0, 0],
        store=_Store(),
        model=MODEL,
        version=1,
        variant="v1",
    )
    gw = Gateway(engine)
    try:
        yield gw
    finally:
        gw.close()


def state_of(plane: ControlPlane) -> dict[str, Any]:
    """Every row of every table of the control plane's databases and every file under its
    home (sizes): what an unauthenticated request must not change."""
    home = Path(plane.settings.home)
    out: dict[str, Any] = {}
    with plane.db.transaction() as tx:
        if plane.db.dialect == "sqlite":
            listed = tx.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            listed = tx.fetchall(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        for (table,) in sorted(listed):
            rows = tx.fetchall(f'SELECT * FROM "{table}"')
            out[f"db:{table}"] = sorted(map(repr, rows))
    for db in sorted(home.rglob("*.db")):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            for table in sorted(tables):
                rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()
                out[f"{db.name}:{table}"] = sorted(map(repr, rows))
    out["files"] = sorted(
        (str(p.relative_to(home)), p.stat().st_size)
        for p in home.rglob("*")
        if p.is_file() and not p.name.endswith(("-wal", "-shm", "-journal"))
    )
    return out


# -- the fuzz run -----------------------------------------------------------------------------


def routes_of(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every route of ``app``."""
    out = []
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            out.append((method, route.path))
    return out


def fill(template: str, rng: random.Random) -> str:
    """``template`` with each parameter replaced by a fuzz name (or a valid one)."""
    path = template
    while "{" in path:
        start = path.index("{")
        end = path.index("}", start)
        name = path[start + 1 : end]
        if name.endswith(":int"):
            value = rng.choice(["1", "2", "0", "9" * 30])
        elif name.endswith(":path"):
            value = rng.choice(["x", "a/b", "..%2F..%2Fetc%2Fpasswd", "%00"])
        else:
            value = rng.choice(NAMES)
            if not value.isascii():
                value = quote(value, safe="%")
        path = path[:start] + value + path[end + 1 :]
    return path


VALID = {"model_id": MODEL, "model": MODEL, "group": GROUP, "version_id:int": "1", "version": "1",
         "version:int": "1", "job_id": "nope", "name": "t1", "group_version": f"{GROUP}:1",
         "rest:path": "x", "asset": "app.js"}  # fmt: skip


def valid_path(template: str) -> str:
    """``template`` with every parameter replaced by a value that names something real."""
    path = template
    for name, value in VALID.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, template
    return path


class Run:
    """Counts of one fuzz round, and what went wrong (5xx answers, transport errors)."""

    def __init__(self) -> None:
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.by_api: dict[str, Counter[int]] = {}
        self.problems: list[str] = []

    def send(
        self,
        http: httpx.Client,
        api: str,
        method: str,
        path: str,
        *,
        content: bytes = b"",
        headers: dict[str, str] | None = None,
        what: str = "",
    ) -> int:
        self.sent += 1
        try:
            r = http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            self.problems.append(f"{api} {method} {path[:120]} [{what}]: {type(exc).__name__}")
            self.statuses[0] += 1
            return 0
        self.statuses[r.status_code] += 1
        self.by_api.setdefault(api, Counter())[r.status_code] += 1
        if r.status_code >= 500:
            self.problems.append(
                f"{api} {method} {path[:120]} [{what}] -> {r.status_code}: {r.text[:200]}"
            )
        return r.status_code


def fuzz(
    run: Run,
    rng: random.Random,
    apis: dict[str, tuple[httpx.Client, Any]],
    headers_for: Callable[[], dict[str, str]],
    *,
    big_routes: set[tuple[str, str]],
) -> None:
    for api, (http, app) in apis.items():
        for method, template in routes_of(app):
            example = EXAMPLES.get((method, template), {"x": 1})
            for _ in range(2 * SCALE):  # odd names and queries, with a valid body
                path = fill(template, rng) + rng.choice(QUERIES)
                body = json.dumps(example).encode() if method != "GET" else b""
                run.send(http, api, method, path, content=body, headers=headers_for())
            base = valid_path(template)
            odd = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
            run.send(http, api, odd, base, headers=headers_for(), what="wrong method")
            if method == "GET":
                continue
            for kind, body, extra in bodies(rng, example, 2 * SCALE):
                run.send(
                    http,
                    api,
                    method,
                    base,
                    content=body,
                    headers={**headers_for(), **extra},
                    what=kind,
                )
            if (method, template) in big_routes:
                big = b'{"x": "' + b"a" * BIG + b'"}'
                run.send(http, api, method, base, content=big, headers=headers_for(), what="20 MB")


def test_http_fuzz_every_route(
    plane: ControlPlane,
    gateway: Gateway,
    chaos_record: Callable[..., CaseRecord],
    capsys: pytest.CaptureFixture[str],
) -> None:
    backend = plane.db.dialect
    rec = chaos_record(
        "http_fuzz" if backend == "sqlite" else f"http_fuzz_{backend}",
        title=f"HTTP fuzz: every control-plane ({backend}) and gateway HTTP route",
        asserted=(
            "Random bytes, truncated and bit-flipped JSON, wrong types, NaN/Inf, 20 MB bodies, "
            "deep JSON, unicode, NUL and path-like names, bad tokens, on every route of the "
            "control plane and the gateway's HTTP front: no 5xx, no transport error, nothing "
            "written without a token, both servers healthy afterwards."
        ),
    )
    rng = random.Random(SEED)
    admin = {"authorization": f"Bearer {TOKEN}"}
    rec.rss_before_mb = rss_mb()
    start = time.monotonic()
    front = gateway_app(gateway)
    with (
        serve(plane.app) as cp_url,
        serve(front) as gw_url,
        httpx.Client(base_url=cp_url, timeout=60) as cp,
        httpx.Client(base_url=gw_url, timeout=60) as gw,
    ):
        # Something for the routes to find: a model with a version, a feature group.
        defs = EXAMPLES[("POST", "/features/apply")]
        assert cp.post("/features/apply", json=defs, headers=admin).status_code == 200
        assert cp.post("/models", json={"name": MODEL}, headers=admin).status_code == 201
        reg = EXAMPLES[("POST", "/models/{model_id}/versions")]
        assert cp.post(f"/models/{MODEL}/versions", json=reg, headers=admin).status_code == 201
        apis = {"control plane": (cp, plane.app), "gateway": (gw, front)}
        big = {
            ("POST", "/models/{model_id}/versions"),  # 512 MB limit: read and refused as JSON
            ("POST", "/features/groups/{group}/get-online"),
            ("POST", "/training-jobs"),
            ("POST", "/predict/{model}"),
            ("POST", "/v2/models/{model}/infer"),
        }
        if FULL:
            big |= {(m, t) for api in apis.values() for m, t in routes_of(api[1]) if m != "GET"}

        # Every read once (some parts create their tables on first use), then round 1:
        # without a valid token. Nothing may change.
        for api, (http, app) in apis.items():
            for method, template in routes_of(app):
                if method == "GET":
                    assert http.get(valid_path(template)).status_code < 500, (api, template)
        before = state_of(plane)
        unauth = Run()
        fuzz(unauth, rng, apis, lambda: dict(AUTH[rng.choice(sorted(AUTH))]), big_routes=big)
        assert state_of(plane) == before, "an unauthenticated request changed the control plane"

        # Round 2: with the admin token (writes allowed).
        auth = Run()
        fuzz(auth, rng, apis, lambda: dict(admin), big_routes=big)

        # Both servers still answer, and still do real work.
        assert cp.get("/healthz").status_code == 200 and gw.get("/healthz").status_code == 200
        assert MODEL in [m["name"] for m in cp.get("/models").json()]
        ok = gw.post(f"/predict/{MODEL}", json={"entity_ids": ["u1"]})
        assert ok.status_code == 200, ok.text
    elapsed = time.monotonic() - start

    statuses = unauth.statuses + auth.statuses
    problems = unauth.problems + auth.problems
    rec.sent = unauth.sent + auth.sent
    rec.failed = len(problems)
    rec.answered = rec.sent - rec.failed
    rec.rss_after_mb = rss_mb()
    rec.extra = {
        "seed": SEED,
        "backend": backend,
        "elapsed_s": round(elapsed, 1),
        "routes": sum(len(routes_of(app)) for _, app in apis.values()),
        "status_histogram": {str(k): v for k, v in sorted(statuses.items())},
        "unauthenticated": {"sent": unauth.sent, "statuses": dict(sorted(unauth.statuses.items()))},
        "authenticated": {"sent": auth.sent, "statuses": dict(sorted(auth.statuses.items()))},
        "by_api": {
            api: {
                str(k): v
                for k, v in sorted(
                    (unauth.by_api.get(api, Counter()) + auth.by_api.get(api, Counter())).items()
                )
            }
            for api in apis
        },
    }
    with capsys.disabled():
        print(
            f"\nhttp fuzz ({backend}, seed {SEED}, {'full' if FULL else 'short'}): "
            f"{rec.sent} requests in "
            f"{elapsed:.1f} s, statuses {dict(sorted(statuses.items()))}, "
            f"{len(problems)} problem(s)"
        )
    assert not problems, f"seed {SEED}: " + "\n".join(problems[:40])
