# mypy: disable-error-code="import-untyped"
"""Feature definitions as code: entities and feature groups, declared in Python or YAML.

A definition is plain data (msgspec structs); ``carrara apply`` stores it in the catalog,
which versions it. The group's ``transform`` names a function (registered with
:func:`transform` or given as ``"package.module:function"``) that turns source rows into
feature rows; batch ingestion and the streaming consumer call the same function, so offline
and online values come from one piece of code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.feature_cache.aggregations import (
    Aggregation,
    Output,
    check_tiles,
    event_columns,
    outputs,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DTYPES",
    "Aggregation",
    "Definitions",
    "Entity",
    "Feature",
    "FeatureGroup",
    "Transform",
    "load_definitions",
    "resolve_transform",
    "transform",
]

DType = Literal["float32", "float64", "int32", "int64", "bool"]
#: Feature dtypes. Online values are float32 (the FeatureVector wire type); offline keeps these.
DTYPES: tuple[str, ...] = ("float32", "float64", "int32", "int64", "bool")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_COLUMNS = ("entity_id", "event_timestamp", "created_timestamp")

Transform = Callable[["pd.DataFrame"], "pd.DataFrame"]
_TRANSFORMS: dict[str, Transform] = {}
_F = TypeVar("_F", bound=Transform)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r}: use lowercase letters, digits and '_' "
            "(start with a letter or '_', at most 63 characters)"
        )


class Entity(msgspec.Struct, frozen=True, kw_only=True):
    """What features describe (a driver, a rider). ``join_key`` is the column that holds its
    id in entity dataframes; offline and online stores call it ``entity_id``."""

    name: str
    join_key: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("entity", self.name)
        if self.join_key:
            _check_name("join key", self.join_key)

    @property
    def key(self) -> str:
        return self.join_key or f"{self.name}_id"


class Feature(msgspec.Struct, frozen=True, kw_only=True):
    """One feature column of a group."""

    name: str
    dtype: DType = "float32"
    description: str = ""
    owner_team: str = ""

    def __post_init__(self) -> None:
        _check_name("feature", self.name)
        if self.name in RESERVED_COLUMNS:
            raise InvalidArgumentError(
                f"feature name {self.name!r} is reserved; reserved: {', '.join(RESERVED_COLUMNS)}"
            )
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(
                f"feature {self.name!r} has dtype {self.dtype!r}; known: {', '.join(DTYPES)}"
            )


class FeatureGroup(msgspec.Struct, frozen=True, kw_only=True):
    """Features of one entity type computed from one source by one transform.

    ``ttl_days``: a value older than this (relative to the label time offline, to now online)
    is treated as missing; 0 means it never expires. ``source`` is free-form provenance (a
    table, a topic); ``transform`` names the function that produces the features.

    With ``aggregations`` (:mod:`carrara.feature_cache.aggregations`) the group stores raw
    events and its features are the aggregations' outputs, generated (leave ``features``
    empty): one per aggregation, bucket and window, over tiles of ``tile``.
    """

    name: str
    entity: str
    features: tuple[Feature, ...] = ()
    aggregations: tuple[Aggregation, ...] = ()
    tile: str = "1m"
    ttl_days: float = 0.0
    online: bool = True
    offline: bool = True
    source: str = ""
    transform: str = ""
    description: str = ""
    owner_team: str = ""

    def __post_init__(self) -> None:
        _check_name("feature group", self.name)
        if self.aggregations:
            self._generate_features()
        if not self.features:
            raise InvalidArgumentError(f"feature group {self.name!r} declares no features")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidArgumentError(
                f"feature group {self.name!r} declares {', '.join(dupes)} more than once"
            )
        if self.ttl_days < 0:
            raise InvalidArgumentError(
                f"feature group {self.name!r}: ttl_days must be >= 0 (0 = no expiry)"
            )

    def _generate_features(self) -> None:
        if self.ttl_days:
            raise InvalidArgumentError(
                f"feature group {self.name!r} aggregates over windows: ttl_days does not apply"
            )
        check_tiles(self.aggregations, self.tile)
        event_columns(self.aggregations)  # checks a column is not both a value and a bucket
        generated = tuple(
            Feature(name=o.name, dtype="int64" if o.dtype == "int64" else "float64")
            for o in outputs(self.aggregations)
        )
        if self.features and self.features != generated:
            raise InvalidArgumentError(
                f"feature group {self.name!r}: the features of an aggregated group are its "
                "aggregations' outputs; leave 'features' empty"
            )
        msgspec.structs.force_setattr(self, "features", generated)

    @property
    def is_aggregated(self) -> bool:
        """Whether the group stores events and serves windowed aggregations of them."""
        return bool(self.aggregations)

    @property
    def outputs(self) -> list[Output]:
        """The aggregations' output features (empty for a row group)."""
        return outputs(self.aggregations)

    @property
    def event_columns(self) -> dict[str, str]:
        """The event columns an aggregated group stores (name -> "float64" | "string")."""
        return event_columns(self.aggregations)

    @property
    def tile_us(self) -> int:
        return check_tiles(self.aggregations, self.tile)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def ttl_us(self) -> int:
        """TTL in microseconds; 0 = none."""
        return round(self.ttl_days * 86_400 * 1_000_000)

    def schema_fingerprint(self) -> str:
        """Hash of what determines the stored data (entity, features and dtypes in order,
        source, transform). A change here needs a new group version."""
        parts = [self.entity, self.source, self.transform]
        parts += [f"{f.name}:{f.dtype}" for f in self.features]
        if self.aggregations:  # the windows' semantics depend on the tile and the functions
            parts += [self.tile, msgspec.json.encode(self.aggregations).decode()]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise NotFoundError(
            f"feature group {self.name!r} has no feature {name!r}; "
            f"known: {', '.join(self.feature_names)}"
        )


