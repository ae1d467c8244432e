# mypy: disable-error-code="import-untyped"
"""Tiled partial aggregates: the streaming side of windowed aggregations.

A :class:`TileAggregator` holds, for one aggregated group version, per entity and per tile
(of the group's ``tile``), one partial aggregate per *slot* (an aggregated column, or the
event count, within one bucket): the count, an exact sum, min, max, the latest value (by
event time, then write time) and the set of distinct values, as the outputs need them. The
value of a window at ``t`` merges the tiles it covers (the sawtooth windows of
:mod:`carrara.feature_cache.aggregations`), so it equals ``reference_values`` exactly: sums are
kept as Shewchuk partials (an exact representation) and rounded once, as ``math.fsum`` does.

Events come in any order, within a lateness bound: an event whose time is more than
``allowed_lateness_us`` behind the newest event time seen (the *watermark*) is dropped and
counted. Tiles that can still receive events (*open*: they end after the watermark minus the
lateness) also keep their raw events, so an exact duplicate (a replay) counts once, as the
offline engines count it, and a read inside a tile that holds later events stays exact.
Tiles older than the widest window plus the lateness are evicted.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from carrara.errors import FailedPreconditionError, InvalidArgumentError
from carrara.feature_cache.aggregations import Aggregation, Output, event_columns, outputs

if TYPE_CHECKING:
    import pyarrow as pa

    from carrara.feature_cache.definitions import FeatureGroup

__all__ = ["DEFAULT_ALLOWED_LATENESS_US", "TileAggregator"]

#: How far behind the newest event time an event may arrive and still count (10 minutes).
DEFAULT_ALLOWED_LATENESS_US = 600_000_000

Value = float | int | None
#: A raw event as a tile keeps it: (event time µs, write time µs, event column values).
RawEvent = tuple[int, int, tuple[Any, ...]]


class _Slot:
    """One partial aggregate per tile: column ``col`` (an index into the event row; -1: count
    events) among the events whose bucket column ``bucket_col`` equals ``bucket`` (-1: all),
    keeping what the outputs over it need."""

    __slots__ = ("bucket", "bucket_col", "col", "distinct", "last", "minmax", "sum")

    def __init__(self, col: int, bucket_col: int, bucket: str | None) -> None:
        self.col = col
        self.bucket_col = bucket_col
        self.bucket = bucket
        self.sum = self.minmax = self.last = self.distinct = False


class _Partial:
    """A slot's partial aggregate over some events: count, exact sum (non-overlapping
    partials plus infinities), min, max, latest (event time, write time, value), distinct."""

    __slots__ = ("distinct", "hi", "last", "lo", "n", "ninf", "parts", "pinf")

    def __init__(self) -> None:
        self.n = 0
        self.parts: list[float] = []
        self.pinf = 0
        self.ninf = 0
        self.lo: float | None = None
        self.hi: float | None = None
        self.last: tuple[int, int, float] | None = None
        self.distinct: set[float] | None = None

    def add(self, slot: _Slot, ets: int, wts: int, x: float | None) -> None:
        self.n += 1
        if x is None:  # the event count
            return
        if slot.sum:
            if math.isfinite(x):
                _grow(self.parts, x)
            elif x > 0:
                self.pinf += 1
            else:
                self.ninf += 1
        if slot.minmax:
            if self.lo is None or x < self.lo:
                self.lo = x
            if self.hi is None or x > self.hi:
                self.hi = x
        if slot.last and (self.last is None or (ets, wts) > self.last[:2]):
            self.last = (ets, wts, x)
        if slot.distinct:
            if self.distinct is None:
                self.distinct = set()
            self.distinct.add(x)

    def merge(self, other: _Partial) -> None:
        self.n += other.n
        for p in other.parts:
            _grow(self.parts, p)
        self.pinf += other.pinf
        self.ninf += other.ninf
        if other.lo is not None and (self.lo is None or other.lo < self.lo):
            self.lo = other.lo
        if other.hi is not None and (self.hi is None or other.hi > self.hi):
            self.hi = other.hi
        if other.last is not None and (self.last is None or other.last[:2] > self.last[:2]):
            self.last = other.last
        if other.distinct:
            if self.distinct is None:
                self.distinct = set()
            self.distinct |= other.distinct

    def total(self) -> float:
        if self.pinf and self.ninf:
            return math.nan
        if self.pinf:
            return math.inf
        if self.ninf:
            return -math.inf
        return math.fsum(self.parts)

    def value(self, function: str) -> Value:
        if function == "count":
            return self.n
        if function == "sum":
            return self.total() if self.n else 0.0
        if function == "mean":
            return self.total() / self.n if self.n else None
        if function == "min":
            return self.lo
        if function == "max":
            return self.hi
        if function == "last":
            return None if self.last is None else self.last[2]
        return len(self.distinct) if self.distinct else 0  # count_distinct


def _grow(parts: list[float], x: float) -> None:
    """Add ``x`` to the non-overlapping partials ``parts`` (Shewchuk's algorithm, as in
    ``math.fsum``): their exact sum stays the exact sum of every value added."""
    i = 0
    for y in parts:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            parts[i] = lo
            i += 1
        x = hi
    parts[i:] = [x]


class _Tile:
    __slots__ = ("max_us", "min_us", "parts", "raw")

    def __init__(self, slots: int, ets: int) -> None:
        self.parts = [_Partial() for _ in range(slots)]
        self.min_us = ets
        self.max_us = ets
        self.raw: set[RawEvent] | None = None  # kept while the tile is open


class _Entity:
    __slots__ = ("index", "tiles")

    def __init__(self) -> None:
        self.tiles: dict[int, _Tile] = {}
        self.index: list[int] = []  # the tiles' indexes, sorted


class TileAggregator:
    """Per entity and tile, partial aggregates of one aggregated group's events; values at
    any time by merging tiles (exactly the reference semantics), kept fresh incrementally.

    Reads are exact for times from the watermark minus the lateness on (what a streaming
    job serves); a read that needs tiles already closed or evicted raises
    :class:`~carrara.errors.FailedPreconditionError`."""

    def __init__(
        self,
        aggregations: Sequence[Aggregation],
        tile_us: int,
        *,
        allowed_lateness_us: int = DEFAULT_ALLOWED_LATENESS_US,
    ) -> None:
        if tile_us <= 0:
            raise InvalidArgumentError(f"tile must be positive, got {tile_us} µs")
        if allowed_lateness_us < 0:
            raise InvalidArgumentError(
                f"allowed lateness must be >= 0 µs, got {allowed_lateness_us}"
            )
        self.tile_us = tile_us
        self.allowed_lateness_us = allowed_lateness_us
        self.outputs: list[Output] = outputs(aggregations)
        if not self.outputs:
            raise InvalidArgumentError("a tile aggregator needs at least one aggregation")
        #: The event columns, in the order of an event's row tuple.
        self.columns: dict[str, str] = event_columns(aggregations)
        position = {c: i for i, c in enumerate(self.columns)}
        slots: dict[tuple[str, str, str | None], _Slot] = {}
        slot_index: dict[tuple[str, str, str | None], int] = {}
        # Per slot: its windows (in tiles, ascending), each with its outputs (name, function).
        plan: dict[int, dict[int, list[tuple[str, str]]]] = {}
        for o in self.outputs:
            if o.window_us % tile_us:
                raise InvalidArgumentError(
                    f"window of {o.name!r} ({o.window_us} µs) is not a whole number of tiles"
                )
            key = (o.column, o.bucket_column if o.bucket is not None else "", o.bucket)
            slot = slots.get(key)
            if slot is None:
                slot_index[key] = len(slots)
                slot = slots[key] = _Slot(
                    position[o.column] if o.column else -1,
                    position[o.bucket_column] if o.bucket is not None else -1,
                    o.bucket,
                )
            if o.function in ("sum", "mean"):
                slot.sum = True
            elif o.function in ("min", "max"):
                slot.minmax = True
            elif o.function == "last":
                slot.last = True
            elif o.function == "count_distinct":
                slot.distinct = True
            plan.setdefault(slot_index[key], {}).setdefault(o.window_us // tile_us, []).append(
                (o.name, o.function)
            )
        self._slots = list(slots.values())
        self._plan = [(s, sorted(windows.items())) for s, windows in sorted(plan.items())]
        self._windows = sorted({o.window_us // tile_us for o in self.outputs})
        self.max_window_us = max(o.window_us for o in self.outputs)
        self._entities: dict[str, _Entity] = {}
        #: The newest event time seen (µs); None before the first event.
        self.watermark_us: int | None = None
        #: Events dropped for arriving more than the allowed lateness behind the watermark.
        self.dropped_late = 0
        self._open_from: int | None = None  # first tile index that is still open
        self._keep_from: int | None = None  # first tile index not evicted

    @classmethod
    def for_group(
        cls, group: FeatureGroup, *, allowed_lateness_us: int = DEFAULT_ALLOWED_LATENESS_US
    ) -> TileAggregator:
        if not group.is_aggregated:
            raise InvalidArgumentError(f"feature group {group.name!r} has no aggregations")
        return cls(group.aggregations, group.tile_us, allowed_lateness_us=allowed_lateness_us)

    # -- events -----------------------------------------------------------------------------

    def late_mask(self, event_us: Any) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which of these events (in arrival order) are too late: more than the allowed
        lateness behind the newest event time seen before them (or among them). Changes
        nothing."""
        ev = np.asarray(event_us, dtype=np.int64)
        if ev.size == 0:
            return np.zeros(0, dtype=np.bool_)
        newest = np.maximum.accumulate(ev)
        if self.watermark_us is not None:
            newest = np.maximum(newest, self.watermark_us)
        late: np.ndarray[Any, np.dtype[np.bool_]] = ev < newest - self.allowed_lateness_us
        return late

    def add(
        self,
        entity_ids: Sequence[str],
        event_us: Any,
        created_us: Any,
        columns: Mapping[str, Sequence[Any]],
        *,
        check_lateness: bool = True,
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Apply events (arrival order): entity ids, event and write times (µs) and the event
        columns (values: numbers, None or NaN for missing; buckets: strings or None). Too late
        events (``check_lateness``) are dropped and counted in :attr:`dropped_late`; returns
        which events were accepted. Without ``check_lateness`` (a rebuild from stored events)
        every event counts, except those in tiles already evicted."""
        ev = np.asarray(event_us, dtype=np.int64)
        cr = np.asarray(created_us, dtype=np.int64)
        n = len(entity_ids)
        if ev.shape != (n,) or cr.shape != (n,):
            raise InvalidArgumentError(
                f"{n} entity ids but {ev.size} event times and {cr.size} write times"
            )
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise InvalidArgumentError(
                f"events lack column(s) {', '.join(missing)}; the aggregations read "
                f"{', '.join(self.columns)}"
            )
        rows = (
            list(
                zip(
                    *(
                        _floats(columns[c]) if kind == "float64" else _strings(columns[c])
                        for c, kind in self.columns.items()
                    ),
                    strict=True,
                )
            )
            if self.columns
            else [()] * n
        )
        if len(rows) != n:
            raise InvalidArgumentError(f"{n} entity ids but {len(rows)} rows of event columns")
        late = self.late_mask(ev) if check_lateness else np.zeros(n, dtype=np.bool_)
        self.dropped_late += int(late.sum())
        accepted = ~late
        if n == 0:
            return accepted
        tile_us = self.tile_us
        slots = self._slots
        keep_from = self._keep_from
        open_from = self._open_from
        ets_list = ev.tolist()
        wts_list = cr.tolist()
        for i in np.flatnonzero(accepted).tolist():
            ets = ets_list[i]
            j = ets // tile_us
            if keep_from is not None and j < keep_from:
                continue  # a rebuild's event older than anything still served
            entity = self._entities.get(entity_ids[i])
            if entity is None:
                entity = self._entities[entity_ids[i]] = _Entity()
            tile = entity.tiles.get(j)
            if tile is None:
                tile = entity.tiles[j] = _Tile(len(slots), ets)
                if not entity.index or j > entity.index[-1]:
                    entity.index.append(j)
                else:
                    bisect.insort(entity.index, j)
                if open_from is None or j >= open_from:
                    tile.raw = set()
            wts = wts_list[i]
            row = rows[i]
            if tile.raw is not None:
                event = (ets, wts, row)
                if event in tile.raw:
                    continue  # an exact duplicate (a replay) counts once
                tile.raw.add(event)
            _apply(tile, slots, ets, wts, row)
        newest = int(ev[accepted].max()) if accepted.any() else None
        if newest is not None and (self.watermark_us is None or newest > self.watermark_us):
            self.advance(newest)
        return accepted

    def add_table(self, table: pa.Table, *, check_lateness: bool = True) -> Any:
        """:meth:`add` for an Arrow table of events (``entity_id``, ``event_timestamp``,
        ``created_timestamp`` as timestamps or µs integers, and the event columns)."""
        return self.add(
            table.column("entity_id").to_pylist(),
            _micros(table.column("event_timestamp")),
            _micros(table.column("created_timestamp")),
            {c: table.column(c).to_pylist() for c in self.columns if c in table.column_names},
            check_lateness=check_lateness,
        )

    def advance(self, watermark_us: int) -> None:
        """Move the watermark to ``watermark_us`` (never back): tiles it closes drop their
        raw events, tiles older than the widest window plus the lateness are evicted."""
        if self.watermark_us is not None and watermark_us <= self.watermark_us:
            return
        self.watermark_us = watermark_us
        open_from = (watermark_us - self.allowed_lateness_us) // self.tile_us
        keep_from = (watermark_us - self.allowed_lateness_us - self.max_window_us) // self.tile_us
        if open_from == self._open_from and keep_from == self._keep_from:
            return
        was_open_from = self._open_from
        self._open_from, self._keep_from = open_from, keep_from
        empty = []
        for name, entity in self._entities.items():
            index = entity.index
            cut = bisect.bisect_left(index, keep_from)
            if cut:
                for j in index[:cut]:
                    del entity.tiles[j]
                del index[:cut]
            if not index:
                empty.append(name)
                continue
            # Only tiles open until now hold raw events: close those the watermark passed.
            lo = 0 if was_open_from is None else bisect.bisect_left(index, was_open_from)
            for j in index[lo : bisect.bisect_left(index, open_from)]:
                entity.tiles[j].raw = None
        for name in empty:
            del self._entities[name]

    # -- reads ------------------------------------------------------------------------------

    def entities(self) -> list[str]:
        """The entities holding tiles."""
        return list(self._entities)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._entities

    def values_at(self, entity_id: str, t_us: int) -> dict[str, Value]:
        """Every output's value at ``t_us`` for ``entity_id`` (as ``reference_values``):
        the tiles of each window merged, the one holding ``t_us`` up to ``t_us``."""
        tile_us = self.tile_us
        i = t_us // tile_us
        first = i - self.max_window_us // tile_us + 1
        if self._keep_from is not None and first < self._keep_from:
            raise FailedPreconditionError(
                f"values at {t_us} µs need tiles from before the eviction horizon (the newest "
                f"event time {self.watermark_us} µs minus the widest window and the allowed "
                "lateness): read at a later time"
            )
        entity = self._entities.get(entity_id)
        tiles: list[tuple[int, list[_Partial]]] = []  # descending tile index
        if entity is not None:
            index = entity.index
            lo = bisect.bisect_left(index, first)
            hi = bisect.bisect_right(index, i)
            for j in reversed(index[lo:hi]):
                tile = entity.tiles[j]
                if j == i and tile.max_us > t_us:
                    tiles.append((j, self._tile_until(tile, t_us)))
                else:
                    tiles.append((j, tile.parts))
        values: dict[str, Value] = {}
        for s, windows in self._plan:
            acc = _Partial()
            pos = 0
            for k, outs in windows:
                start = i - k + 1
                while pos < len(tiles) and tiles[pos][0] >= start:
                    acc.merge(tiles[pos][1][s])
                    pos += 1
                for name, function in outs:
                    values[name] = acc.value(function)
        return {o.name: values[o.name] for o in self.outputs}

    def _tile_until(self, tile: _Tile, t_us: int) -> list[_Partial]:
        """A tile's partials over its events up to ``t_us`` (from its raw events)."""
        if tile.raw is None:
            raise FailedPreconditionError(
                f"values at {t_us} µs need a tile that was closed (it holds later events and "
                "no longer keeps them one by one): read at a later time"
            )
        part = _Tile(len(self._slots), t_us)
        for ets, wts, row in tile.raw:
            if ets <= t_us:
                _apply(part, self._slots, ets, wts, row)
        return part.parts

    def next_change(self, entity_id: str, after_us: int) -> int | None:
        """The first time after ``after_us`` at which the entity's values may change without
        a new event: a tile holding events leaves a window, or an event dated later than
        ``after_us`` enters. None when nothing is held (values stay empty)."""
        entity = self._entities.get(entity_id)
        if entity is None or not entity.index:
            return None
        tile_us = self.tile_us
        index = entity.index
        a = after_us // tile_us
        best: int | None = None
        for k in self._windows:
            # Tile j leaves window k at (j + k) * tile, which is after after_us iff j+k > a.
            p = bisect.bisect_left(index, a + 1 - k)
            if p < len(index):
                at = (index[p] + k) * tile_us
                if best is None or at < best:
                    best = at
        for j in index[bisect.bisect_left(index, a) :]:
            tile = entity.tiles[j]
            if tile.max_us <= after_us:
                continue
            if tile.raw is not None:
                at = min(e[0] for e in tile.raw if e[0] > after_us)
            else:  # conservative: the first event, or at once
                at = tile.min_us if tile.min_us > after_us else after_us + 1
            if best is None or at < best:
                best = at
        return best

    def __len__(self) -> int:
        return len(self._entities)


def _apply(tile: _Tile, slots: Sequence[_Slot], ets: int, wts: int, row: tuple[Any, ...]) -> None:
    if ets < tile.min_us:
        tile.min_us = ets
    if ets > tile.max_us:
        tile.max_us = ets
    for slot, partial in zip(slots, tile.parts, strict=True):
        if slot.bucket_col >= 0 and row[slot.bucket_col] != slot.bucket:
            continue
        if slot.col >= 0:
            x = row[slot.col]
            if x is None:
                continue
            partial.add(slot, ets, wts, x)
        else:
            partial.add(slot, ets, wts, None)


def _floats(values: Sequence[Any]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
        else:
            x = float(v)
            out.append(None if x != x else x)
    return out


def _strings(values: Sequence[Any]) -> list[str | None]:
    return [None if v is None else str(v) for v in values]


def _micros(col: Any) -> np.ndarray[Any, np.dtype[np.int64]]:
    import pyarrow as pa

    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64())
    out: np.ndarray[Any, np.dtype[np.int64]] = np.asarray(col.to_numpy(), dtype=np.int64)
    return out
