"""The control-plane API process of ``carrara up``: one Starlette app on one port that mounts
the registry API, the feature API (reads and the admin routes), the training API and the
monitoring API, each with its own paths unchanged, behind the same bearer tokens.

Paths by part: ``/models/...`` and ``/lineage/...`` (registry), ``/features/...`` (features),
``/training-jobs/...`` and ``/training-triggers/...`` (training), ``/monitoring/...``
(monitoring). ``/healthz``, ``/readyz`` and ``/openapi.json`` (the parts' specs merged) are the
app's own; :func:`check_routes` refuses two parts claiming the same path and method.
"""

from __future__ import annotations

import hmac
import importlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from carrara.errors import CarraraError, ConfigError, UnauthenticatedError, UnavailableError
from carrara.http import InputGuard

if TYPE_CHECKING:
    from carrara.config import Settings
    from carrara.registry.auth import Principal
    from carrara.registry.registry import ModelRegistry

__all__ = ["ControlPlane", "RegistryTokens", "check_routes"]

log = logging.getLogger(__name__)

#: Paths the composed app answers itself (each part also defines some of them).
OWN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
_encoder = msgspec.json.Encoder()


class RegistryTokens(Mapping[str, "Principal"]):
    """Bearer token -> principal, as the registry API checks them: the bootstrap token
    (``Settings.api_token``, an admin) and the tokens stored hashed in the registry database.
    Iteration lists only the bootstrap token (stored tokens are never kept in plaintext)."""

    def __init__(self, registry: ModelRegistry, bootstrap_token: str = "") -> None:
        self._registry = registry
        self._bootstrap = bootstrap_token

    def __getitem__(self, token: str) -> Principal:
        from carrara.registry.auth import Principal

        if self._bootstrap and hmac.compare_digest(token.encode(), self._bootstrap.encode()):
            return Principal("bootstrap", frozenset({"admin"}))
        try:
            return self._registry.tokens.authenticate(token)
        except UnauthenticatedError as exc:
            raise KeyError(token) from exc

    def __iter__(self) -> Iterator[str]:
        return iter([self._bootstrap] if self._bootstrap else [])

    def __len__(self) -> int:
        return 1 if self._bootstrap else 0


def _methods(route: BaseRoute) -> set[str]:
    methods = getattr(route, "methods", None)
    return set(methods) if methods else {"GET"}


def check_routes(parts: Sequence[tuple[str, Sequence[BaseRoute]]]) -> list[BaseRoute]:
    """The parts' routes in order, without the app's own paths; ConfigError naming both parts
    when two of them claim the same path and method."""
    seen: dict[tuple[str, str], str] = {}
    out: list[BaseRoute] = []
    for part, routes in parts:
        for route in routes:
            path = getattr(route, "path", "")
            if path in OWN_PATHS:
                continue
            for method in _methods(route) - {"HEAD"}:
                other = seen.get((path, method))
                if other is not None:
                    raise ConfigError(
                        f"{method} {path} is defined by both the {other} and the {part} API; "
                        "rename one of them"
                    )
                seen[(path, method)] = part
            out.append(route)
    return out


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(status, "UNKNOWN")
    body = {"error": code, "message": f"no route {request.method} {request.url.path}"}
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


