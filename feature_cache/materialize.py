# mypy: disable-error-code="import-untyped"
"""Batch materialization: the latest offline row of each entity into the online store.

Incremental: only entities with rows created since the last run's watermark are looked at,
but for those the latest row over *all* their rows is taken, so late-arriving rows (an old
event time written late) are handled. Re-running writes nothing new (values at least as
recent are kept), so it is idempotent.

An aggregated group's values depend on the time they are read at (its windows slide), so
each run writes every entity's aggregates at the run's time, computed by the engine's
point-in-time join (the query training sets use): one label per entity, at now.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from carrara.core import FeatureVector
from carrara.errors import InvalidArgumentError
from carrara.feature_cache.catalog import Catalog, RegisteredGroup
from carrara.feature_cache.offline_store import AsOfJoin, OfflineStore
from carrara.feature_cache.online_store import OnlineStore

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["MaterializeResult", "aggregates_at", "materialize_batch", "table_to_vectors"]


class MaterializeResult(msgspec.Struct, frozen=True):
    group: str
    version: int
    entities: int  # entities whose latest row was considered
    written: int  # online values written (others were already as recent, or expired)
    watermark_us: int
    seconds: float
    expired: int = 0  # entities whose latest row is already past the group's TTL (not written)
    ttl_days: float = 0.0  # the group's TTL (0: never expires)
    newest_event_us: int | None = None  # the newest event time among the rows looked at

    def summary(self) -> str:
        """One line for people: counts, and why nothing was written when that is the case."""
        line = f"{self.group} v{self.version}: {self.entities} entities, {self.written} written"
        if self.expired:
            line += f", {self.expired} expired"
        if self.entities and self.written == 0 and self.expired == self.entities:
            import datetime as dt

            newest = ""
            if self.newest_event_us is not None:
                t = dt.datetime.fromtimestamp(self.newest_event_us / 1e6, tz=dt.UTC)
                newest = f" (newest event at {t.isoformat(timespec='seconds')})"
            line += (
                f": every row is older than the group's TTL of {self.ttl_days:g}"
                f" day{'' if self.ttl_days == 1 else 's'}{newest};"
                " reads will find nothing. Ingest recent rows, or raise ttl_days (0: never expire)"
            )
        return line


def table_to_vectors(
    group: RegisteredGroup, table: pa.Table, *, chunk: int = 50_000
) -> Iterator[list[FeatureVector]]:
    """FeatureVectors from rows with ``entity_id``, ``event_timestamp`` and
    ``created_timestamp`` (datetimes or µs integers) and the group's features; nulls become
    missing values."""
    import pyarrow as pa

    names = group.definition.feature_names
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        ids = part.column("entity_id").to_pylist()
        ets = _micros(part.column("event_timestamp"))
        cts = _micros(part.column("created_timestamp"))
        values = np.empty((part.num_rows, len(names)), dtype=np.float32)
        missing = np.zeros((part.num_rows, len(names)), dtype=np.bool_)
        for j, name in enumerate(names):
            col = part.column(name).cast(pa.float32())
            missing[:, j] = col.is_null().to_numpy(zero_copy_only=False)
            values[:, j] = col.fill_null(0.0).to_numpy()
        yield [
            FeatureVector(
                ids[i], group.name, group.version, values[i], missing[i], int(ets[i]), int(cts[i])
            )
            for i in range(part.num_rows)
        ]


def aggregates_at(
    offline: OfflineStore,
    group: RegisteredGroup,
    entity_ids: Any,
    at_us: int,
    *,
    files: list[str] | None = None,
) -> pa.Table:
    """An aggregated group's values at ``at_us`` for ``entity_ids`` (strings; an Arrow array
    or a sequence), as rows for :func:`table_to_vectors` (event and write time ``at_us``).
    Computed by the engine's point-in-time join with one label per entity, so online values
    are the ones a training set at that time gets."""
    import pyarrow as pa

    ids = entity_ids if isinstance(entity_ids, pa.Array | pa.ChunkedArray) else pa.array(entity_ids)
    ids = ids.cast(pa.string())
    n = len(ids)
    names = group.definition.feature_names
    if files is None:
        files = offline.files(group.name, group.version)
    labels = pa.table(
        {
            "entity_id": ids,
            "__k0": ids,
            "__row": pa.array(np.arange(n, dtype=np.int64)),
            "__ts": pa.array(np.full(n, at_us, dtype=np.int64)),
        }
    )
    joined = offline.as_of_join(labels, [AsOfJoin(group, names, "__k0", tuple(files))])
    stamp = pa.array(np.full(n, at_us, dtype=np.int64))
    columns: dict[str, Any] = {
        "entity_id": joined.column("entity_id"),
        "event_timestamp": stamp,
        "created_timestamp": stamp,
    }
    for f in names:
        columns[f] = joined.column(f"{group.name}__{f}")
    return pa.table(columns)


def _micros(col: Any) -> np.ndarray[Any, np.dtype[np.int64]]:
    import pyarrow as pa

    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64())
    out: np.ndarray[Any, np.dtype[np.int64]] = col.to_numpy().astype(np.int64, copy=False)
    return out


def _next_watermark(
    max_created_us: int | None, watermark: int, start_us: int, overlap_s: float
) -> int:
    """The watermark a run stores: the dataset's newest write time, but ``overlap_s`` behind
    the run's start (rows appended meanwhile are looked at again) and never backwards."""
    high = int(max_created_us or watermark)
    return max(watermark, min(high, start_us - int(overlap_s * 1_000_000)))