class Definitions(msgspec.Struct, frozen=True, kw_only=True):
    """A set of definitions to apply together."""

    entities: tuple[Entity, ...] = ()
    groups: tuple[FeatureGroup, ...] = ()

    def __post_init__(self) -> None:
        known = {e.name for e in self.entities}
        for g in self.groups:
            if g.entity not in known:
                raise InvalidArgumentError(
                    f"feature group {g.name!r} uses entity {g.entity!r}, which is not defined; "
                    f"defined: {', '.join(sorted(known)) or '(none)'}"
                )
        for kind, names in (
            ("entity", [e.name for e in self.entities]),
            ("feature group", [g.name for g in self.groups]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise InvalidArgumentError(f"{kind} {', '.join(dupes)} defined more than once")


# -- transforms -------------------------------------------------------------------------------


def transform(name: str) -> Callable[[_F], _F]:
    """Register a transform under ``name`` so definitions can refer to it."""

    def register(fn: _F) -> _F:
        _TRANSFORMS[name] = fn
        return fn

    return register


def resolve_transform(ref: str) -> Transform | None:
    """The function a group's ``transform`` names; ``""`` is the identity (``None``)."""
    if not ref:
        return None
    if ref in _TRANSFORMS:
        return _TRANSFORMS[ref]
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
        try:
            fn: Transform = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise NotFoundError(f"cannot import transform {ref!r}: {exc}") from exc
        return fn
    known = ", ".join(sorted(_TRANSFORMS)) or "(none registered)"
    raise NotFoundError(
        f"unknown transform {ref!r}; register it with @carrara.feature_cache.transform({ref!r}) "
        f"or write 'package.module:function'. Registered: {known}"
    )


# -- loading ----------------------------------------------------------------------------------


def _collect(objects: Iterable[Any]) -> Definitions:
    entities: dict[str, Entity] = {}
    groups: dict[str, FeatureGroup] = {}
    for obj in objects:
        if isinstance(obj, Entity):
            entities[obj.name] = obj
        elif isinstance(obj, FeatureGroup):
            groups[obj.name] = obj
        elif isinstance(obj, Definitions):
            entities.update({e.name: e for e in obj.entities})
            groups.update({g.name: g for g in obj.groups})
    return Definitions(entities=tuple(entities.values()), groups=tuple(groups.values()))


def load_definitions(path: str | Path) -> Definitions:
    """Load definitions from a YAML file (keys ``entities`` and ``groups``, laid out like the
    structs) or a Python file/module (every ``Entity``/``FeatureGroup`` at module level)."""
    p = Path(str(path))
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(p.read_text())
        except FileNotFoundError as exc:
            raise NotFoundError(f"definitions file {p} does not exist") from exc
        except yaml.YAMLError as exc:
            raise InvalidArgumentError(f"{p} is not valid YAML: {exc}") from exc
        try:
            return msgspec.convert(doc or {}, Definitions)
        except msgspec.ValidationError as exc:
            raise InvalidArgumentError(f"invalid definitions in {p}: {exc}") from exc
    if p.suffix == ".py":
        if not p.exists():
            raise NotFoundError(f"definitions file {p} does not exist")
        name = f"carrara_definitions_{abs(hash(str(p.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, p)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(str(path))
        except ImportError as exc:
            raise NotFoundError(
                f"cannot load definitions from {path!r}: give a .py or .yaml file or an "
                f"importable module ({exc})"
            ) from exc
    return _collect(vars(module).values())
