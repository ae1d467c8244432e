# mypy: disable-error-code="import-untyped"
"""Streaming materialization: feature-source rows from the event log, through the group's
transform, into the online store and the offline store.

Producers publish :class:`FeatureUpdate` messages (msgpack) to the ``feature-updates`` topic;
:class:`StreamingMaterializer` consumes them in a consumer group (at-least-once: a batch is
acked only after both stores are written; a replay is harmless because offline duplicates are
equal rows and online writes keep the most recent value).

An aggregated group (:mod:`carrara.feature_cache.aggregations`) keeps its events: they are
appended offline and applied to in-memory tiles (:mod:`carrara.feature_cache.tiles`), and the
touched entities' values at now are written online. Windows slide without events, so
:meth:`StreamingMaterializer.refresh` (run by the poll loop) rewrites each entity when a tile
with events leaves one of its windows. An event more than the allowed lateness behind the
newest event time seen for the group is dropped (counted, written nowhere), so both stores
hold the same events; on start the tiles are rebuilt from the offline store's recent events.
One materializer per consumer group serves an aggregated group (each holds all its tiles).
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from carrara.core import FeatureVector
from carrara.errors import FailedPreconditionError, InvalidArgumentError
from carrara.eventlog import EventLog
from carrara.feature_cache.catalog import RegisteredGroup
from carrara.feature_cache.materialize import table_to_vectors
from carrara.feature_cache.offline_store import OfflineStore, _allocate_created
from carrara.feature_cache.online_store import OnlineStore
from carrara.feature_cache.tiles import DEFAULT_ALLOWED_LATENESS_US, TileAggregator
from carrara.types import Topic

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "FeatureUpdate",
    "StreamResult",
    "StreamingMaterializer",
    "publish_rows",
]

log = logging.getLogger(__name__)


class FeatureUpdate(msgspec.Struct, frozen=True):
    """Source rows for one feature group (before its transform). Each row needs the
    entity id (``entity_id`` or the entity's join key) and ``event_timestamp``."""

    group: str
    rows: list[dict[str, Any]]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(FeatureUpdate)


def publish_rows(
    log_: EventLog, group: str, rows: Sequence[dict[str, Any]], *, batch: int = 500
) -> list[str]:
    """Publish source rows for ``group`` (``batch`` rows per event); returns event ids.

    A row without a ``created_timestamp`` gets one now (its publish time, µs, distinct per
    row), so an event delivered twice (at-least-once: a consumer failed after writing the
    offline store) writes exactly the rows it wrote before, which the offline engines, the
    compaction and the windowed tiles count once."""
    missing = sum(1 for r in rows if "created_timestamp" not in r)
    if missing:
        base = _allocate_created(missing, None)
        stamped = []
        for r in rows:
            if "created_timestamp" not in r:
                r = {**r, "created_timestamp": base}
                base += 1
            stamped.append(r)
        rows = stamped
    payloads = [
        _encoder.encode(FeatureUpdate(group, list(rows[i : i + batch])))
        for i in range(0, len(rows), batch)
    ]
    return log_.append_many(Topic.FEATURE_UPDATES, payloads)


class StreamResult(msgspec.Struct):
    events: int = 0
    rows: int = 0
    online_written: int = 0
    offline_rows: int = 0
    skipped_events: int = 0
    late_events: int = 0  # aggregated groups' events beyond the allowed lateness (dropped)
    refreshed: int = 0  # online values rewritten because windows slid (see ``refresh``)


def _now_us() -> int:
    return time.time_ns() // 1000


class _Live:
    """An aggregated group version's tiles, and when each entity's values change next."""

    def __init__(self, group: RegisteredGroup, tiles: TileAggregator) -> None:
        self.group = group
        self.tiles = tiles
        self.due: list[tuple[int, str]] = []  # heap of (next change µs, entity)
        self.next: dict[str, int] = {}  # the entity's current next change (heap entries
        # that disagree are stale)

    def schedule(self, entity: str, at: int | None) -> None:
        if at is None:
            self.next.pop(entity, None)
            return
        if self.next.get(entity) == at:
            return
        self.next[entity] = at
        heapq.heappush(self.due, (at, entity))

    def pop_due(self, now_us: int) -> list[str]:
        out: list[str] = []
        while self.due and self.due[0][0] <= now_us:
            at, entity = heapq.heappop(self.due)
            if self.next.get(entity) == at:
                del self.next[entity]
                out.append(entity)
        return out


class StreamingMaterializer:
    """A consumer of ``feature-updates`` that applies each group's transform and writes both
    stores. ``resolve(name)`` gives the group version to write (normally the latest);
    ``prepare(group, rows)`` applies its transform and returns an Arrow table.

    For aggregated groups: ``now_us`` is the clock (µs; injectable for tests) the online
    values are computed at, ``allowed_lateness_us`` the lateness bound, and ``groups`` (the
    latest group versions) lets :meth:`start` rebuild every aggregated group's tiles up
    front; without it a group's tiles are rebuilt when its first event arrives."""

    def __init__(
        self,
        event_log: EventLog,
        offline: OfflineStore,
        online: OnlineStore,
        resolve: Callable[[str], RegisteredGroup],
        prepare: Callable[[RegisteredGroup, list[dict[str, Any]]], pa.Table],
        *,
        consumer_group: str = "feature-materializer",
        consumer: str | None = None,
        now_us: Callable[[], int] | None = None,
        allowed_lateness_us: int = DEFAULT_ALLOWED_LATENESS_US,
        groups: Callable[[], Sequence[RegisteredGroup]] | None = None,
    ) -> None:
        self.log = event_log
        self.offline = offline
        self.online = online
        self._resolve = resolve
        self._prepare = prepare
        self.consumer_group = consumer_group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.now_us = now_us or _now_us
        self.allowed_lateness_us = allowed_lateness_us
        self._groups = groups
        self._started = False
        self._live: dict[str, _Live] = {}  # aggregated groups by name (their served version)

    def run_once(self, *, count: int = 100, block_ms: int = 0) -> StreamResult:
        """Consume up to ``count`` events, write them, ack them."""
        result = StreamResult()
        events = self.log.read(
            Topic.FEATURE_UPDATES,
            self.consumer_group,
            self.consumer,
            count=count,
            block_ms=block_ms,
        )
        if not events:
            return result
        by_group: dict[str, tuple[list[dict[str, Any]], list[bytes]]] = {}
        dead: list[bytes] = []
        for event in events:
            result.events += 1
            try:
                update = _decoder.decode(event.payload)
            except msgspec.DecodeError as exc:
                # A poison message would block the consumer forever: set it aside.
                log.error(
                    "malformed feature update %s to %s: %s",
                    event.id,
                    Topic.FEATURE_UPDATES_DEAD,
                    exc,
                )
                result.skipped_events += 1
                dead.append(event.payload)
                continue
            rows, payloads = by_group.setdefault(update.group, ([], []))
            rows.extend(update.rows)
            payloads.append(event.payload)
        for name, (rows, payloads) in by_group.items():
            try:
                self._write(name, rows, result)
            except (LookupError, InvalidArgumentError) as exc:
                # Rows that can never be written (unknown group, rows the schema or transform
                # refuses) go to the dead-letter topic, event by event, so one bad event does
                # not take its neighbours along; other errors (a store down) propagate
                # un-acked and the events are delivered again.
                if len(payloads) == 1:
                    log.error("event for %r to %s: %s", name, Topic.FEATURE_UPDATES_DEAD, exc)
                    result.skipped_events += 1
                    dead.append(payloads[0])
                    continue
                for payload in payloads:
                    try:
                        self._write(name, _decoder.decode(payload).rows, result)
                    except (LookupError, InvalidArgumentError) as one:
                        log.error("event for %r to %s: %s", name, Topic.FEATURE_UPDATES_DEAD, one)
                        result.skipped_events += 1
                        dead.append(payload)
        if dead:
            self.log.append_many(Topic.FEATURE_UPDATES_DEAD, dead)
        self.log.ack(Topic.FEATURE_UPDATES, self.consumer_group, [e.id for e in events])
        return result

    def _write(self, name: str, rows: list[dict[str, Any]], result: StreamResult) -> None:
        group = self._resolve(name)
        table = self._prepare(group, rows)
        if group.definition.is_aggregated:
            self._write_events(group, table, result)
            return
        if group.definition.offline:
            result.offline_rows += self.offline.append(group, table)
        if group.definition.online:
            latest = _latest_per_entity(table)
            for vectors in table_to_vectors(group, latest):
                result.online_written += self.online.write_vectors(vectors, group.definition.ttl_us)
        result.rows += table.num_rows

    # -- aggregated groups -----------------------------------------------------------------

    def _write_events(self, group: RegisteredGroup, table: pa.Table, result: StreamResult) -> None:
        """An aggregated group's events: too-late ones dropped, the others appended offline
        (first: a failure there leaves the tiles as they were, and the events are delivered
        again), applied to the tiles, and the touched entities' values written online."""
        import pyarrow as pa

        live = self._live_for(group) if group.definition.online else None
        if live is not None and table.num_rows:
            event_us = _micros(table.column("event_timestamp"))
            late = live.tiles.late_mask(event_us)
            dropped = int(late.sum())
            if dropped:
                log.warning(
                    "%d event(s) for %r more than %g s behind the newest event time: dropped"
                    " (the oldest at %d µs, the newest at %d µs)",
                    dropped,
                    group.name,
                    self.allowed_lateness_us / 1e6,
                    int(event_us[late].min()),
                    max(int(event_us.max()), live.tiles.watermark_us or 0),
                )
                table = table.filter(pa.array(~late))
                live.tiles.dropped_late += dropped
                result.late_events += dropped
        if group.definition.offline and table.num_rows:
            result.offline_rows += self.offline.append(group, table)
        if live is not None and table.num_rows:
            live.tiles.add_table(table, check_lateness=False)  # lateness applied above
            touched = table.column("entity_id").unique().to_pylist()
            result.online_written += self._write_values(live, touched, self.now_us())
        result.rows += table.num_rows

    def _live_for(self, group: RegisteredGroup) -> _Live:
        """The tiles of the group version, rebuilt from the offline store on first use."""
        live = self._live.get(group.name)
        if live is not None and live.group.version == group.version:
            return live
        tiles = TileAggregator.for_group(
            group.definition, allowed_lateness_us=self.allowed_lateness_us
        )
        live = _Live(group, tiles)
        if group.definition.offline:
            self._rebuild(live)
        self._live[group.name] = live
        return live

    def _rebuild(self, live: _Live) -> None:
        """Load the offline events that the values from now on depend on (the widest window
        plus the lateness back from now), then write every entity's values at now: a
        restarted materializer serves exact values at once."""
        import pyarrow as pa

        group, tiles = live.group, live.tiles
        now = self.now_us()
        files = self.offline.files(group.name, group.version)
        if not files:
            return
        horizon = now - tiles.max_window_us - tiles.allowed_lateness_us - tiles.tile_us
        first_day = _day(horizon)
        dated = [(_file_day(f), f) for f in files]
        newest = max((d for d, _ in dated if d is not None), default=None)
        # Whole date partitions from the horizon on, and the newest (for the watermark).
        chosen = [f for d, f in dated if d is None or d >= first_day or d == newest]
        table = self.offline.read(group, chosen)
        if table.num_rows == 0:
            return
        event_us = _micros(table.column("event_timestamp"))
        tiles.advance(int(event_us.max()))
        table = table.filter(pa.array(event_us >= horizon))
        if table.num_rows:
            # Exact duplicates (a replayed write) count once, as the offline engines count them.
            table = table.group_by(table.column_names, use_threads=False).aggregate([])
            table = table.sort_by([("event_timestamp", "ascending")])
            tiles.add_table(table, check_lateness=False)
        restored = self._write_values(live, tiles.entities(), now)
        log.info(
            "rebuilt %s v%d tiles from %d offline events (%d entities, %d values written)",
            group.name,
            group.version,
            table.num_rows,
            len(tiles),
            restored,
        )

    def _write_values(self, live: _Live, entities: Iterable[str], now_us: int) -> int:
        """Write the entities' values at ``now_us`` online and schedule their next change."""
        group, tiles = live.group, live.tiles
        vectors: list[FeatureVector] = []
        written = 0
        for entity in entities:
            try:
                values = tiles.values_at(entity, now_us)
            except FailedPreconditionError as exc:
                # The clock is far behind the events' times (beyond the lateness): skip.
                log.warning("%s v%d %r: not written: %s", group.name, group.version, entity, exc)
                continue
            row = list(values.values())
            missing = np.array([v is None for v in row], dtype=np.bool_)
            vector = np.array([0.0 if v is None else v for v in row], dtype=np.float32)
            vectors.append(
                FeatureVector(entity, group.name, group.version, vector, missing, now_us, now_us)
            )
            live.schedule(entity, tiles.next_change(entity, now_us))
            if len(vectors) >= 10_000:
                written += self._put(group, vectors)
                vectors = []
        return written + self._put(group, vectors)

    def _put(self, group: RegisteredGroup, vectors: list[FeatureVector]) -> int:
        # The tiles are the source of the values: always overwrite (a value computed at an
        # equal time after new events must replace the one before them).
        return self.online.write_vectors(vectors, group.definition.ttl_us, only_newer=False)

    def start(self) -> int:
        """Rebuild the tiles of every aggregated online group (when ``groups`` was given)
        from the offline store and write their values at now; returns the groups rebuilt."""
        self._started = True
        if self._groups is None:
            return 0
        n = 0
        for group in self._groups():
            d = group.definition
            if d.is_aggregated and d.online:
                self._live_for(group)
                n += 1
        return n

    def refresh(self, now_us: int | None = None) -> int:
        """Rewrite the values of the entities whose next change is due at ``now_us`` (default:
        the clock): windows slid without new events. Returns the values written."""
        now = self.now_us() if now_us is None else now_us
        written = 0
        for live in list(self._live.values()):
            due = live.pop_due(now)
            if due:
                written += self._write_values(live, due, now)
        return written

    def run(
        self,
        *,
        max_events: int | None = None,
        max_seconds: float | None = None,
        stop_when_idle: bool = False,
        block_ms: int = 500,
        count: int = 100,
    ) -> StreamResult:
        """Consume until ``max_events`` events, ``max_seconds``, or (``stop_when_idle``) the
        first empty read."""
        total = StreamResult()
        if not self._started:
            self.start()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while True:
            if max_events is not None and total.events >= max_events:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            want = count if max_events is None else min(count, max_events - total.events)
            r = self.run_once(count=want, block_ms=0 if stop_when_idle else block_ms)
            r.refreshed = self.refresh()
            for field in msgspec.structs.fields(StreamResult):
                setattr(total, field.name, getattr(total, field.name) + getattr(r, field.name))
            if r.events == 0 and stop_when_idle:
                break
        return total


_DATE = re.compile(r"date=(\d{4})-(\d{2})-(\d{2})")


def _file_day(path: str) -> dt.date | None:
    """The event date of a dataset file (its ``date=`` partition), None if it has none."""
    m = _DATE.search(path)
    return None if m is None else dt.date(int(m[1]), int(m[2]), int(m[3]))


def _day(us: int) -> dt.date:
    return dt.date(1970, 1, 1) + dt.timedelta(days=us // 86_400_000_000)


def _micros(col: Any) -> np.ndarray[Any, np.dtype[np.int64]]:
    import pyarrow as pa

    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64())
    out: np.ndarray[Any, np.dtype[np.int64]] = np.asarray(col.to_numpy(), dtype=np.int64)
    return out


def _latest_per_entity(table: pa.Table) -> pa.Table:
    """Each entity's row with the greatest (event_timestamp, created_timestamp)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table,
        sort_keys=[
            ("entity_id", "ascending"),
            ("event_timestamp", "descending"),
            ("created_timestamp", "descending"),
        ],
    )
    ordered = table.take(order)
    ids = ordered.column("entity_id").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), first.fill_null(True)])
    return ordered.filter(keep)
