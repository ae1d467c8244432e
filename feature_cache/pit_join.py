# mypy: disable-error-code="import-untyped"
"""Point-in-time-correct training sets: the checks and snapshot here, the join in the offline
engine (:meth:`OfflineStore.as_of_join`; DuckDB's ``ASOF JOIN`` for the built-in one).

For each label row (entity id, label timestamp) and each requested group, take the group's
feature row with the greatest ``event_timestamp <= label timestamp`` (ties: greatest
``created_timestamp``), and only if ``event_timestamp >= label timestamp - TTL``; otherwise the
features are null. Nothing with a later event time can reach a label row. For an aggregated
group, the windowed aggregates of the entity's events at the label time instead
(:mod:`carrara.feature_cache.aggregations`; a range join in DuckDB), which can mix with row
groups in one training set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.feature_cache.aggregations import INTEGER_FUNCTIONS, ZERO_WHEN_EMPTY, window_start
from carrara.feature_cache.catalog import RegisteredGroup
from carrara.feature_cache.offline_store import (
    AsOfJoin,
    OfflineStore,
    duckdb_cursor,
    timestamp_column,
    to_arrow,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "FeatureRequest",
    "TrainingSet",
    "duckdb_as_of_join",
    "parse_feature_refs",
    "point_in_time_join",
]


class FeatureRequest(msgspec.Struct, frozen=True):
    """Features of one group version to join, and the entity-dataframe column that holds
    the group's entity id."""

    group: RegisteredGroup
    features: tuple[str, ...]
    entity_column: str


class TrainingSet(msgspec.Struct, frozen=True):
    """A point-in-time-correct table and the reference of the inputs it was built from."""

    table: Any  # pyarrow.Table: the entity dataframe's columns, then "{group}__{feature}"
    snapshot_ref: str
    spec: dict[str, Any]

    def to_pandas(self) -> pd.DataFrame:
        frame: pd.DataFrame = self.table.to_pandas()
        return frame

    def to_arrow(self) -> pa.Table:
        table: pa.Table = self.table
        return table


def parse_feature_refs(refs: Sequence[str]) -> dict[str, list[str]]:
    """``["trips:fare_mean", "trips:*"]`` -> ``{"trips": ["fare_mean", "*"]}``: per group, in
    order, without repeats (``"*"`` stands for every feature; the caller expands it)."""
    out: dict[str, list[str]] = {}
    for ref in refs:
        group, sep, feature = ref.partition(":")
        if not sep or not group or not feature:
            raise InvalidArgumentError(
                f"feature reference {ref!r} is not 'group:feature' (or 'group:*')"
            )
        names = out.setdefault(group, [])
        if feature not in names:
            names.append(feature)
    return out


#: Integer label times are microseconds since the epoch; values outside [1e14, 1e17) (1973-03
#: to 5138) are refused as almost surely another unit (the usual mistake: epoch seconds,
#: which would read as minutes after 1970-01-01 and find no features at all).
_MIN_INT_US = 10**14
_MAX_INT_US = 10**17


