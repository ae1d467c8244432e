"""The control-plane API process of ``carrara up``: one Starlette app on one port that mounts
the registry API, the feature API (reads and the admin routes), the training API and the
monitoring API, each with its own paths unchanged, behind the same bearer tokens.

Paths by part: ``/models/...`` and ``/lineage/...`` (registry), ``/features/...`` (features),
``/training-jobs/...`` and ``/training-triggers/...`` (training), ``/monitoring/...``
(monitoring). ``/healthz``, ``/readyz`` and ``/openapi.json`` are the app's own; the document
is built from the parts' endpoint tables (the kernel's HTTP kit), so it lists every route the
app serves, writes with their bearer security and role. :func:`check_routes` refuses two parts
claiming the same path and method.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from carrara.errors import ConfigError, UnavailableError
from carrara.http import Endpoint, Health, api_app, build_routes, with_document
from carrara.http import json_response as _json

if TYPE_CHECKING:
    from carrara.config import Settings

__all__ = ["OWN_PATHS", "ControlPlane", "Readiness", "check_routes"]

log = logging.getLogger(__name__)

#: Paths the composed app answers itself (each part also defines some of them).
OWN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
TITLE = "Carrara control plane"


class Readiness(msgspec.Struct, frozen=True):
    """What the control plane's ``/readyz`` answers."""

    status: str
    training_api: bool


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


class ControlPlane:
    """The stores and the composed app of the API process; ``close()`` closes the stores."""

    def __init__(self, settings: Settings, *, training_api: bool = True) -> None:
        from carrara.eventlog import open_event_log
        from carrara.feature_cache import api as features_api
        from carrara.feature_cache import api_admin
        from carrara.feature_cache.service import FeatureService
        from carrara.monitoring import api as monitoring_api
        from carrara.registry import api as registry_api
        from carrara.registry.auth import registry_authenticator
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
        self.auth = registry_authenticator(self.registry.tokens, settings.api_token or None)
        parts: list[tuple[str, list[Endpoint], dict[str, str]]] = [
            ("registry", registry_api.endpoints(self.registry), registry_api.PATH_PARAMS),
            ("features", features_api.endpoints(self.features), features_api.PATH_PARAMS),
            ("feature admin", api_admin.endpoints(self.features), api_admin.PATH_PARAMS),
            (
                "monitoring",
                monitoring_api.endpoints(self.db, self.events),
                monitoring_api.PATH_PARAMS,
            ),
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
                table = training.endpoints(self.queue, self.features)
                parts.append(("training", table, training.PATH_PARAMS))
                self.training_api = True
        # One table: the app's own endpoints and every part's (less the paths the app answers
        # itself); routes and /openapi.json both come from it.
        from carrara.console import PATH_PARAMS as CONSOLE_PARAMS
        from carrara.console import Console

        self.console = Console(settings, self.auth)
        self._closers.append(self.console.close)
        parts.append(("console", self.console.endpoints(), CONSOLE_PARAMS))
        own = [
            Endpoint("GET", "/healthz", "Liveness", Health, self._healthz),
            Endpoint("GET", "/readyz", "Readiness (registry database up)", Readiness, self._readyz),
        ]
        served = [(part, [e for e in table if e.path not in OWN_PATHS]) for part, table, _ in parts]
        mounted = check_routes([(part, build_routes(table, self.auth)) for part, table in served])
        path_params = {name: text for *_, params in parts for name, text in params.items()}
        # Every endpoint the app serves, its own first and /openapi.json (their document) last.
        self.endpoints = with_document(
            "/openapi.json", TITLE, own + [e for _, table in served for e in table], path_params
        )
        # InputGuard (api_app): 400 for control characters in paths and queries, JSON 500s that
        # keep the connection; every part's body reader is the kernel's bounded one (413).
        self.app = api_app([*build_routes([*own, self.endpoints[-1]]), *mounted])
        # The registry's routes read their body limit from the app they run in.
        self.app.state.max_body_bytes = registry_api.MAX_BODY_BYTES

    async def _healthz(self, request: Request) -> Response:
        return _json(Health("ok"))

    async def _readyz(self, request: Request) -> Response:
        def ping() -> None:
            with self.registry.db.transaction() as tx:
                tx.fetchone("SELECT 1")

        try:
            await run_in_threadpool(ping)
        except Exception as exc:
            raise UnavailableError(f"registry database unreachable: {exc}") from exc
        return _json(Readiness("ready", self.training_api))

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception:  # close the rest
                log.exception("closing a control-plane store failed")
