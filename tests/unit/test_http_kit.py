"""The one HTTP kit (``carrara.http`` + ``carrara.auth``): every route the control plane serves
is in its ``/openapi.json``, writes documented with bearer security and the role they enforce,
one bearer parser, and no copy of either in the source tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carrara.auth import ROLES, Principal, authenticator, bearer_token, require_role
from carrara.config import Settings
from carrara.errors import PermissionDeniedError, UnauthenticatedError
from carrara.http import (
    Endpoint,
    Health,
    api_app,
    build_routes,
    json_response,
    openapi_spec,
    principal_of,
    with_document,
)
from carrara.services import ControlPlane
from tests.asgi import call

TOKEN = "kit-test-admin-token"
ROOT = Path(__file__).resolve().parents[2]
#: Where the package's modules live (python/carrara and the parts mapped to carrara.<part>).
SOURCES = ["python/carrara", "registry", "training", "feature_cache", "monitoring", "gateway"]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    home = tmp_path_factory.mktemp("plane")
    cp = ControlPlane(Settings(home=str(home), online_store_url="memory://", api_token=TOKEN))
    try:
        yield cp
    finally:
        cp.close()


@pytest.fixture(scope="module")
def document(plane: ControlPlane) -> dict[str, Any]:
    r = call(plane.app, "GET", "/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def _served(app: Any) -> set[tuple[str, str]]:
    out = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        out |= {(m, path) for m in (route.methods or {"GET"}) - {"HEAD"}}
    return out


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}


# -- the control plane's document -------------------------------------------------------------


def test_the_document_lists_every_route_the_control_plane_serves(
    plane: ControlPlane, document: dict[str, Any]
) -> None:
    served = _served(plane.app)
    # A document never lists itself; every other route, the parts' documents included, is in.
    assert served - _documented(document) == {("GET", "/openapi.json")}
    assert _documented(document) <= served
    for path in (
        "/models/{model_id}/versions/{version_id}/deploy",
        "/features/groups/{group}/get-online",
        "/features/groups/{group}/ingest",
        "/features/apply",
        "/monitoring/models/{model}/config",
        "/monitoring/run",
        "/training-jobs",
        "/training/openapi.json",
        "/healthz",
        "/readyz",
    ):
        assert path in document["paths"], path
    assert document["info"]["title"] == "Carrara control plane"


#: (method, path) -> role, for a sample of each part's writes.
ROLE_OF = {
    ("post", "/models"): "publisher",
    ("patch", "/models/{model_id}"): "admin",
    ("post", "/models/{model_id}/versions/{version_id}/approve"): "approver",
    ("post", "/models/{model_id}/versions/{version_id}/deploy"): "deployer",
    ("post", "/features/apply"): "publisher",
    ("post", "/features/groups/{group}/ingest"): "publisher",
    ("post", "/features/training-set"): "publisher",
    ("put", "/monitoring/models/{model}/config"): "publisher",
    ("put", "/monitoring/models/{model}/versions/{version}/reference"): "publisher",
    ("post", "/monitoring/run"): "publisher",
    ("post", "/training-jobs"): "publisher",
    ("delete", "/training-triggers/{name}"): "publisher",
}


def test_writes_carry_bearer_security_and_their_role(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (method, path), role in ROLE_OF.items():
        op = document["paths"][path][method]
        assert op["security"] == [{"bearer": []}], (method, path)
        assert op["x-role"] == role and f"role '{role}'" in op["description"], (method, path)
        assert {"401", "403", "default"} <= set(op["responses"]), (method, path)
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if method == "get" or path == "/features/groups/{group}/get-online":
                assert "security" not in op, (method, path)  # reads are open
            else:
                assert op["x-role"] in ROLES, (method, path)


def test_every_documented_role_is_enforced_before_the_body(
    plane: ControlPlane, document: dict[str, Any]
) -> None:
    guarded = [
        (method, path)
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        if "security" in op
    ]
    assert len(guarded) >= 20
    for method, path in guarded:
        url = path.replace("{version_id}", "1").replace("{version}", "1")
        url = re.sub(r"\{\w+\}", "x", url)
        r = call(plane.app, method.upper(), url, content=b"{}")
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "UNAUTHENTICATED", (method, path)


def test_errors_and_starlette_errors_share_one_shape(plane: ControlPlane) -> None:
    r = call(plane.app, "GET", "/no/such/route")
    assert r.status_code == 404 and r.json() == {
        "error": "NOT_FOUND",
        "message": "no route GET /no/such/route; see /openapi.json",
    }
    r = call(plane.app, "DELETE", "/models")
    assert r.status_code == 405 and r.json()["error"] == "UNIMPLEMENTED"
    assert "GET" in r.headers["allow"]
    r = call(plane.app, "GET", "/readyz")
    assert r.json() == {"status": "ready", "training_api": True}


# -- the kit on its own -----------------------------------------------------------------------


async def _whoami(request: Request) -> Response:
    who = principal_of(request)
    return json_response({"subject": who.subject if who else None})


def _kit_app(tokens: dict[str, Principal] | None) -> Any:
    table = [
        Endpoint("GET", "/open", "An open read", Health, _whoami),
        Endpoint(
            "POST",
            "/items/{n:int}",
            "Write an item",
            Health,
            _whoami,
            Health,
            201,
            "publisher",
            open_if=lambda request: request.query_params.get("dry_run") == "1",
        ),
    ]
    doc = with_document("/openapi.json", "kit", table, {"n": "the item number"})
    return api_app(build_routes(doc, None if tokens is None else authenticator(tokens)))


def test_the_route_builder_guards_roles_and_keeps_the_principal() -> None:
    ana = Principal("ana", frozenset({"publisher"}))
    bob = Principal("bob", frozenset({"reader"}))
    app = _kit_app({"a": ana, "b": bob})
    assert call(app, "GET", "/open").json() == {"subject": None}
    r = call(app, "POST", "/items/1")
    assert r.status_code == 401 and "'Write an item' needs a bearer token" in r.text
    r = call(app, "POST", "/items/1", headers={"authorization": "Bearer b"})
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    r = call(app, "POST", "/items/1", headers={"authorization": "Bearer zz"})
    assert r.status_code == 401 and "unknown bearer token" in r.text
    r = call(app, "POST", "/items/1", headers={"authorization": "Basic a"})
    assert r.status_code == 401 and "must be 'Bearer <token>'" in r.text
    assert call(app, "POST", "/items/1", headers={"authorization": "Bearer a"}).json() == {
        "subject": "ana"
    }
    assert call(app, "POST", "/items/1?dry_run=1").json() == {"subject": None}
    # Without an authenticator the API is open.
    assert call(_kit_app(None), "POST", "/items/1").json() == {"subject": None}


def test_openapi_spec_from_the_table() -> None:
    doc = call(_kit_app(None), "GET", "/openapi.json").json()
    assert set(doc["paths"]) == {"/open", "/items/{n}"}
    op = doc["paths"]["/items/{n}"]["post"]
    assert op["parameters"][0] == {
        "name": "n",
        "in": "path",
        "required": True,
        "schema": {"type": "integer"},
        "description": "the item number",
    }
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Health"
    }
    assert set(op["responses"]) == {"201", "400", "401", "403", "413", "default"}
    assert "dry run" in op["description"]
    error = doc["paths"]["/open"]["get"]["responses"]["default"]
    assert error["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")

    async def raw(request: Request) -> Response:
        return Response(b"")

    binary = Endpoint(
        "PUT", "/blob", "Bytes in, none out", None, raw, bytes, 204, consumes=("application/x",)
    )
    op = openapi_spec("t", [binary], {})["paths"]["/blob"]["put"]
    assert op["responses"]["204"] == {"description": "No content"}
    assert op["requestBody"]["content"] == {
        "application/x": {"schema": {"type": "string", "format": "binary"}}
    }
    with pytest.raises(ValueError, match="has no description"):
        openapi_spec("t", [Endpoint("GET", "/x/{n}", "x", Health, raw)], {})


# -- the one bearer parser --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        (" Bearer crt_x-y_z", "crt_x-y_z"),
    ],
)
def test_bearer_token(header: str, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", ["Bearer", "Bearer   ", "Basic abc", "abc", "Token abc"])
def test_bearer_token_refuses_malformed_headers(header: str) -> None:
    with pytest.raises(UnauthenticatedError, match=r"must be 'Bearer <token>'"):
        bearer_token(header)


def test_roles_and_authenticators() -> None:
    admin = Principal("root", frozenset({"admin"}))
    assert require_role(admin, "deployer", "x") is admin
    with pytest.raises(PermissionDeniedError, match="needs role 'approver'"):
        require_role(admin, "approver", "approving")  # approval stays a separate role
    with pytest.raises(UnauthenticatedError, match="needs a bearer token with role"):
        require_role(None, "reader", "reading")
    lookup = authenticator({"t": admin})
    assert lookup("t") is admin
    with pytest.raises(UnauthenticatedError, match="unknown bearer token"):
        lookup("nope")
    assert authenticator(lookup) is lookup
    from carrara.registry.auth import Principal as RegistryPrincipal

    assert RegistryPrincipal is Principal  # the registry re-exports the kernel's


# -- no copies in the source tree -------------------------------------------------------------

_BEARER_PARSING = [
    re.compile(r"""[!=]=\s*b?["']bearer["']""", re.IGNORECASE),
    re.compile(r"""["']bearer["']\s*[!=]=""", re.IGNORECASE),
    re.compile(r"""(startswith|removeprefix)\(\s*b?["']bearer""", re.IGNORECASE),
]
_SPLIT_ON_SPACE = re.compile(r"""\.(partition|split)\(\s*b?["'] ["']\s*\)""")
_OPENAPI_DOCUMENT = re.compile(r"""["']openapi["']\s*:\s*["']3\.""")


def _modules() -> Iterator[tuple[str, str]]:
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()


def test_only_the_kernel_parses_the_authorization_header() -> None:
    found = []
    for name, text in _modules():
        if name == "python/carrara/auth.py":
            continue
        found += [(name, p.pattern) for p in _BEARER_PARSING if p.search(text)]
        if "authorization" in text.lower() and _SPLIT_ON_SPACE.search(text):
            found.append((name, "splits a header on a space"))
    assert found == [], "parse bearer headers with carrara.auth.bearer_token"


def test_only_the_kernel_builds_openapi_documents() -> None:
    found = [
        name
        for name, text in _modules()
        if name != "python/carrara/http.py" and _OPENAPI_DOCUMENT.search(text)
    ]
    assert found == [], "build OpenAPI documents with carrara.http.openapi_spec"


def test_the_kernel_does_not_import_the_registry() -> None:
    text = (ROOT / "python/carrara/http.py").read_text()
    assert "carrara.registry" not in text
    admin = (ROOT / "feature_cache/api_admin.py").read_text()
    assert "Protocol" not in admin and "class _Principal" not in admin