def _refuse_odd_integer_times(labels: pa.Table, name: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in labels.column_names:
        return  # timestamp_column explains
    col = labels.column(name)
    if not pa.types.is_integer(col.type) or col.length() == col.null_count:
        return
    bounds = pc.min_max(col).as_py()
    low, high = int(bounds["min"]), int(bounds["max"])
    if low >= _MIN_INT_US and high < _MAX_INT_US:
        return
    if high >= _MAX_INT_US:
        odd, unit, word = high, "ns", "nanoseconds"
    elif abs(low) < 10**11:
        odd, unit, word = low, "s", "seconds"
    else:
        odd, unit, word = low, "ms", "milliseconds"
    raise InvalidArgumentError(
        f"entity dataframe column {name!r} holds integers ({low} .. {high}); integer times are "
        f"read as microseconds since the epoch, and {odd} does not look like one (it looks like "
        f"epoch {word}). Convert the column to datetimes first, e.g. "
        f'labels["{name}"] = pd.to_datetime(labels["{name}"], unit="{unit}", utc=True)'
    )


#: 2**64: packs (event time, write time) into one HUGEINT that orders like the pair (a shift
#: would refuse the negative times before 1970).
_SHIFT = 1 << 64


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fingerprint_table(table: pa.Table) -> str:
    import pyarrow as pa

    h = hashlib.blake2b(digest_size=16)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(memoryview(sink.getvalue()))
    return h.hexdigest()


def point_in_time_join(
    entity_df: Any,
    requests: Sequence[FeatureRequest],
    offline: OfflineStore,
    *,
    timestamp_column_name: str = "event_timestamp",
    threads: int | None = None,
) -> TrainingSet:
    """Join ``requests`` onto ``entity_df`` (pandas, Polars or Arrow; one row per label)
    point-in-time correctly. Output rows keep the input order."""
    import pyarrow as pa

    labels = to_arrow(entity_df)
    if not requests:
        raise InvalidArgumentError("no features requested")
    _refuse_odd_integer_times(labels, timestamp_column_name)
    label_ts = timestamp_column(labels, timestamp_column_name, "the entity dataframe")
    reserved = [c for c in labels.column_names if c.startswith("__")]
    if reserved:
        raise InvalidArgumentError(
            f"entity dataframe columns may not start with '__' (reserved): {', '.join(reserved)}"
        )
    outputs = [f"{r.group.name}__{f}" for r in requests for f in r.features]
    clash = sorted(set(outputs) & set(labels.column_names)) or sorted(
        {o for o in outputs if outputs.count(o) > 1}
    )
    if clash:
        raise InvalidArgumentError(
            f"output column(s) {', '.join(clash)} would appear twice: rename the entity "
            "dataframe's column or request each feature once"
        )
    work = labels
    key_columns: dict[str, str] = {}
    for r in requests:
        if r.entity_column not in labels.column_names:
            raise InvalidArgumentError(
                f"feature group {r.group.name!r} is keyed by entity {r.group.entity.name!r}: the "
                f"entity dataframe needs a column {r.entity_column!r}; it has "
                + ", ".join(labels.column_names)
            )
        if r.entity_column not in key_columns:
            alias = f"__k{len(key_columns)}"
            key_columns[r.entity_column] = alias
            work = work.append_column(alias, labels.column(r.entity_column).cast(pa.string()))
        known = r.group.definition.feature_names
        for f in r.features:
            if f not in known:
                raise NotFoundError(
                    f"feature group {r.group.name!r} has no feature {f!r}; known: "
                    + ", ".join(known)
                )
    import numpy as np

    work = work.append_column("__row", pa.array(np.arange(labels.num_rows, dtype=np.int64)))
    work = work.append_column("__ts", label_ts.cast(pa.int64()))
    files: dict[str, list[str]] = {}
    joins = []
    for r in requests:
        g = r.group
        group_files = offline.files(g.name, g.version)
        files[f"{g.name}:v{g.version}"] = group_files
        joins.append(AsOfJoin(g, r.features, key_columns[r.entity_column], tuple(group_files)))
    table = offline.as_of_join(work, joins, threads=threads)
    spec: dict[str, Any] = {
        "entity_df": _fingerprint_table(labels),
        "timestamp_column": timestamp_column_name,
        "groups": [
            {
                "group": r.group.name,
                "version": r.group.version,
                "fingerprint": r.group.fingerprint,
                "features": list(r.features),
                "entity_column": r.entity_column,
                "ttl_days": r.group.definition.ttl_days,
            }
            for r in requests
        ],
        "files": files,
    }
    ref = "ds-" + hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:24]
    return TrainingSet(table, ref, spec)


def duckdb_as_of_join(
    offline: OfflineStore,
    labels: pa.Table,
    joins: Sequence[AsOfJoin],
    *,
    threads: int | None = None,
) -> pa.Table:
    """:meth:`OfflineStore.as_of_join` in DuckDB (the built-in engine; ``offline.source``
    gives each group's rows)."""
    import duckdb

    if threads:
        con = duckdb.connect(config={"threads": threads})
        con.execute("SET enable_progress_bar = false")
    else:
        con = duckdb_cursor()
    try:
        con.register("__labels", labels)
        # Feature rows outside [first label - TTL, last label] can never be picked.
        min_ts, max_ts = con.sql("SELECT min(__ts), max(__ts) FROM __labels").fetchall()[0]
        con.execute(
            "CREATE TEMP VIEW labels AS SELECT *,"
            f" __ts::HUGEINT * {_SHIFT}::HUGEINT + 9223372036854775807 AS __k FROM __labels"
        )
        ctes: list[str] = []
        selects = [f"l.{_quote(c)}" for c in labels.column_names if not c.startswith("__")]
        sql_joins: list[str] = []
        for i, j in enumerate(joins):
            g = j.group
            source = offline.source(con, g, f"__src{i}", list(j.files))
            if g.definition.is_aggregated:
                cte, join, columns = _aggregated_join(i, j, source, min_ts, max_ts)
                ctes += cte
                sql_joins.append(join)
                selects += columns
                continue
            cols = ", ".join(_quote(f) for f in j.features)
            # Ties on event time go to the latest write: the ASOF key is the pair
            # (event_timestamp, created_timestamp) packed into one HUGEINT, ordered
            # lexicographically; a label's key is (its time, max int64). Cheaper than
            # deduplicating with a window over the whole group.
            bounds = (
                f" WHERE event_timestamp <= make_timestamptz({max_ts})"
                if max_ts is not None
                else ""
            )
            if max_ts is not None and g.definition.ttl_us:
                bounds += (
                    f" AND event_timestamp >= make_timestamptz({min_ts - g.definition.ttl_us})"
                )
            ctes.append(
                f"g{i} AS (SELECT entity_id, epoch_us(event_timestamp) AS ts,"
                f" epoch_us(event_timestamp)::HUGEINT * {_SHIFT}::HUGEINT"
                " + epoch_us(created_timestamp) AS k,"
                f" {cols} FROM {source}{bounds})"
            )
            sql_joins.append(
                f"ASOF LEFT JOIN g{i} ON l.{_quote(j.key)} = g{i}.entity_id AND l.__k >= g{i}.k"
            )
            ttl = g.definition.ttl_us
            for f in j.features:
                value = f"g{i}.{_quote(f)}"
                if ttl:
                    value = f"CASE WHEN g{i}.ts >= l.__ts - {ttl} THEN {value} END"
                selects.append(f"{value} AS {_quote(f'{g.name}__{f}')}")
        sql = (
            "WITH "
            + ", ".join(ctes)
            + " SELECT "
            + ", ".join(selects)
            + " FROM labels l "
            + " ".join(sql_joins)
            + " ORDER BY l.__row"
        )
        table: pa.Table = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    return table


