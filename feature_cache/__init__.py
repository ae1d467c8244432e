"""Feature platform: catalog, offline store, point-in-time joins, online store, materialization.

Define entities and feature groups in code (:mod:`.definitions`), ``apply`` them to the
catalog, write rows offline, build point-in-time-correct training sets, materialize to the
online store (batch or streaming) and read online values — all through
:class:`FeatureService` (what ``carrara.Platform`` exposes as ``.features``).

Names are imported lazily so ``carrara --help`` does not load the native core or Arrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carrara.feature_cache.catalog import Catalog, Change, RegisteredGroup, upgrade
    from carrara.feature_cache.definitions import (
        Aggregation,
        Definitions,
        Entity,
        Feature,
        FeatureGroup,
        load_definitions,
        transform,
    )
    from carrara.feature_cache.offline_store import (
        DuckDBOfflineStore,
        OfflineStore,
        open_offline_store,
    )
    from carrara.feature_cache.online_store import (
        EmbeddedOnlineStore,
        OnlineStore,
        RedisOnlineStore,
        open_online_store,
    )
    from carrara.feature_cache.pit_join import TrainingSet
    from carrara.feature_cache.service import FeatureService, OnlineFeatures

_WHERE = {
    "Catalog": "catalog",
    "Change": "catalog",
    "RegisteredGroup": "catalog",
    "upgrade": "catalog",
    "Aggregation": "definitions",
    "Definitions": "definitions",
    "Entity": "definitions",
    "Feature": "definitions",
    "FeatureGroup": "definitions",
    "load_definitions": "definitions",
    "transform": "definitions",
    "DuckDBOfflineStore": "offline_store",
    "OfflineStore": "offline_store",
    "open_offline_store": "offline_store",
    "EmbeddedOnlineStore": "online_store",
    "OnlineStore": "online_store",
    "RedisOnlineStore": "online_store",
    "open_online_store": "online_store",
    "TrainingSet": "pit_join",
    "FeatureService": "service",
    "OnlineFeatures": "service",
}

__all__ = [
    "Aggregation",
    "Catalog",
    "Change",
    "Definitions",
    "DuckDBOfflineStore",
    "EmbeddedOnlineStore",
    "Entity",
    "Feature",
    "FeatureGroup",
    "FeatureService",
    "OfflineStore",
    "OnlineFeatures",
    "OnlineStore",
    "RedisOnlineStore",
    "RegisteredGroup",
    "TrainingSet",
    "load_definitions",
    "open_offline_store",
    "open_online_store",
    "transform",
    "upgrade",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'carrara.feature_cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"carrara.feature_cache.{module}"), name)
    globals()[name] = value
    return value
