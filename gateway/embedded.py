"""``Embedded``: the gateway's serving path in-process, for Python applications (no network hop).

The same ``ServingEngine`` the gRPC/HTTP fronts use, plus the prediction logger, wired to an
online store (anything with ``get_many(keys)``, e.g. ``carrara.feature_cache`` stores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from carrara.core import FeatureCache
from carrara.errors import CarraraError
from carrara.gateway.backends import Backend
from carrara.gateway.engine import ModelDeployment, Overrides, PredictionResult, ServingEngine
from carrara.gateway.prediction_log import Appender, PredictionLogger

__all__ = ["Embedded", "KeyValueStore", "StoreReader", "serving_store"]


class KeyValueStore(Protocol):
    """An online store: raw-key batch reads in one round trip, keys under ``namespace``."""

    namespace: str

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...


class StoreReader:
    """Adapts an online store to the engine: the core's keys are ``{group}:{version}:{entity}``;
    the store may keep them under a ``{namespace}:`` prefix."""

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store
        self.prefix = f"{store.namespace}:" if store.namespace else ""

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.prefix:
            keys = [self.prefix + k for k in keys]
        return self.store.get_many(keys)


def serving_store(store: KeyValueStore) -> Any:
    """What the native engine reads features from: Redis natively (hiredis, no Python per
    request) when ``store`` is a plain Redis online store, else ``store`` through Python."""
    from carrara.feature_cache.online_store import RedisOnlineStore

    if isinstance(store, RedisOnlineStore) and not getattr(store, "_cluster", False):
        from urllib.parse import quote

        from carrara import _native

        kw = store.client.connection_pool.connection_kwargs
        if "SSL" in store.client.connection_pool.connection_class.__name__:
            return StoreReader(store)  # TLS: redis-py's client (hiredis here has no TLS)
        auth = ""
        if kw.get("password"):
            auth = f"{quote(str(kw.get('username') or ''), safe='')}:"
            auth += f"{quote(str(kw['password']), safe='')}@"
        db = int(kw.get("db") or 0)
        if kw.get("path"):
            url = f"unix://{auth}{kw['path']}?db={db}"
        else:
            url = f"redis://{auth}{kw.get('host', '127.0.0.1')}:{int(kw.get('port', 6379))}/{db}"
        prefix = f"{store.namespace}:" if store.namespace else ""
        native = _native.RedisStore(url, prefix)
        with contextlib.suppress(CarraraError):
            # Open a connection now, with time to spare: the first request must not pay the
            # connect inside its store deadline. A Redis that is down now is retried later.
            native.ping(1.0)
        return native
    return StoreReader(store)


class Embedded:
    """In-process predictions: ``deploy`` models, then ``predict(model, entity_ids)``."""

    def __init__(
        self,
        store: KeyValueStore,
        *,
        event_log: Appender | None = None,
        cache_capacity: int = 10_000,
        cache_ttl_seconds: float = 30.0,
        max_in_flight: int = 256,
        **engine_options: Any,
    ) -> None:
        self.logger = PredictionLogger(event_log) if event_log is not None else None
        self.engine = ServingEngine(
            serving_store(store),
            cache=FeatureCache(capacity=cache_capacity, ttl_seconds=cache_ttl_seconds),
            sink=self.logger,
            max_in_flight=max_in_flight,
            **engine_options,
        )

    def deploy(self, deployment: ModelDeployment, backends: Mapping[str, Backend]) -> None:
        self.engine.deploy(deployment, backends)

    def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
    ) -> PredictionResult:
        return self.engine.predict(model, entity_ids, overrides, request_id)

    def close(self) -> None:
        """Stop serving and flush the prediction log."""
        self.engine.close()
        if self.logger is not None:
            self.logger.close()

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