def _aggregated_join(
    i: int, j: AsOfJoin, source: str, min_ts: int | None, max_ts: int | None
) -> tuple[list[str], str, list[str]]:
    """The CTEs, the join onto ``labels l`` and the output columns of one aggregated group's
    part of the join: the windowed aggregates (:mod:`carrara.feature_cache.aggregations`) of
    the entity's events at each distinct (entity, label time).

    One range join of the label points with the events in [earliest window start, label
    time], grouped by label point, one aggregate per output with a FILTER for its window (and
    bucket). Exact duplicate events (a replayed write) count once."""
    g = j.group
    d = g.definition
    tile = d.tile_us
    by_name = {o.name: o for o in d.outputs}
    wanted = [by_name[f] for f in j.features]
    widest = max(o.window_us for o in wanted)
    cols = ", ".join(_quote(c) for c in d.event_columns)
    bounds = []
    if max_ts is not None and min_ts is not None:
        bounds.append(f"event_timestamp <= make_timestamptz({int(max_ts)})")
        low = window_start(int(min_ts), widest, tile)
        bounds.append(f"event_timestamp >= make_timestamptz({low})")
    where = f" WHERE {' AND '.join(bounds)}" if bounds else ""
    key = _quote(j.key)
    events = (
        f"e{i} AS (SELECT DISTINCT entity_id, epoch_us(event_timestamp) AS ts,"
        f" epoch_us(created_timestamp) AS cts, {cols} FROM {source}{where})"
    )
    # The start of the tile holding the label time (a floor that also holds before 1970).
    points = (
        f"q{i} AS (SELECT DISTINCT l.{key} AS __e, l.__ts,"
        f" l.__ts - (((l.__ts % {tile}) + {tile}) % {tile}) AS __t0 FROM labels l"
        f" WHERE l.{key} IS NOT NULL AND l.__ts IS NOT NULL)"
    )
    aggs = []
    for o in wanted:
        cond = [f"e.ts >= q.__t0 + {tile - o.window_us}"]
        if o.bucket is not None:
            bucket = "'" + o.bucket.replace("'", "''") + "'"
            cond.append(f"e.{_quote(o.bucket_column)} = {bucket}")
        x = f"e.{_quote(o.column)}" if o.column else "e.ts"
        if o.column:
            cond.append(f"{x} IS NOT NULL")
        flt = f" FILTER (WHERE {' AND '.join(cond)})"
        if o.function == "count":
            expr = f"count({x}){flt}"
        elif o.function == "sum":
            expr = f"fsum({x}){flt}"
        elif o.function == "mean":
            expr = f"fsum({x}){flt} / nullif(count({x}){flt}, 0)"
        elif o.function in ("min", "max"):
            expr = f"{o.function}({x}){flt}"
        elif o.function == "last":
            # The latest event: greatest (event time, write time), packed as in the ASOF key.
            expr = f"arg_max({x}, e.ts::HUGEINT * {_SHIFT}::HUGEINT + e.cts){flt}"
        else:  # count_distinct
            expr = f"count(DISTINCT {x}){flt}"
        aggs.append(f"{expr} AS {_quote(o.name)}")
    windowed = (
        f"a{i} AS (SELECT q.__e, q.__ts, {', '.join(aggs)} FROM q{i} q"
        f" LEFT JOIN e{i} e ON e.entity_id = q.__e AND e.ts <= q.__ts"
        f" AND e.ts >= q.__t0 + {tile - widest}"
        " GROUP BY q.__e, q.__ts)"
    )
    join = f"LEFT JOIN a{i} ON a{i}.__e = l.{key} AND a{i}.__ts = l.__ts"
    columns = []
    for o in wanted:
        value = f"a{i}.{_quote(o.name)}"
        if o.function in ZERO_WHEN_EMPTY:  # no events in the window (or none at all): 0
            value = f"coalesce({value}, 0)"
        sql_type = "BIGINT" if o.function in INTEGER_FUNCTIONS else "DOUBLE"
        columns.append(f"({value})::{sql_type} AS {_quote(f'{g.name}__{o.name}')}")
    return [events, points, windowed], join, columns
