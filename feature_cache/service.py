# mypy: disable-error-code="import-untyped"
"""``FeatureService``: the feature platform behind one object (``platform.features``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from carrara.core import Assembler, AssemblerSpec, FeatureRef, GroupSchema
from carrara.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from carrara.feature_cache.catalog import Catalog, Change, RegisteredGroup
from carrara.feature_cache.definitions import Definitions, resolve_transform
from carrara.feature_cache.materialize import (
    MaterializeResult,
    aggregates_at,
    materialize_batch,
    table_to_vectors,
)
from carrara.feature_cache.offline_store import (
    CompactionResult,
    OfflineStore,
    open_offline_store,
    to_arrow,
)
from carrara.feature_cache.online_store import OnlineStore, open_online_store
from carrara.feature_cache.pit_join import (
    FeatureRequest,
    TrainingSet,
    parse_feature_refs,
    point_in_time_join,
)
from carrara.feature_cache.streaming import StreamingMaterializer, publish_rows

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from carrara.config import Settings
    from carrara.eventlog import EventLog

__all__ = [
    "MAX_ONLINE_BATCH",
    "BatchTooLargeError",
    "FeatureService",
    "GroupFreshness",
    "OnlineFeatures",
]

#: Most entities one online read may ask for.
MAX_ONLINE_BATCH = 10_000
_GROUP_CACHE_SECONDS = 5.0


class BatchTooLargeError(ResourceExhaustedError):
    """More entities in one read than the service allows (HTTP 413: split the batch)."""

    http_status = 413


class OnlineFeatures(msgspec.Struct, frozen=True):
    """An online read: ``values[i, j]`` is feature ``features[j]`` of ``entity_ids[i]``;
    ``missing[i, j]`` marks values that are absent (then ``values`` holds 0); ``found[i]``
    says whether the entity has a stored vector at all."""

    group: str
    version: int
    entity_ids: list[str]
    features: list[str]
    values: Any  # np.ndarray float32 [n, d]
    missing: Any  # np.ndarray bool [n, d]
    found: Any  # np.ndarray bool [n]

    def to_dicts(self) -> list[dict[str, float | None]]:
        """One dict per entity; values as the shortest floats that round-trip float32
        (``14.2``, not ``14.199999809265137``), ``None`` where missing."""
        rows = float32_rows(self.values, self.missing)
        return [dict(zip(self.features, row, strict=True)) for row in rows]

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd

        frame = pd.DataFrame(np.where(self.missing, np.nan, self.values), columns=self.features)
        frame.insert(0, "entity_id", self.entity_ids)
        return frame


class GroupFreshness(msgspec.Struct, frozen=True, kw_only=True):
    """How fresh a group's online values are (``FeatureService.freshness``). Times are
    seconds since the Unix epoch (UTC, fractional); ``None`` where the online store has no
    record of a write of this group version (never written, or by a store that keeps no
    freshness)."""

    group: str
    version: int
    online: bool  # the group is served online (False: never written online, never stale)
    ttl_s: float | None  # None: values never expire
    last_write_at: float | None  # wall clock of the last online write that stored rows
    newest_event_ts: float | None  # newest event time ever written online
    age_s: float | None  # now - newest_event_ts
    rows_last_write: int | None  # rows that last write stored
    stale: bool  # online and (never written, or age_s > ttl_s when a TTL is set)


def float32_rows(values: Any, missing: Any) -> list[list[float | None]]:
    """``values`` (float32 [n, d]) as Python floats, each the shortest decimal that reads back
    as the same float32 (what ``str(np.float32(x))`` shows: ``14.2``, not
    ``14.199999809265137``), and ``None`` where ``missing`` (or NaN)."""
    v32 = np.asarray(values, dtype=np.float32)
    x = v32.astype(np.float64)
    out = x.copy()
    absx = np.abs(x)
    todo = np.isfinite(x) & (absx != 0.0)
    if todo.any():
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            exp = np.floor(np.log10(np.where(todo, absx, 1.0))).astype(np.int64)
        # Decimal rounding in float64 is exact enough for moderate exponents (powers of ten
        # up to 1e22 are exact); others (rare) take the per-value path below.
        vector = todo & (np.abs(exp) <= 12)
        done = ~vector
        for digits in range(1, 10):
            k = digits - 1 - exp
            scale = 10.0 ** np.abs(k).astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                r = np.where(k >= 0, np.rint(x * scale) / scale, np.rint(x / scale) * scale)
                ok = ~done & (r.astype(np.float32) == v32)
            out[ok] = r[ok]
            done |= ok
            if done.all():
                break
        rest = np.flatnonzero(todo & ~(vector & done))
        if rest.size:
            flat, src = out.reshape(-1), v32.reshape(-1)
            for i in rest.tolist():
                flat[i] = float(str(src[i]))  # numpy prints the shortest round-trip form
    out = np.where(np.asarray(missing, dtype=np.bool_) | np.isnan(out), np.nan, out)
    rows: list[list[float]] = out.tolist()
    return [[None if f != f else f for f in row] for row in rows]


def entity_id_strings(entity_ids: Sequence[Any]) -> list[str]:
    """Entity ids are strings (as stored); integers are accepted and turned into their
    decimal text (``7`` -> ``"7"``), as ``ingest`` does with an integer join key column."""
    ids = list(entity_ids)
    if all(type(e) is str for e in ids):
        return ids
    out = []
    for e in ids:
        if isinstance(e, str):
            out.append(e)
        elif isinstance(e, int | np.integer) and not isinstance(e, bool | np.bool_):
            out.append(str(int(e)))
        else:
            raise InvalidArgumentError(
                f"entity ids must be strings (or integers); got {type(e).__name__} {e!r}"
            )
    return out


class _Reader(msgspec.Struct, frozen=True):
    group: RegisteredGroup
    features: list[str]
    assembler: Assembler
    prefix: str


class FeatureService:
    """Definitions, offline and online stores, training sets and materialization.

    ::

        svc = FeatureService.open(catalog_url="sqlite:///c.db", offline_path="offline")
        svc.apply(load_definitions("features.yaml"))         # versions changed groups
        svc.ingest("trips", source_rows)                      # transform -> offline
        ts = svc.get_training_set(labels, ["trips:fare_mean"])  # point-in-time correct
        svc.materialize("trips")                              # offline -> online
        svc.get_online("trips", ["d1", "d2"]).values          # float32 [2, d]

    Reads without ``version`` use the group's latest version: after ``apply`` creates a new
    version, materialize it before readers switch to it (or pin ``version``).
    """

    def __init__(
        self,
        catalog: Catalog,
        offline: OfflineStore,
        online: OnlineStore,
        event_log: EventLog | None = None,
        *,
        max_online_batch: int = MAX_ONLINE_BATCH,
    ) -> None:
        self.catalog = catalog
        self.offline = offline
        self.online = online
        self.event_log = event_log
        self.max_online_batch = max_online_batch
        #: The online store's URL when opened by URL (``open``): engines that write it from
        #: their own workers (Spark's executors) open it there. None: this process writes.
        self.online_url: str | None = None
        self.online_namespace: str | None = None
        self._latest: dict[str, tuple[float, RegisteredGroup]] = {}
        self._readers: dict[tuple[str, int, tuple[str, ...] | None], _Reader] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        *,
        catalog_url: str,
        offline_path: str,
        online_url: str = "memory://",
        event_log_url: str | None = None,
        namespace: str | None = None,
        offline_engine: str = "duckdb",
    ) -> FeatureService:
        """Open every store by URL (the catalog shares the registry database); the offline
        store on ``offline_engine`` (a name or a class path, see ``open_offline_store``)."""
        offline = open_offline_store(offline_path, offline_engine)
        online = open_online_store(online_url, namespace=namespace)
        catalog = Catalog(catalog_url)
        event_log = None
        if event_log_url:
            from carrara.eventlog import open_event_log

            event_log = open_event_log(event_log_url)
        service = cls(catalog, offline, online, event_log)
        # Where the online store is, for engines whose workers write it themselves (Spark).
        service.online_url, service.online_namespace = online_url, namespace
        return service

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureService:
        service = cls.open(
            catalog_url=settings.resolved_registry_url,
            offline_path=settings.resolved_offline_store_path,
            online_url=settings.online_store_url,
            event_log_url=settings.resolved_event_log_url,
            offline_engine=settings.offline_engine,
        )
        service.offline.configure(settings)
        return service

    def close(self) -> None:
        self.online.close()
        self.offline.close()
        if self.event_log is not None:
            self.event_log.close()
        self.catalog.close()

    def __enter__(self) -> FeatureService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- definitions ------------------------------------------------------------------------

    def apply(self, definitions: Definitions, *, dry_run: bool = False) -> list[Change]:
        changes = self.catalog.apply(definitions, dry_run=dry_run)
        with self._lock:
            self._latest.clear()
        return changes

    def group(self, name: str, version: int | None = None) -> RegisteredGroup:
        """A group version; the latest is cached for a few seconds (reads are hot)."""
        if version is not None:
            return self.catalog.get_group(name, version)
        now = time.monotonic()
        cached = self._latest.get(name)
        if cached is not None and now - cached[0] < _GROUP_CACHE_SECONDS:
            return cached[1]
        group = self.catalog.get_group(name)
        self._latest[name] = (now, group)
        return group

    def list_groups(self) -> list[RegisteredGroup]:
        return self.catalog.list_groups()

    # -- offline ----------------------------------------------------------------------------

    def transform_rows(self, group: RegisteredGroup, data: Any) -> pa.Table:
        """Source rows -> feature rows through the group's transform (the one code path
        shared by batch ingestion and the streaming consumer)."""
        import pandas as pd
        import pyarrow as pa

        what = f"rows for feature group {group.name!r}"
        if isinstance(data, list):
            # Every key of any row becomes a column (rows without it get nulls).
            names = dict.fromkeys(k for row in data for k in row)
            try:
                data = pa.table({k: [row.get(k) for row in data] for k in names})
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise InvalidArgumentError(f"{what}: mixed or unsupported values: {exc}") from exc
        table = to_arrow(data)
        key = group.entity.key
        fn = resolve_transform(group.definition.transform)
        if fn is not None:
            try:
                out = fn(table.to_pandas())
            except Exception as exc:
                raise InvalidArgumentError(
                    f"{what}: transform {group.definition.transform!r} failed:"
                    f" {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(out, pd.DataFrame):
                raise InvalidArgumentError(
                    f"transform {group.definition.transform!r} of feature group {group.name!r}"
                    f" returned {type(out).__name__}; it must return a pandas DataFrame"
                )
            table = pa.Table.from_pandas(out, preserve_index=False)
        if "entity_id" not in table.column_names and key in table.column_names:
            table = table.rename_columns(
                ["entity_id" if c == key else c for c in table.column_names]
            )
        return self.offline.prepare(group, table)

    def ingest(self, group: str, data: Any, *, version: int | None = None) -> int:
        """Source rows (pandas/Polars/Arrow) -> transform -> offline store; returns rows.
        For an aggregated group the rows are events, and the entities they touch get their
        values at now written online."""
        g = self.group(group, version)
        return self._append(g, self.transform_rows(g, data))

    def write_offline(self, group: str, data: Any, *, version: int | None = None) -> int:
        """Feature rows (already transformed; events for an aggregated group, whose entities
        are then refreshed online as by :meth:`ingest`) -> offline store."""
        g = self.group(group, version)
        return self._append(g, self.offline.prepare(g, data))

    def _append(self, g: RegisteredGroup, table: pa.Table) -> int:
        written = self.offline.append(g, table)
        if written and g.definition.is_aggregated and g.definition.online:
            # New events change the entities' current aggregates: recompute them (the same
            # engine query as training sets and batch materialization) and write them.
            ids = table.column("entity_id").unique()
            now_us = time.time_ns() // 1000
            rows = aggregates_at(self.offline, g, ids, now_us)
            for vectors in table_to_vectors(g, rows):
                self.online.write_vectors(vectors, g.definition.ttl_us)
        return written

    def compact(self, group: str, *, version: int | None = None) -> CompactionResult:
        return self.offline.compact(self.group(group, version))

    def get_training_set(
        self,
        entity_df: Any,
        features: Sequence[str],
        *,
        timestamp_column: str = "event_timestamp",
        versions: dict[str, int] | None = None,
        threads: int | None = None,
    ) -> TrainingSet:
        """Point-in-time-correct features for each label row; ``features`` are
        ``"group:feature"`` or ``"group:*"`` (every feature of the group); the two mix, and a
        feature named twice is joined once, at its first place. The snapshot reference is
        recorded."""
        requests = []
        for name, wanted in parse_feature_refs(features).items():
            g = self.group(name, (versions or {}).get(name))
            expanded = (g.definition.feature_names if w == "*" else (w,) for w in wanted)
            names = tuple(dict.fromkeys(f for part in expanded for f in part))
            requests.append(FeatureRequest(g, names, g.entity.key))
        result = point_in_time_join(
            entity_df,
            requests,
            self.offline,
            timestamp_column_name=timestamp_column,
            threads=threads,
        )
        self.catalog.record_snapshot(result.snapshot_ref, msgspec.json.encode(result.spec).decode())
        return result

    # -- online -----------------------------------------------------------------------------

    def _reader(self, group: str, features: Sequence[str] | None, version: int | None) -> _Reader:
        g = self.group(group, version)
        wanted = None if features is None else tuple(features)
        key = (group, g.version, wanted)
        reader = self._readers.get(key)
        if reader is not None:
            return reader
        if not g.definition.online:
            raise InvalidArgumentError(
                f"feature group {group!r} has online=False; it has no online values"
            )
        names = list(g.definition.feature_names if wanted is None else wanted)
        for f in names:
            g.definition.feature(f)  # raises NotFoundError naming the known features
        if not names:
            raise InvalidArgumentError("features is empty; leave it out to read all features")
        spec = AssemblerSpec(
            groups=(GroupSchema(g.name, g.version, g.definition.feature_names),),
            features=tuple(FeatureRef(g.name, f) for f in names),
        )
        reader = _Reader(g, names, Assembler(spec), self.online.key_prefix(g.name, g.version))
        with self._lock:
            if len(self._readers) >= 1024:  # many ad-hoc feature subsets: start over
                self._readers.clear()
            self._readers[key] = reader
        return reader

    def get_online(
        self,
        group: str,
        entity_ids: Sequence[str | int],
        features: Sequence[str] | None = None,
        *,
        version: int | None = None,
        require_found: bool = False,
    ) -> OnlineFeatures:
        """Current values of ``features`` (default: all) for ``entity_ids``: one store
        round trip, decoded and laid out in C++. Entities without a stored value come back
        with ``found`` False, or raise ``NotFoundError`` with ``require_found``."""
        if isinstance(entity_ids, str):
            raise InvalidArgumentError("entity_ids must be a list of ids, not one string")
        entity_ids = entity_id_strings(entity_ids)
        n = len(entity_ids)
        if n > self.max_online_batch:
            raise BatchTooLargeError(
                f"{n} entities in one online read; the limit is {self.max_online_batch}:"
                " split the batch"
            )
        reader = self._reader(group, features, version)
        prefix = reader.prefix
        keys = [prefix + e for e in entity_ids]
        raw = self.online.get_many(keys)
        values, missing = reader.assembler.assemble([raw])
        if raw.count(None) == 0:  # the common case, without a Python-level loop
            found = np.ones(n, dtype=np.bool_)
        else:
            found = np.array([v is not None for v in raw], dtype=np.bool_)
            if require_found:
                absent = [e for e, v in zip(entity_ids, raw, strict=True) if v is None]
                shown = ", ".join(repr(e) for e in absent[:10])
                more = f" and {len(absent) - 10} more" if len(absent) > 10 else ""
                raise NotFoundError(
                    f"feature group {group!r} v{reader.group.version} has no online values for "
                    f"entity id(s) {shown}{more}: check the ids, or materialize the group"
                )
        return OnlineFeatures(
            group, reader.group.version, list(entity_ids), reader.features, values, missing, found
        )

    def freshness(self) -> list[GroupFreshness]:
        """Online freshness of every group in the catalog (latest versions, by name): when
        the online store last wrote it, the newest event time it holds and how old that is
        against the group's TTL. One read of the store's freshness records."""
        groups = self.list_groups()
        records = self.online.write_records()
        now_ms = self.online.now_ms()
        out = []
        for g in groups:
            d = g.definition
            ttl_s = d.ttl_days * 86_400.0 if d.ttl_days else None
            rec = records.get((g.name, g.version))
            if rec is None:
                out.append(
                    GroupFreshness(
                        group=g.name,
                        version=g.version,
                        online=d.online,
                        ttl_s=ttl_s,
                        last_write_at=None,
                        newest_event_ts=None,
                        age_s=None,
                        rows_last_write=None,
                        stale=d.online,
                    )
                )
                continue
            newest = rec.newest_event_us / 1e6
            age = now_ms / 1e3 - newest
            out.append(
                GroupFreshness(
                    group=g.name,
                    version=g.version,
                    online=d.online,
                    ttl_s=ttl_s,
                    last_write_at=rec.last_write_ms / 1e3,
                    newest_event_ts=newest,
                    age_s=age,
                    rows_last_write=rec.rows_last_write,
                    stale=d.online and ttl_s is not None and age > ttl_s,
                )
            )
        return out

    # -- materialization --------------------------------------------------------------------

    def materialize(
        self,
        group: str | None = None,
        *,
        full: bool = False,
        progress: bool = False,
        overlap_s: float = 60.0,
    ) -> list[MaterializeResult]:
        """Batch offline -> online for one group (latest version) or every online group."""
        groups = (
            [self.group(group)]
            if group
            else [g for g in self.list_groups() if g.definition.online and g.definition.offline]
        )
        return [
            materialize_batch(
                self.catalog,
                self.offline,
                self.online,
                g,
                full=full,
                progress=progress,
                overlap_s=overlap_s,
                online_url=self.online_url,
                namespace=self.online_namespace,
            )
            for g in groups
        ]

    def _need_log(self) -> EventLog:
        if self.event_log is None:
            raise InvalidArgumentError(
                "this FeatureService has no event log; open it with event_log_url"
            )
        return self.event_log

    def publish(self, group: str, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Send source rows for ``group`` to the ``feature-updates`` topic."""
        self.group(group)  # fail early on unknown groups
        return publish_rows(self._need_log(), group, rows)

    def stream_materializer(
        self, *, consumer_group: str = "feature-materializer", consumer: str | None = None
    ) -> StreamingMaterializer:
        """A consumer of the ``feature-updates`` topic that writes the latest version of each
        group through the same transform as :meth:`ingest`; windowed (aggregated) groups are
        rebuilt from the offline events at start and kept fresh from tiles. Run one consumer
        per consumer group when there are aggregated groups (each holds the tiles of the
        events it reads)."""
        return StreamingMaterializer(
            self._need_log(),
            self.offline,
            self.online,
            self.group,
            self.transform_rows,
            consumer_group=consumer_group,
            consumer=consumer,
            groups=self.list_groups,
        )
