# mypy: disable-error-code="import-untyped"
"""The offline store: one Parquet dataset per feature-group version, partitioned by date.

Layout: ``{root}/{group}/v{version}/date=YYYY-MM-DD/part-*.parquet`` with columns
``entity_id, event_timestamp, created_timestamp, <features>`` (timestamps in µs, UTC); an
aggregated group stores its raw events there instead, ``<features>`` being its event columns
(:func:`group_schema`).
``root`` is a local folder or any fsspec URL (``s3://bucket/prefix``, ``memory://x``). Appends
only add files, so a reader never sees a half-written dataset; ``compact`` merges a date's
files into one.

:class:`OfflineStore` is the interface an offline engine implements (the writes, reads and
queries the feature service, materialization and the point-in-time join run); the built-in
engine is :class:`DuckDBOfflineStore`, and ``offline_engine`` in the settings picks another by
name (:data:`OFFLINE_ENGINES`) or class path. Every engine keeps this layout and the same
rules: :meth:`OfflineStore.prepare`'s validation and write times, the latest row of an entity
is the greatest (event_timestamp, created_timestamp), and the point-in-time/TTL rule of
:mod:`carrara.feature_cache.pit_join`.
"""

from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from carrara.errors import InvalidArgumentError
from carrara.feature_cache.catalog import RegisteredGroup
from carrara.plugins import StoreKind
from carrara.storage import publish_file, refresh

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from carrara.config import Settings

__all__ = [
    "OFFLINE_ENGINES",
    "AsOfJoin",
    "CompactionResult",
    "DuckDBOfflineStore",
    "LatestRows",
    "OfflineStore",
    "duckdb_cursor",
    "group_schema",
    "open_offline_store",
    "stored_columns",
    "to_arrow",
]

_duckdb_lock = threading.Lock()
_duckdb_db: duckdb.DuckDBPyConnection | None = None


def duckdb_cursor() -> duckdb.DuckDBPyConnection:
    """A fresh connection (cursor) to the process's shared in-memory DuckDB: opening a new
    database costs ~20 ms, a cursor almost nothing. Close it after use; temp views and
    registered tables vanish with it."""
    import duckdb

    global _duckdb_db
    with _duckdb_lock:
        if _duckdb_db is None:
            _duckdb_db = duckdb.connect()
            _duckdb_db.execute("SET enable_progress_bar = false")  # a library draws no bars
        cur = _duckdb_db.cursor()
    cur.execute("SET enable_progress_bar = false")
    return cur