class ControlPlane:
    """The stores and the composed app of the API process; ``close()`` closes the stores."""

    def __init__(self, settings: Settings, *, training_api: bool = True) -> None:
        from carrara.eventlog import open_event_log
        from carrara.feature_cache import api as features_api
        from carrara.feature_cache import api_admin
        from carrara.feature_cache.service import FeatureService
        from carrara.monitoring import api as monitoring_api
        from carrara.registry import api as registry_api
        from carrara.registry.registry import ModelRegistry
        from carrara.sql import connect
        from carrara.training.queue import JobQueue

        self.settings = settings
        url = settings.resolved_registry_url
        self._closers: list[Any] = []
        try:
            self.events = open_event_log(settings.resolved_event_log_url)
            self._closers.append(self.events.close)
            self.registry = ModelRegistry.open(
                url, settings.resolved_artifact_path, events=self.events
            )
            self._closers.append(self.registry.close)
            self.features = FeatureService.from_settings(settings)
            self._closers.append(self.features.close)
            # Label sources of submitted jobs must lie under the settings' data roots.
            self.queue = JobQueue.open(
                url, events=self.events, data_roots=settings.resolved_data_roots
            )
            self._closers.append(self.queue.close)
            self.db = connect(url)
            self._closers.append(self.db.close)
        except BaseException:
            self.close()
            raise
        self.tokens = RegistryTokens(self.registry, settings.api_token)
        registry_app = registry_api.create_app(
            self.registry, bootstrap_token=settings.api_token or None
        )
        features_app = features_api.create_app(self.features)
        parts: list[tuple[str, Sequence[BaseRoute]]] = [
            ("registry", registry_app.routes),
            ("features", features_app.routes),
            ("feature admin", api_admin.create_routes(self.features, tokens=self.tokens)),
            ("monitoring", monitoring_api.create_routes(self.db, self.events, tokens=self.tokens)),
        ]
        self.training_api = False
        if training_api:
            try:
                training = importlib.import_module("carrara.training.api")
            except ModuleNotFoundError as exc:
                if exc.name != "carrara.training.api":
                    raise
                log.warning("carrara.training.api is not installed: no /training-jobs routes")
            else:
                parts.append(
                    ("training", training.create_app(self.queue, self.features, tokens=self.tokens))
                )
                self.training_api = True
        # Each part's OpenAPI document (registry and features at /openapi.json, training at
        # /training/openapi.json), merged into the app's own /openapi.json.
        self._specs = [
            r
            for _, routes in parts
            for r in routes
            if isinstance(r, Route) and r.path.endswith("openapi.json")
        ]
        self._openapi: bytes | None = None
        routes = [
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/openapi.json", self._openapi_json, methods=["GET"]),
            *check_routes(parts),
        ]
        # InputGuard: 400 for control characters in paths and queries, JSON 500s that keep the
        # connection; every part's body reader is the kernel's bounded one (413).
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_error},
            middleware=[Middleware(InputGuard)],
        )
        # The registry's routes read their body limit from the app they run in.
        self.app.state.max_body_bytes = registry_app.state.max_body_bytes

    async def _healthz(self, request: Request) -> Response:
        return Response(_encoder.encode({"status": "ok"}), media_type="application/json")

    async def _readyz(self, request: Request) -> Response:
        def ping() -> None:
            with self.registry.db.transaction() as tx:
                tx.fetchone("SELECT 1")

        try:
            try:
                await run_in_threadpool(ping)
            except Exception as exc:
                raise UnavailableError(f"registry database unreachable: {exc}") from exc
        except CarraraError as exc:
            body = {"error": exc.grpc_code, "message": str(exc)}
            return Response(_encoder.encode(body), exc.http_status, media_type="application/json")
        ready = {"status": "ready", "training_api": self.training_api}
        return Response(_encoder.encode(ready), media_type="application/json")

    async def _openapi_json(self, request: Request) -> Response:
        if self._openapi is None:
            merged: dict[str, Any] = {
                "openapi": "3.1.0",
                "info": {"title": "Carrara control plane", "version": "1"},
                "paths": {},
                "components": {"schemas": {}},
            }
            for route in self._specs:
                response = await route.endpoint(request)
                spec = msgspec.json.decode(response.body)
                merged["paths"].update(spec.get("paths", {}))
                merged["components"]["schemas"].update(
                    spec.get("components", {}).get("schemas", {})
                )
            self._openapi = _encoder.encode(merged)
        return Response(self._openapi, media_type="application/json")

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:  # close the rest
                log.exception("closing a control-plane store failed")