def materialize_batch(
    catalog: Catalog,
    offline: OfflineStore,
    online: OnlineStore,
    group: RegisteredGroup,
    *,
    full: bool = False,
    progress: bool = False,
    chunk: int = 50_000,
    overlap_s: float = 60.0,
    now_us: int | None = None,
    online_url: str | None = None,
    namespace: str | None = None,
) -> MaterializeResult:
    """Write the latest value of each entity touched since the last run (all with ``full``);
    for an aggregated group, every entity's windowed aggregates at ``now_us`` (default: now).

    The stored watermark stays ``overlap_s`` behind the run's start, so rows another process
    was appending while this run read (their write time is earlier than rows already seen) are
    looked at again next time; re-examining them writes nothing if nothing changed."""

    if not group.definition.online:
        raise InvalidArgumentError(
            f"feature group {group.name!r} has online=False; nothing to materialize"
        )
    started = time.perf_counter()
    watermark = 0 if full else catalog.watermark(group.name, group.version)
    files = offline.files(group.name, group.version)
    if not files:
        return MaterializeResult(
            group.name, group.version, 0, 0, watermark, 0.0, ttl_days=group.definition.ttl_days
        )
    aggregated = group.definition.is_aggregated
    start_us = time.time_ns() // 1000
    if online_url and not progress:
        # An engine with workers of its own (Spark) writes the online store from them.
        done = offline.write_online(
            group,
            online_url,
            namespace=namespace,
            created_after_us=0 if aggregated else watermark,
            files=files,
            now_us=start_us if now_us is None else now_us,
            chunk=chunk,
        )
        if done is not None:
            high = _next_watermark(done.max_created_us, watermark, start_us, overlap_s)
            catalog.set_watermark(group.name, group.version, high, done.written)
            return MaterializeResult(
                group.name,
                group.version,
                done.entities,
                done.written,
                high,
                time.perf_counter() - started,
                expired=done.expired,
                ttl_days=group.definition.ttl_days,
                newest_event_us=done.newest_event_us,
            )
    # The engine's query (DuckDB, or whichever offline engine the settings name).
    # An aggregated group's values move with time even without new events (windows slide),
    # so every entity with events is recomputed, at now.
    rows = offline.latest_rows(group, created_after_us=0 if aggregated else watermark, files=files)
    latest = rows.table
    high = _next_watermark(rows.max_created_us, watermark, start_us, overlap_s)
    written = 0
    ttl = group.definition.ttl_us
    expired = 0
    newest: int | None = None
    if latest.num_rows:
        event_us = _micros(latest.column("event_timestamp"))
        newest = int(event_us.max())
        if aggregated:
            at = start_us if now_us is None else now_us
            latest = aggregates_at(offline, group, latest.column("entity_id"), at, files=files)
        elif ttl:
            # The online store's rule (OnlineStore.write_vectors): expired at event time + TTL.
            expired = int(((event_us + ttl) // 1000 <= online.now_ms()).sum())
    if progress:
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task = bar.add_task(f"materialize {group.name} v{group.version}", total=latest.num_rows)
            for vectors in table_to_vectors(group, latest, chunk=chunk):
                written += online.write_vectors(vectors, ttl)
                bar.advance(task, len(vectors))
    else:
        for vectors in table_to_vectors(group, latest, chunk=chunk):
            written += online.write_vectors(vectors, ttl)
    catalog.set_watermark(group.name, group.version, high, written)
    return MaterializeResult(
        group.name,
        group.version,
        latest.num_rows,
        written,
        high,
        time.perf_counter() - started,
        expired=expired,
        ttl_days=group.definition.ttl_days,
        newest_event_us=newest,
    )
