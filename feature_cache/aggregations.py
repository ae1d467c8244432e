"""Windowed aggregations: features defined as an aggregation over a source's events.

``Aggregation(function="sum", column="fare", windows=("1h", "1d", "7d"))`` in a feature
group's ``aggregations`` declares one feature per window (``fare_sum_1h``, ``fare_sum_1d``,
``fare_sum_7d``; with ``bucket_column``/``buckets``, one per bucket and window:
``fare_sum_card_1d``). The group then stores raw events (its *event columns*: the aggregated
columns as float64 and the bucket columns as strings) and every engine computes the same
values from them: DuckDB and Spark for training sets and batch materialization, and the
streaming path incrementally from tiles.

Window semantics (the same everywhere, so there is no training/serving skew): time is cut
into tiles of the group's ``tile`` (default one minute; every window is a whole number of
tiles). The value at time ``t`` of a window ``w`` aggregates the events whose event time lies
in ``[T + tile - w, t]``, where ``T`` is the start of the tile that holds ``t``: the current,
partly elapsed tile plus the ``w / tile - 1`` whole tiles before it (a "sawtooth" window:
between ``w - tile`` and ``w`` long). That is what a streaming job can keep exactly with one
partial aggregate per tile.

Functions, over the events in the window whose ``column`` is not null (``count`` without a
column counts events):

- ``count`` and ``sum``: 0 when there are none;
- ``mean``, ``min``, ``max``: missing (null) when there are none;
- ``last``: the value of the latest event (greatest event time, then write time);
- ``count_distinct``: the exact number of distinct values (0 when none).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from carrara.errors import InvalidArgumentError

__all__ = [
    "FUNCTIONS",
    "Aggregation",
    "Output",
    "event_columns",
    "outputs",
    "parse_duration",
    "reference_values",
    "window_start",
]

Function = Literal["count", "sum", "mean", "min", "max", "last", "count_distinct"]
FUNCTIONS: tuple[str, ...] = ("count", "sum", "mean", "min", "max", "last", "count_distinct")
#: Functions whose value is an integer (offline int64); the others are float64.
INTEGER_FUNCTIONS = frozenset({"count", "count_distinct"})
#: Functions that are 0 (not missing) over an empty window.
ZERO_WHEN_EMPTY = frozenset({"count", "sum", "count_distinct"})

_UNITS_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def parse_duration(text: str, what: str = "duration") -> int:
    """``"15m"``, ``"1h"``, ``"7d"``... in microseconds (units s, m, h, d)."""
    m = _DURATION.match(text)
    if m is None:
        raise InvalidArgumentError(
            f"invalid {what} {text!r}: write a whole number and a unit s, m, h or d "
            "(e.g. '15m', '1h', '7d')"
        )
    return int(m.group(1)) * _UNITS_US[m.group(2)]


class Aggregation(msgspec.Struct, frozen=True, kw_only=True):
    """One aggregation of an event column over one or more windows."""

    function: Function
    windows: tuple[str, ...]
    column: str = ""  # the aggregated event column ("" with count: count events)
    name: str = ""  # output prefix (default: "{column}_{function}", or "event_count")
    bucket_column: str = ""  # optional category column: one output per bucket and window
    buckets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise InvalidArgumentError(
                f"unknown aggregation function {self.function!r}; known: {', '.join(FUNCTIONS)}"
            )
        if not self.column and self.function != "count":
            raise InvalidArgumentError(f"aggregation {self.function!r} needs a column")
        if not self.windows:
            raise InvalidArgumentError(f"aggregation {self.prefix!r} declares no windows")
        for w in self.windows:
            parse_duration(w, "window")
        if len(set(self.windows)) != len(self.windows):
            raise InvalidArgumentError(f"aggregation {self.prefix!r} repeats a window")
        for kind, value in (("column", self.column), ("bucket column", self.bucket_column)):
            if value and not _NAME.match(value):
                raise InvalidArgumentError(f"invalid {kind} name {value!r}")
        if self.name and not _NAME.match(self.name):
            raise InvalidArgumentError(f"invalid aggregation name {self.name!r}")
        if bool(self.bucket_column) != bool(self.buckets):
            raise InvalidArgumentError(
                f"aggregation {self.prefix!r}: give both bucket_column and buckets, or neither"
            )
        for b in self.buckets:
            if not re.match(r"^[a-z0-9_]{1,40}$", b):
                raise InvalidArgumentError(
                    f"bucket {b!r}: use lowercase letters, digits and '_' (it names features)"
                )
        if len(set(self.buckets)) != len(self.buckets):
            raise InvalidArgumentError(f"aggregation {self.prefix!r} repeats a bucket")
        if self.column and self.column == self.bucket_column:
            raise InvalidArgumentError("the bucket column cannot be the aggregated column")

    @property
    def prefix(self) -> str:
        if self.name:
            return self.name
        return f"{self.column}_{self.function}" if self.column else "event_count"


class Output(msgspec.Struct, frozen=True):
    """One output feature of an aggregation: its name, function, column, window (µs) and
    bucket (``None``: every event)."""

    name: str
    function: Function
    column: str
    window_us: int
    bucket_column: str = ""
    bucket: str | None = None

    @property
    def dtype(self) -> str:
        return "int64" if self.function in INTEGER_FUNCTIONS else "float64"


def outputs(aggregations: Sequence[Aggregation]) -> list[Output]:
    """Every output feature, in declaration order (aggregation, bucket, window)."""
    out = []
    for a in aggregations:
        buckets: Sequence[str | None] = a.buckets or (None,)
        for b in buckets:
            for w in a.windows:
                name = f"{a.prefix}_{b}_{w}" if b is not None else f"{a.prefix}_{w}"
                window_us = parse_duration(w)
                out.append(Output(name, a.function, a.column, window_us, a.bucket_column, b))
    return out


def event_columns(aggregations: Sequence[Aggregation]) -> dict[str, str]:
    """The event columns a group with these aggregations stores: aggregated columns
    (``"float64"``) and bucket columns (``"string"``), in first-use order."""
    cols: dict[str, str] = {}
    for a in aggregations:
        if a.column:
            if cols.get(a.column) == "string":
                raise InvalidArgumentError(f"column {a.column!r} is both a value and a bucket")
            cols.setdefault(a.column, "float64")
        if a.bucket_column:
            if cols.get(a.bucket_column) == "float64":
                raise InvalidArgumentError(
                    f"column {a.bucket_column!r} is both a value and a bucket"
                )
            cols.setdefault(a.bucket_column, "string")
    return cols


def check_tiles(aggregations: Sequence[Aggregation], tile: str) -> int:
    """The tile in µs, after checking every window is a whole number of tiles."""
    tile_us = parse_duration(tile, "tile")
    for a in aggregations:
        for w in a.windows:
            if parse_duration(w) % tile_us:
                raise InvalidArgumentError(
                    f"window {w} of {a.prefix!r} is not a whole number of tiles of {tile}; "
                    "choose a tile that divides every window"
                )
    return tile_us


def window_start(t_us: int, window_us: int, tile_us: int) -> int:
    """The first event time (µs, inclusive) in window ``window_us`` at time ``t_us``."""
    return (t_us // tile_us) * tile_us + tile_us - window_us


def reference_values(
    events: Iterable[Mapping[str, Any]], t_us: int, outs: Sequence[Output], tile_us: int
) -> dict[str, float | int | None]:
    """The values at ``t_us`` from one entity's events (dicts with ``event_timestamp`` and
    ``created_timestamp`` in µs and the event columns), by the definition above: plain
    Python, for tests and as the specification the engines are checked against."""
    rows = list(events)
    values: dict[str, float | int | None] = {}
    for o in outs:
        start = window_start(t_us, o.window_us, tile_us)
        inside = [
            r
            for r in rows
            if start <= r["event_timestamp"] <= t_us
            and (o.bucket is None or r.get(o.bucket_column) == o.bucket)
        ]
        if o.column:
            inside = [r for r in inside if _present(r.get(o.column))]
        xs = [float(r[o.column]) for r in inside] if o.column else []
        if o.function == "count":
            values[o.name] = len(inside)
        elif o.function == "sum":
            values[o.name] = float(math.fsum(xs)) if xs else 0.0
        elif o.function == "mean":
            values[o.name] = math.fsum(xs) / len(xs) if xs else None
        elif o.function == "min":
            values[o.name] = min(xs) if xs else None
        elif o.function == "max":
            values[o.name] = max(xs) if xs else None
        elif o.function == "last":
            if inside:
                latest = max(inside, key=lambda r: (r["event_timestamp"], r["created_timestamp"]))
                values[o.name] = float(latest[o.column])
            else:
                values[o.name] = None
        else:  # count_distinct
            values[o.name] = len(set(xs))
    return values


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