def to_arrow(data: Any) -> pa.Table:
    """An Arrow table from pandas, Polars or Arrow input."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    module = type(data).__module__
    if module.startswith("polars"):
        table: pa.Table = data.to_arrow()
        return table
    if module.startswith("pandas"):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise InvalidArgumentError(
        f"expected a pandas or Polars DataFrame or a pyarrow Table, got {type(data).__name__}"
    )


def timestamp_column(table: pa.Table, name: str, what: str) -> pa.ChunkedArray:
    """Column ``name`` as timestamp[us, UTC]: datetimes (naive ones are taken as UTC) or
    integers in microseconds since the epoch."""
    import pyarrow as pa

    if name not in table.column_names:
        raise InvalidArgumentError(
            f"{what} has no column {name!r}; columns: {', '.join(table.column_names)}"
        )
    col = table.column(name)
    target = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(col.type):
        if col.type.tz is None:
            col = col.cast(pa.timestamp(col.type.unit, tz="UTC"))
        return col.cast(target)
    if pa.types.is_integer(col.type):
        return col.cast(pa.int64()).cast(target)
    if pa.types.is_date(col.type):
        return col.cast(pa.timestamp("us")).cast(target)
    raise InvalidArgumentError(
        f"{what} column {name!r} has type {col.type}; use datetimes or integer microseconds"
    )


def arrow_type(dtype: str) -> pa.DataType:
    import pyarrow as pa

    return {
        "float32": pa.float32(),
        "float64": pa.float64(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
        "string": pa.string(),
    }[dtype]


def stored_columns(group: RegisteredGroup) -> dict[str, str]:
    """The value columns the group's dataset stores after the three key columns, with their
    dtypes: the features of a row group, the event columns of an aggregated group (value
    columns ``"float64"``, bucket columns ``"string"``)."""
    d = group.definition
    if d.is_aggregated:
        return d.event_columns
    return {f.name: f.dtype for f in d.features}


def group_schema(group: RegisteredGroup) -> pa.Schema:
    """The Arrow schema of the group version's dataset: ``entity_id``, ``event_timestamp``,
    ``created_timestamp``, then :func:`stored_columns`."""
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    fields = [
        pa.field("entity_id", pa.string()),
        pa.field("event_timestamp", ts),
        pa.field("created_timestamp", ts),
    ]
    fields += [pa.field(n, arrow_type(t)) for n, t in stored_columns(group).items()]
    return pa.schema(fields)


_created_lock = threading.Lock()
_last_created_us = 0


def _allocate_created(n: int, start_us: int | None) -> int:
    """First of ``n`` distinct, increasing write times (µs) for the rows of one append, so a
    later row (in this process) always wins a tie on event time: rows of one append are
    ordered by position, and successive appends follow each other."""
    global _last_created_us
    with _created_lock:
        base = max(
            start_us if start_us is not None else time.time_ns() // 1000, _last_created_us + 1
        )
        _last_created_us = base + max(n, 1) - 1
    return base


class CompactionResult(msgspec.Struct, frozen=True):
    partitions: int
    files_before: int
    files_after: int
    rows: int


class AsOfJoin(msgspec.Struct, frozen=True):
    """One group version's part of a point-in-time join: ``features`` of ``group`` for the
    label rows whose entity id (string) is in the labels' column ``key``, read from ``files``
    (the snapshot the join records)."""

    group: RegisteredGroup
    features: tuple[str, ...]
    key: str
    files: tuple[str, ...]


class LatestRows(msgspec.Struct, frozen=True):
    """The latest row of each entity touched since a watermark (see
    :meth:`OfflineStore.latest_rows`)."""

    table: Any  # pyarrow.Table: entity_id, event_timestamp, created_timestamp (µs), features
    max_created_us: int | None  # the greatest write time in the dataset (None: no rows)


class PartitionWrite(msgspec.Struct, frozen=True):
    """What an engine that writes the online store from its workers did (see
    :meth:`OfflineStore.write_online`)."""

    entities: int  # entities looked at (touched since the watermark; aggregated: all)
    written: int  # online values written
    expired: int  # entities whose latest row was already past the TTL
    newest_event_us: int | None  # newest event time among the rows looked at
    max_created_us: int | None  # the dataset's greatest write time (the next watermark)


class OfflineStore(ABC):
    """Parquet datasets of feature rows under one root (local folder or fsspec URL), and the
    queries the parts run on them: the interface every offline engine implements."""

    root: str

    @classmethod
    @abstractmethod
    def from_url(cls, root: str) -> OfflineStore:
        """The store over ``root`` (a local folder or an fsspec URL such as ``s3://b/p``)."""

    @abstractmethod
    def files(self, group: str, version: int) -> list[str]:
        """The dataset's Parquet files, sorted (what a training set's snapshot records)."""

    # -- writing ----------------------------------------------------------------------------

    def prepare(
        self, group: RegisteredGroup, data: Any, *, created_us: int | None = None
    ) -> pa.Table:
        """Validate and cast rows to the group version's schema (:func:`group_schema`: an
        aggregated group's rows are its events, their event columns required, NaN values
        stored as null). Other columns are dropped. Without a ``created_timestamp`` column the
        rows get increasing write times from now (see :func:`_allocate_created`)."""
        import pyarrow as pa

        table = to_arrow(data)
        what = f"rows for feature group {group.name!r}"
        key = group.entity.key
        if "entity_id" not in table.column_names and key in table.column_names:
            # The entity's join key is accepted as the id column (like ``ingest``).
            table = table.rename_columns(
                ["entity_id" if c == key else c for c in table.column_names]
            )
        if "entity_id" not in table.column_names:
            raise InvalidArgumentError(
                f"{what} have no {key!r} (join key) or 'entity_id' column; columns: "
                + ", ".join(table.column_names)
            )
        stored = stored_columns(group)
        missing = [c for c in stored if c not in table.column_names]
        if missing and group.definition.is_aggregated:
            raise InvalidArgumentError(
                f"{what} lack event column(s) {', '.join(missing)}; the events of aggregated "
                f"group v{group.version} have: {', '.join(stored)}"
            )
        if missing:
            raise InvalidArgumentError(
                f"{what} lack feature column(s) {', '.join(missing)}; "
                f"group v{group.version} has: {', '.join(group.definition.feature_names)}"
            )
        n = table.num_rows
        if "created_timestamp" in table.column_names:
            created = timestamp_column(table, "created_timestamp", what)
        else:
            import numpy as np

            base = _allocate_created(n, created_us)
            created = pa.chunked_array(
                [
                    pa.array(np.arange(base, base + n, dtype=np.int64)).cast(
                        pa.timestamp("us", tz="UTC")
                    )
                ]
            )
        columns = [
            table.column("entity_id").cast(pa.string()),
            timestamp_column(table, "event_timestamp", what),
            created,
        ]
        for name, dtype in stored.items():
            try:
                col = table.column(name).cast(arrow_type(dtype))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InvalidArgumentError(
                    f"{what}: column {name!r} cannot be read as {dtype}: {exc}"
                ) from exc
            if group.definition.is_aggregated and dtype == "float64":
                # NaN is a missing value (the aggregations skip it): stored as null, so every
                # engine sees one kind of missing.
                import pyarrow.compute as pc

                col = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col)
            columns.append(col)
        if columns[0].null_count:
            raise InvalidArgumentError(f"{what}: entity_id has {columns[0].null_count} nulls")
        if columns[1].null_count:
            raise InvalidArgumentError(f"{what}: event_timestamp has nulls")
        return pa.Table.from_arrays(columns, schema=group_schema(group))

    @abstractmethod
    def append(self, group: RegisteredGroup, data: Any, *, created_us: int | None = None) -> int:
        """Append rows (validated by :meth:`prepare`) to the group version's dataset, one new
        file per event date, never changing existing files; returns the rows written."""

    @abstractmethod
    def compact(self, group: RegisteredGroup) -> CompactionResult:
        """Merge each date partition's files into one, dropping exact duplicate rows; readers
        must see every row throughout (at worst twice)."""

    # -- reading ----------------------------------------------------------------------------

    @abstractmethod
    def read(self, group: RegisteredGroup, files: list[str] | None = None) -> pa.Table:
        """The whole dataset (or ``files`` of it) as one Arrow table with the group version's
        schema (empty if there are no files)."""

    @abstractmethod
    def latest_rows(
        self, group: RegisteredGroup, *, created_after_us: int = 0, files: list[str] | None = None
    ) -> LatestRows:
        """For each entity with a row written after ``created_after_us``, its latest row over
        all its rows (greatest event time, then write time; timestamps as µs integers; the
        columns of :func:`stored_columns`, an aggregated group's event columns), so
        late-arriving rows are handled; plus the dataset's greatest write time."""

    @abstractmethod
    def as_of_join(
        self, labels: pa.Table, joins: Sequence[AsOfJoin], *, threads: int | None = None
    ) -> pa.Table:
        """The point-in-time join's engine part. ``labels`` has the caller's columns plus
        ``__row`` (position), ``__ts`` (label time, µs) and the joins' key columns; for each
        label row and join, the group's row with the greatest (event_timestamp,
        created_timestamp) whose event time is <= ``__ts``, its features null when there is
        none or it is older than ``__ts`` - TTL. For an aggregated group, the windowed
        aggregates of the entity's events at ``__ts`` instead (the semantics of
        :mod:`carrara.feature_cache.aggregations`; int64 for count and count_distinct, float64
        otherwise). Returns the caller's columns (those not starting with ``__``) then
        ``{group}__{feature}`` per join, in ``__row`` order."""

    def source(
        self,
        con: duckdb.DuckDBPyConnection,
        group: RegisteredGroup,
        name: str,
        files: list[str] | None = None,
    ) -> str:
        """A DuckDB table expression over the dataset (or ``files`` of it), for callers that
        query it with DuckDB; by default the engine's :meth:`read` registered as ``name``."""
        con.register(name, self.read(group, files))
        return name

    def __enter__(self) -> OfflineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_online(
        self,
        group: RegisteredGroup,
        online_url: str,
        *,
        namespace: str | None,
        created_after_us: int,
        files: list[str],
        now_us: int,
        chunk: int,
    ) -> PartitionWrite | None:
        """Batch materialization by the engine's own workers (Spark: each executor writes its
        partitions to ``online_url``); ``None`` (the default) lets the caller write the rows
        :meth:`latest_rows` gives, from this process."""
        return None

    def configure(self, settings: Settings) -> None:  # noqa: B027 - optional
        """Take the engine's own settings (Spark: ``spark_master``) before the first query;
        ``FeatureService.from_settings`` and ``Platform.open`` call it. The default engine
        needs none."""

    def close(self) -> None:  # noqa: B027 - optional: most engines hold nothing to release
        """Release engine resources (a Spark session, say); the built-in engine has none."""


