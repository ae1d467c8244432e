"""The web console: one more route tree of the control plane (``carrara up``'s API port).

``GET /console`` serves a single-page app (``static/``: plain HTML, CSS and JavaScript shipped
in the wheel, no CDN, no build step) that reads and writes through the same REST API as the
CLI and the SDK, with the same bearer tokens: the login page checks a token with
``GET /auth/whoami`` and keeps it in the browser's ``sessionStorage`` for the session; the
pages offer only the buttons the token's roles may use (the API checks them again).

Routes added to the control plane's endpoint table (so they are in ``/openapi.json``):

- ``GET /console`` and ``GET /console/{asset}`` — the app and its files;
- ``GET /auth/whoami`` — the bearer token's subject and roles (401 without a known token);
- ``GET /serving/variants?window_s=10`` — the gateway's live figures per variant
  (:mod:`carrara.console.gateway_metrics`), scraped from its ``/metrics``.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from typing import TYPE_CHECKING

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from carrara.auth import Authenticator, bearer_token
from carrara.console.gateway_metrics import GatewayScraper, ReplicaTargets, ServingFigures
from carrara.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError
from carrara.http import Endpoint, json_response

if TYPE_CHECKING:
    from carrara.config import Settings

__all__ = ["PATH_PARAMS", "Console", "WhoAmI"]

PATH_PARAMS = {"asset": "A file of the console app (e.g. app.js)"}
_ASSET = re.compile(r"^[a-z0-9_-]+\.(js|css|svg|html)$")
_TYPES = {
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
    "html": "text/html; charset=utf-8",
}


class WhoAmI(msgspec.Struct, frozen=True):
    """The caller of ``GET /auth/whoami``."""

    subject: str
    roles: list[str]


class _Asset(msgspec.Struct, frozen=True):
    body: bytes
    media_type: str
    etag: str


def _load_assets() -> dict[str, _Asset]:
    out: dict[str, _Asset] = {}
    folder = resources.files("carrara.console") / "static"
    for entry in folder.iterdir():
        name = entry.name
        if not _ASSET.match(name):
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        out[name] = _Asset(body, _TYPES[name.rsplit(".", 1)[1]], etag)
    return out


class Console:
    """The console's routes for one control plane."""

    def __init__(self, settings: Settings, auth: Authenticator, gateway_url: str = "") -> None:
        self.auth = auth
        self.assets = _load_assets()
        self.gateway_url = gateway_url or settings.gateway_url
        # Every replica's /metrics when listed (their sums are shown), else the one gateway.
        urls = [u.strip() for u in settings.gateway_metrics_urls.split(",") if u.strip()]
        if not urls and self.gateway_url:
            urls = [self.gateway_url]
        self.scraper: GatewayScraper | None = None
        self._targets: ReplicaTargets | None = None
        if urls:
            headers = (
                {"Authorization": f"Bearer {settings.gateway_token}"}
                if settings.gateway_token
                else {}
            )
            # A gateway with TLS: its own certificate is the CA to trust on loopback.
            verify: str | bool = settings.gateway_tls_cert or True
            self._targets = ReplicaTargets(urls, headers, verify)
            self.scraper = GatewayScraper(", ".join(urls), targets=self._targets)

    def close(self) -> None:
        """Close the gateway scrapes' HTTP clients."""
        if self._targets is not None:
            self._targets.close()

    def _asset(self, name: str, request: Request) -> Response:
        asset = self.assets.get(name)
        if asset is None:
            raise NotFoundError(f"the console has no file {name!r}")
        headers = {"ETag": asset.etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    async def index(self, request: Request) -> Response:
        return self._asset("index.html", request)

    async def asset(self, request: Request) -> Response:
        return self._asset(str(request.path_params["asset"]), request)

    async def whoami(self, request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            raise UnauthenticatedError(
                "send 'Authorization: Bearer <token>' (create one with "
                "'carrara models token create')"
            )
        principal = await run_in_threadpool(self.auth, token)
        return json_response(WhoAmI(principal.subject, sorted(principal.roles)))

    async def variants(self, request: Request) -> Response:
        raw = request.query_params.get("window_s", "10")
        try:
            window_s = float(raw)
        except ValueError:
            raise InvalidArgumentError(f"window_s must be a number, got {raw!r}") from None
        if not 1.0 <= window_s <= 60.0:
            raise InvalidArgumentError(f"window_s must be within [1, 60], got {window_s}")
        if self.scraper is None:
            return json_response(
                ServingFigures(
                    gateway_url="",
                    reachable=False,
                    error=(
                        "no gateway configured (carrara up sets one; else the gateway_url or "
                        "gateway_metrics_urls setting)"
                    ),
                    scraped_at=0.0,
                    window_s=0.0,
                    variants=[],
                    errors={},
                    degraded={},
                    shed_total=0.0,
                )
            )
        return json_response(await run_in_threadpool(self.scraper.figures, window_s))

    def endpoints(self) -> list[Endpoint]:
        html = "text/html"
        return [
            Endpoint("GET", "/console", "The web console", str, self.index, produces=html),
            Endpoint(
                "GET",
                "/console/{asset}",
                "A file of the web console",
                str,
                self.asset,
                produces="text/plain",
                errors=(404,),
            ),
            Endpoint(
                "GET",
                "/auth/whoami",
                "The bearer token's subject and roles",
                WhoAmI,
                self.whoami,
                errors=(401,),
            ),
            Endpoint(
                "GET",
                "/serving/variants",
                "The gateway's live figures per variant (rates, p50/p99, errors, degraded)",
                ServingFigures,
                self.variants,
                query=("window_s",),
            ),
        ]