class DuckDBOfflineStore(OfflineStore):
    """The built-in engine: files through fsspec and pyarrow, queries in the process's DuckDB
    (local files are scanned in place)."""

    def __init__(self, root: str) -> None:
        import fsspec

        self.root = root
        self._fs, self._base = fsspec.core.url_to_fs(root)
        self._local = "file" in (
            self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        )

    @classmethod
    def from_url(cls, root: str) -> DuckDBOfflineStore:
        return cls(root)

    def dataset_path(self, group: str, version: int) -> str:
        return f"{self._base.rstrip('/')}/{group}/v{version}"

    def files(self, group: str, version: int) -> list[str]:
        base = self.dataset_path(group, version)
        if not self._local:
            refresh(self._fs, base)  # files other processes appended since the last listing
        pattern = f"{base}/date=*/*.parquet"
        return sorted(str(p) for p in self._fs.glob(pattern))

    # -- writing ----------------------------------------------------------------------------

    def append(self, group: RegisteredGroup, data: Any, *, created_us: int | None = None) -> int:
        """Append rows to the group version's dataset (one new file per event date); returns
        the number of rows written."""
        import datetime as dt

        import numpy as np
        import pyarrow as pa

        if not group.definition.offline:
            raise InvalidArgumentError(
                f"feature group {group.name!r} has offline=False; enable it to append rows"
            )
        table = self.prepare(group, data, created_us=created_us)
        if table.num_rows == 0:
            return 0
        micros = table.column("event_timestamp").cast(pa.int64()).to_numpy()
        if micros.size > 1 and bool((micros[1:] < micros[:-1]).any()):
            # Sorted by time, each date's rows are one contiguous slice (and files hold large
            # row groups whose time ranges let readers skip them).
            order = np.argsort(micros, kind="stable")
            table = table.take(pa.array(order))
            micros = micros[order]
        days = micros // 86_400_000_000
        starts = [0, *(np.flatnonzero(days[1:] != days[:-1]) + 1).tolist()]
        ends = [*starts[1:], table.num_rows]
        base = self.dataset_path(group.name, group.version)
        stem = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        epoch = dt.date(1970, 1, 1)
        for start, end in zip(starts, ends, strict=True):
            day = epoch + dt.timedelta(days=int(days[start]))
            directory = f"{base}/date={day.isoformat()}"
            self._fs.makedirs(directory, exist_ok=True)
            self._write_file(table.slice(start, end - start), f"{directory}/{stem}.parquet")
        rows: int = table.num_rows
        return rows

    def _write_file(self, table: pa.Table, path: str) -> None:
        """Write one Parquet file so that readers never see it half written: locally under a
        temporary name then renamed (atomic); elsewhere written to a local temporary file and
        uploaded whole (:func:`carrara.storage.publish_file`: one PUT or a completed multipart
        upload), since a streamed write that fails midway would publish a partial object."""
        import tempfile

        import pyarrow.parquet as pq

        if self._local:
            target = f"{path}.tmp"
            pq.write_table(table, target, filesystem=self._fs, row_group_size=1 << 20)
            self._fs.mv(target, path)
            return
        with tempfile.TemporaryDirectory(prefix="carrara-offline-") as tmp:
            local = f"{tmp}/part.parquet"
            pq.write_table(table, local, row_group_size=1 << 20)
            publish_file(self._fs, local, path)

    # -- reading ----------------------------------------------------------------------------

    def source(
        self,
        con: duckdb.DuckDBPyConnection,
        group: RegisteredGroup,
        name: str,
        files: list[str] | None = None,
    ) -> str:
        """A DuckDB table expression over the dataset, or over ``files`` of it (local files
        are scanned in place; remote ones are read through fsspec into Arrow first)."""
        if files is None:
            files = self.files(group.name, group.version)
        if files and self._local:
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            return f"read_parquet([{listing}], hive_partitioning = false)"
        con.register(name, self.read(group, files))
        return name

    def read(self, group: RegisteredGroup, files: list[str] | None = None) -> pa.Table:
        """The whole dataset (or ``files`` of it) as one Arrow table (empty with the right
        schema if there are no files)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = group_schema(group)
        if files is None:
            files = self.files(group.name, group.version)
        if not files:
            return schema.empty_table()
        tables = [pq.read_table(f, filesystem=self._fs, schema=schema) for f in files]
        return pa.concat_tables(tables)

    def latest_rows(
        self, group: RegisteredGroup, *, created_after_us: int = 0, files: list[str] | None = None
    ) -> LatestRows:
        if files is None:
            files = self.files(group.name, group.version)
        if not files:
            return LatestRows(group_schema(group).empty_table(), None)
        cols = ", ".join('"' + f.replace('"', '""') + '"' for f in stored_columns(group))
        con = duckdb_cursor()
        try:
            src = self.source(con, group, "__src", files)
            high = con.sql(f"SELECT max(epoch_us(created_timestamp)) FROM {src}").fetchall()
            latest = con.sql(
                f"WITH src AS (SELECT * FROM {src}),"
                f" touched AS (SELECT DISTINCT entity_id FROM src"
                f"   WHERE epoch_us(created_timestamp) > {int(created_after_us)})"
                f" SELECT entity_id, epoch_us(event_timestamp) AS event_timestamp,"
                f"   epoch_us(created_timestamp) AS created_timestamp, {cols}"
                f" FROM src SEMI JOIN touched USING (entity_id)"
                " QUALIFY row_number() OVER (PARTITION BY entity_id"
                "   ORDER BY event_timestamp DESC, created_timestamp DESC) = 1"
            ).to_arrow_table()
        finally:
            con.close()
        top = high[0][0]
        return LatestRows(latest, None if top is None else int(top))

    def as_of_join(
        self, labels: pa.Table, joins: Sequence[AsOfJoin], *, threads: int | None = None
    ) -> pa.Table:
        from carrara.feature_cache.pit_join import duckdb_as_of_join

        return duckdb_as_of_join(self, labels, joins, threads=threads)

    def iter_partitions(self, group: str, version: int) -> Iterator[tuple[str, list[str]]]:
        by_dir: dict[str, list[str]] = {}
        for f in self.files(group, version):
            by_dir.setdefault(f.rsplit("/", 1)[0], []).append(f)
        yield from sorted(by_dir.items())

    # -- maintenance ------------------------------------------------------------------------

    def compact(self, group: RegisteredGroup) -> CompactionResult:
        """Merge each date partition's files into one, sorted by entity and time, dropping
        exact duplicate rows (a re-run append; distinct events of an aggregated group differ
        at least in their write time, so only replays collapse). The new file is written
        before the old ones are removed, so a concurrent reader sees every row (at worst
        twice, which point-in-time reads tolerate: duplicates carry equal values, and the
        aggregations count an exact duplicate event once)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = group_schema(group)
        partitions = before = after = rows = 0
        for directory, files in self.iter_partitions(group.name, group.version):
            partitions += 1
            before += len(files)
            if len(files) == 1:
                after += 1
                rows += pq.ParquetFile(files[0], filesystem=self._fs).metadata.num_rows
                continue
            table = pa.concat_tables(
                [pq.read_table(f, filesystem=self._fs, schema=schema) for f in files]
            )
            table = table.group_by(table.column_names, use_threads=False).aggregate([])
            table = table.select(schema.names).sort_by(
                [
                    ("entity_id", "ascending"),
                    ("event_timestamp", "ascending"),
                    ("created_timestamp", "ascending"),
                ]
            )
            target = f"{directory}/part-{time.time_ns()}-{uuid.uuid4().hex[:8]}-c.parquet"
            self._write_file(table, target)
            for f in files:
                self._fs.rm(f)
            after += 1
            rows += table.num_rows
        return CompactionResult(partitions, before, after, rows)


#: Offline engines by name (``offline_engine`` in the settings); any other is a class path.
OFFLINE_ENGINES: StoreKind[OfflineStore] = StoreKind(
    "offline store", OfflineStore, examples='offline_engine = "duckdb"', key="engine"
)
OFFLINE_ENGINES.register("duckdb", DuckDBOfflineStore.from_url)
OFFLINE_ENGINES.register("spark", "carrara.feature_cache.spark_store:SparkOfflineStore")


def open_offline_store(root: str, engine: str = "duckdb") -> OfflineStore:
    """The offline store over ``root`` on ``engine``: a registered name (``duckdb``) or the
    class path of an :class:`OfflineStore` subclass (built by its ``from_url``)."""
    return OFFLINE_ENGINES.resolve(engine)(root)
