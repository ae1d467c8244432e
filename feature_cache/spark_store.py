# mypy: disable-error-code="import-untyped"
"""Apache Spark as the offline engine (``offline_engine = "spark"``), for features at scale.

The files are the built-in engine's (:class:`DuckDBOfflineStore` writes them: same layout,
same validation and write times); the queries run on Spark: the point-in-time join for row
groups (the latest row at or before each label time, ties to the latest write, null past the
TTL), the windowed aggregations of aggregated groups (:mod:`carrara.feature_cache.aggregations`
semantics), the latest rows for materialization, and writes from the executors
(:meth:`SparkOfflineStore.materialize_partitions`, :meth:`SparkOfflineStore.append` of a Spark
DataFrame, :func:`transform_with_spark`).

One SparkSession per process (:func:`spark_session`): created on first use from
``spark_master`` (``local[2]`` by default, or a cluster URL such as ``spark://host:7077``),
with Arrow transfers and the UTC time zone, and stopped when the last store using it closes or
at exit. On a cluster the executors need ``carrara`` installed and the offline root readable
(a shared folder or ``s3://``/``gs://``/``hdfs://`` with the cluster's connectors).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from carrara.errors import (
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from carrara.feature_cache.aggregations import Output, window_start
from carrara.feature_cache.catalog import RegisteredGroup
from carrara.feature_cache.offline_store import (
    AsOfJoin,
    DuckDBOfflineStore,
    LatestRows,
    PartitionWrite,
    arrow_type,
    group_schema,
    stored_columns,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame, SparkSession

    from carrara.config import Settings
    from carrara.feature_cache.online_store import OnlineStore

__all__ = [
    "SparkOfflineStore",
    "hold_spark_session",
    "spark_session",
    "stop_spark_session",
    "transform_with_spark",
]

# -- the process's session ----------------------------------------------------------------------

_lock = threading.RLock()
_session: SparkSession | None = None
_users = 0  # open stores (and holders) using the shared session


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PySpark warns on every Arrow conversion that pandas 3 is not fully supported; the
    conversions Carrara makes go through Arrow only, so the warning says nothing useful."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*PySpark does not yet fully support pandas")
        yield


def spark_session(master: str = "local[2]") -> SparkSession:
    """The process's SparkSession, created on first use: ``master`` (``local[N]`` or a cluster
    URL), Arrow transfers on, UTC time zone; for ``local[N]`` also N shuffle partitions
    (Spark's 200 are for clusters) and 1 GB of driver memory unless ``SPARK_DRIVER_MEMORY``
    says otherwise. Later calls return the same session."""
    global _session
    with _lock:
        if _session is not None:
            return _session
        try:
            from pyspark.sql import SparkSession
        except ImportError as exc:
            raise FailedPreconditionError(
                "the Spark offline engine needs pyspark: pip install 'carrara[spark]'"
            ) from exc

        builder = (
            SparkSession.builder.master(master)
            .appName("carrara")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.execution.arrow.pyspark.fallback.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
        )
        if master.startswith("local"):
            cores = master[len("local[") : -1] if master.startswith("local[") else "1"
            partitions = str(max(1, int(cores))) if cores.isdigit() else "4"
            builder = (
                # Spark's own SPARK_DRIVER_MEMORY raises it (big local joins need several GB).
                builder.config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "1g"))
                .config("spark.sql.shuffle.partitions", partitions)
                .config("spark.default.parallelism", partitions)
                .config("spark.ui.enabled", "false")
                .config("spark.driver.host", "127.0.0.1")
                .config("spark.driver.bindAddress", "127.0.0.1")
            )
            # Local workers run this interpreter, so they import the same carrara (PySpark
            # reads the worker's Python from the environment, not from the session's conf).
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        try:
            with _quiet():
                session = builder.getOrCreate()
        except Exception as exc:  # PySparkRuntimeError (no Java), Py4J errors (bad master)
            raise UnavailableError(
                f"cannot start a Spark session on {master!r} (spark_master): {exc}. Spark "
                "needs a Java 17 runtime (openjdk-17-jre-headless) and, for a cluster URL, a "
                "reachable master"
            ) from exc
        session.sparkContext.setLogLevel("ERROR")
        _session = session
        return session


def stop_spark_session() -> None:
    """Stop the process's session (a later query starts a new one)."""
    global _session, _users
    with _lock:
        session, _session, _users = _session, None, 0
    if session is not None:
        session.stop()


atexit.register(stop_spark_session)


def _acquire(master: str) -> SparkSession:
    global _users
    with _lock:
        session = spark_session(master)
        _users += 1
        return session


def _release() -> None:
    global _users
    with _lock:
        _users -= 1
        last = _users <= 0
    if last:
        stop_spark_session()


@contextlib.contextmanager
def hold_spark_session(master: str = "local[2]") -> Iterator[SparkSession]:
    """Keep the process's session alive across stores (a test run, a notebook): stores that
    close meanwhile do not stop it."""
    session = _acquire(master)
    try:
        yield session
    finally:
        _release()


# -- the engine ---------------------------------------------------------------------------------

#: fsspec protocols Spark reads itself (with the cluster's connector) and their Spark schemes;
#: any other remote root (``memory://``...) is read through fsspec on the driver.
_SPARK_SCHEMES = {
    "s3": "s3a",
    "s3a": "s3a",
    "gs": "gs",
    "gcs": "gs",
    "hdfs": "hdfs",
    "abfs": "abfs",
    "abfss": "abfss",
}


class SparkOfflineStore(DuckDBOfflineStore):
    """The offline store with Spark queries (see the module docstring); files and writes are
    the built-in engine's."""

    def __init__(
        self, root: str, *, master: str = "local[2]", session: SparkSession | None = None
    ) -> None:
        super().__init__(root)
        self.master = master
        self._session = session  # a session given by the caller is never stopped here
        self._acquired = False
        self._connectors: set[str] = set()  # Hadoop schemes found on the classpath

    @classmethod
    def from_url(cls, root: str) -> SparkOfflineStore:
        """The store over ``root``, on the session ``spark_master`` of the process's settings
        names (the engine table passes only the root)."""
        from carrara.config import load_settings

        return cls(root, master=load_settings().spark_master)

    @property
    def spark(self) -> SparkSession:
        """The session the queries run on (the process's, started on first use)."""
        if self._session is None:
            with _lock:
                if self._session is None:
                    self._session = _acquire(self.master)
                    self._acquired = True
        return self._session

    def configure(self, settings: Settings) -> None:
        """Use ``settings.spark_master`` (until the session has started: a running session
        keeps its master)."""
        if self._session is None:
            self.master = settings.spark_master

    def close(self) -> None:
        """Release the process's session: it stops when the last store using it closes."""
        if self._acquired:
            self._acquired = False
            self._session = None
            _release()

    # -- reading ----------------------------------------------------------------------------

    def _spark_paths(self, files: Sequence[str]) -> list[str] | None:
        if self._local:
            return ["file://" + f for f in files]
        protocols = (
            self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        )
        for p in protocols:
            if p in _SPARK_SCHEMES:
                self._require_connector(_SPARK_SCHEMES[p])
                return [f"{_SPARK_SCHEMES[p]}://{f}" for f in files]
        return None

    def _require_connector(self, scheme: str) -> None:
        """Refuse a root whose Hadoop connector is not on Spark's classpath (pyspark ships
        none for s3a/gs/abfs), with what to install, rather than a JVM stack trace later."""
        if scheme in self._connectors:
            return
        spark = self.spark
        try:
            jvm = spark._jvm
            conf = spark._jsc.hadoopConfiguration()
            jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(scheme, conf)
        except Exception as exc:  # py4j's Py4JJavaError: ClassNotFound / UnsupportedFileSystem
            hint = (
                "add the hadoop-aws jar of Spark's Hadoop version and the AWS SDK bundle to "
                "the classpath (spark.jars / spark.jars.packages = "
                "org.apache.hadoop:hadoop-aws:<version>, downloaded from Maven)"
                if scheme == "s3a"
                else f"add the Hadoop connector jar for {scheme}:// to Spark's classpath"
            )
            raise ConfigError(
                f"offline_engine = 'spark' cannot read the offline root {self.root}: Spark has "
                f"no Hadoop filesystem for {scheme}:// ({type(exc).__name__}); {hint}, or use "
                "offline_engine = 'duckdb', which reads it through fsspec"
            ) from None
        self._connectors.add(scheme)

    def frame(self, group: RegisteredGroup, files: Sequence[str] | None = None) -> DataFrame:
        """The dataset (or ``files`` of it) as a Spark DataFrame with the stored columns
        (timestamps as Spark timestamps)."""
        if files is None:
            files = self.files(group.name, group.version)
        schema = group_schema(group)
        paths = self._spark_paths(files) if files else None
        with _quiet():
            if paths is None:
                return self.spark.createDataFrame(self.read(group, list(files)))
            df = self.spark.read.parquet(*paths)
        return df.select(*schema.names)  # drops the discovered ``date`` partition column

    def latest_rows(
        self, group: RegisteredGroup, *, created_after_us: int = 0, files: list[str] | None = None
    ) -> LatestRows:
        if files is None:
            files = self.files(group.name, group.version)
        if not files:
            return LatestRows(group_schema(group).empty_table(), None)
        from pyspark.sql import functions as F

        src = self.frame(group, files)
        high = src.agg(F.max(F.unix_micros("created_timestamp"))).collect()[0][0]
        table = _to_arrow(self._latest_frame(group, src, created_after_us))
        return LatestRows(_latest_types(group, table), None if high is None else int(high))

    def _latest_frame(self, group: RegisteredGroup, src: DataFrame, after_us: int) -> DataFrame:
        """Per entity written after ``after_us``: its latest row over all its rows (µs times)."""
        from pyspark.sql import functions as F

        names = list(stored_columns(group))
        touched = src.where(F.unix_micros("created_timestamp") > int(after_us)).select("entity_id")
        rows = src.join(touched.distinct(), "entity_id", "left_semi")
        order = F.struct(
            F.unix_micros("event_timestamp").alias("e"),
            F.unix_micros("created_timestamp").alias("c"),
        )
        best = rows.groupBy("entity_id").agg(
            F.max_by(F.struct(*[F.col(n) for n in names]), order).alias("v"),
            F.max(order).alias("k"),
        )
        return best.select(
            "entity_id",
            F.col("k.e").alias("event_timestamp"),
            F.col("k.c").alias("created_timestamp"),
            *[F.col(f"v.{n}").alias(n) for n in names],
        )

    def as_of_join(
        self, labels: pa.Table, joins: Sequence[AsOfJoin], *, threads: int | None = None
    ) -> pa.Table:
        """:meth:`OfflineStore.as_of_join` on Spark (``threads`` is DuckDB's; Spark's
        parallelism is the session's). Only ``__row``, ``__ts`` and the keys go to Spark; the
        caller's columns stay on the driver, unchanged."""
        import pyarrow as pa
        import pyarrow.compute as pc

        labels = labels.sort_by("__row")
        out = labels.select([c for c in labels.column_names if not c.startswith("__")])
        if labels.num_rows:
            ts = labels.column("__ts")
            bounds = pc.min_max(ts).as_py()
            # Labels without a time match nothing; with no time at all, any bounds do.
            min_ts, max_ts = int(bounds["min"] or 0), int(bounds["max"] or 0)
            keys = sorted({j.key for j in joins})
            with _quiet():
                frame = self.spark.createDataFrame(labels.select(["__row", "__ts", *keys]))
        for j in joins:
            g = j.group
            types = [arrow_type(g.definition.feature(f).dtype) for f in j.features]
            if not labels.num_rows or not j.files:
                for f, t in zip(j.features, types, strict=True):
                    if g.definition.is_aggregated and _output(g, f).function in (
                        "count",
                        "sum",
                        "count_distinct",
                    ):
                        column = pa.array([0] * labels.num_rows).cast(t)
                    else:
                        column = pa.nulls(labels.num_rows, t)
                    out = out.append_column(f"{g.name}__{f}", column)
                continue
            events = self.frame(g, list(j.files))
            if g.definition.is_aggregated:
                result = _aggregate_join(frame, events, j, min_ts, max_ts)
            else:
                result = _row_join(frame, events, j, min_ts, max_ts)
            table = _to_arrow(result).sort_by("__row")
            if table.num_rows != labels.num_rows:  # pragma: no cover - an engine bug
                raise RuntimeError(
                    f"Spark as-of join of {g.name!r} gave {table.num_rows} rows for "
                    f"{labels.num_rows} labels"
                )
            for i, (f, t) in enumerate(zip(j.features, types, strict=True)):
                out = out.append_column(f"{g.name}__{f}", table.column(f"__f{i}").cast(t))
        return out

    def _aggregates_now(
        self, group: RegisteredGroup, src: DataFrame, files: list[str], now_us: int | None
    ) -> DataFrame:
        """Rows for :func:`table_to_vectors`: each entity's aggregates at ``now_us`` (event
        and write time ``now_us``), by the same query as training sets."""
        import time

        from pyspark.sql import functions as F

        at = time.time_ns() // 1000 if now_us is None else int(now_us)
        names = group.definition.feature_names
        labels = (
            src.select(F.col("entity_id").alias("__k0"))
            .distinct()
            .select("__k0", F.lit(at).alias("__ts"), F.monotonically_increasing_id().alias("__row"))
        )
        j = AsOfJoin(group, names, "__k0", tuple(files))
        result = _aggregate_join(labels, src, j, at, at)
        return result.select(
            F.col("__lkey").alias("entity_id"),
            F.lit(at).alias("event_timestamp"),
            F.lit(at).alias("created_timestamp"),
            *[F.col(f"__f{i}").alias(n) for i, n in enumerate(names)],
        )

    # -- writing from the executors ---------------------------------------------------------

    def append(self, group: RegisteredGroup, data: Any, *, created_us: int | None = None) -> int:
        """Append rows; a Spark DataFrame (say from :func:`transform_with_spark`) is written
        by the executors, each partition as the built-in engine writes an append (its own
        files per date, write times from the executor's clock)."""
        if not _is_spark_frame(data):
            return super().append(group, data, created_us=created_us)
        if not group.definition.offline:
            raise InvalidArgumentError(
                f"feature group {group.name!r} has offline=False; enable it to append rows"
            )
        write = _partition_appender(self.root, group, created_us)
        with _quiet():
            counts = data.mapInArrow(write, "rows long").collect()
        return sum(int(r[0]) for r in counts)

    def materialize_partitions(
        self,
        group: RegisteredGroup,
        online: str | OnlineStore,
        *,
        namespace: str | None = None,
        created_after_us: int = 0,
        files: list[str] | None = None,
        chunk: int = 10_000,
        now_us: int | None = None,
    ) -> int:
        """Batch materialization on Spark: the latest row of each entity written after
        ``created_after_us`` (as :meth:`latest_rows`), encoded as FeatureVectors and written
        to the online store partition by partition. With an online store URL
        (``redis://...``) each executor opens the store and writes its partitions (pipelined
        batches of ``chunk``); an :class:`OnlineStore` object (``memory://`` lives in this
        process) is written from the driver. Returns the values written (expired rows and
        rows no newer than the stored value are skipped, as in ``materialize_batch``). An
        aggregated group writes every entity's aggregates at ``now_us`` (default: now)."""
        if not group.definition.online:
            raise InvalidArgumentError(
                f"feature group {group.name!r} has online=False; nothing to materialize"
            )
        if files is None:
            files = self.files(group.name, group.version)
        if not files:
            return 0
        src = self.frame(group, files)
        latest = self._to_materialize(group, src, files, created_after_us, now_us)
        if not isinstance(online, str):
            from carrara.feature_cache.materialize import table_to_vectors

            ttl = group.definition.ttl_us
            written = 0
            for vectors in table_to_vectors(group, _to_arrow(latest), chunk=chunk):
                written += online.write_vectors(vectors, ttl)
            return written
        if online.partition("://")[0] == "memory":
            raise InvalidArgumentError(
                "memory:// is an in-process online store the executors cannot reach; pass "
                "the OnlineStore object (written from the driver) or a redis:// URL"
            )
        parts = _write_partitions(latest, online, namespace, group, chunk)
        return sum(int(r[0]) for r in parts)

    def _to_materialize(
        self,
        group: RegisteredGroup,
        src: DataFrame,
        files: list[str],
        created_after_us: int,
        now_us: int | None,
    ) -> DataFrame:
        """The rows batch materialization writes: each touched entity's latest row, or, for
        an aggregated group (windows slide), every entity's aggregates at ``now_us``."""
        if group.definition.is_aggregated:
            return self._aggregates_now(group, src, files, now_us)
        return self._latest_frame(group, src, created_after_us)

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
        """``materialize`` on Spark: the engine's query, then every executor writes its
        partitions to ``online_url`` (pipelined batches of ``chunk``). ``memory://`` lives in
        the calling process: ``None`` lets it write there."""
        if online_url.partition("://")[0] == "memory" or not files:
            return None
        from pyspark.sql import functions as F

        src = self.frame(group, files)
        high, newest_any = src.agg(
            F.max(F.unix_micros("created_timestamp")), F.max(F.unix_micros("event_timestamp"))
        ).collect()[0]
        aggregated = group.definition.is_aggregated
        latest = self._to_materialize(group, src, files, created_after_us, now_us)
        parts = _write_partitions(latest, online_url, namespace, group, chunk)
        newest = [int(r[3]) for r in parts if r[3] is not None]
        return PartitionWrite(
            entities=sum(int(r[1]) for r in parts),
            written=sum(int(r[0]) for r in parts),
            expired=sum(int(r[2]) for r in parts),
            # Row groups: the newest of the rows looked at; aggregated: of every event.
            newest_event_us=(
                (None if newest_any is None else int(newest_any))
                if aggregated
                else (max(newest) if newest else None)
            ),
            max_created_us=None if high is None else int(high),
        )


# -- queries ------------------------------------------------------------------------------------


def _row_join(
    labels: DataFrame, rows: DataFrame, j: AsOfJoin, min_ts: int, max_ts: int
) -> DataFrame:
    """Per label, the group's row with the greatest (event time, write time) at or before the
    label time: labels and rows unioned per entity, ordered by (time, rows before labels,
    write time), each label takes the last row before it (one sort, no range join)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    g = j.group
    ttl = g.definition.ttl_us
    ts = F.unix_micros("event_timestamp")
    keep = ts <= F.lit(max_ts)
    if ttl:
        keep &= ts >= F.lit(min_ts - ttl)
    feats = [F.col(f).alias(f"__f{i}") for i, f in enumerate(j.features)]
    side = rows.where(keep).select(
        F.col("entity_id").alias("__key"),
        ts.alias("__t"),
        F.lit(0).alias("__kind"),
        F.unix_micros("created_timestamp").alias("__c"),
        F.lit(None).cast("long").alias("__row"),
        F.struct(ts.alias("t"), *feats).alias("__hit"),
    )
    hit_type = side.schema["__hit"].dataType
    lab = labels.select(
        F.col(j.key).alias("__key"),
        F.col("__ts").alias("__t"),
        F.lit(1).alias("__kind"),
        F.lit(None).cast("long").alias("__c"),
        F.col("__row"),
        F.lit(None).cast(hit_type).alias("__hit"),
    )
    window = (
        Window.partitionBy("__key")
        .orderBy("__t", "__kind", "__c")
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    both = side.unionByName(lab).withColumn(
        "__last", F.last("__hit", ignorenulls=True).over(window)
    )
    found = both.where(F.col("__kind") == 1)
    fresh = F.col("__last").isNotNull()
    if ttl:
        fresh &= F.col("__last.t") >= F.col("__t") - F.lit(ttl)
    return found.select(
        "__row",
        *[F.when(fresh, F.col(f"__last.__f{i}")).alias(f"__f{i}") for i in range(len(j.features))],
    )


def _output(group: RegisteredGroup, name: str) -> Output:
    for o in group.definition.outputs:
        if o.name == name:
            return o
    raise InvalidArgumentError(f"feature group {group.name!r} has no aggregation output {name!r}")


def _aggregate_join(
    labels: DataFrame, events: DataFrame, j: AsOfJoin, min_ts: int, max_ts: int
) -> DataFrame:
    """Per label, each requested window aggregate over the entity's events in
    ``[window start, label time]``: a range join on entity and the widest window, then one
    conditional aggregate per output (window, bucket, presence of the value)."""
    from pyspark.sql import functions as F

    g = j.group
    tile = g.definition.tile_us
    outs = [_output(g, f) for f in j.features]
    widest = max(o.window_us for o in outs)
    ts = F.unix_micros("event_timestamp")
    columns = sorted(
        {o.column for o in outs if o.column} | {o.bucket_column for o in outs if o.bucket}
    )
    side = (
        events.distinct()
        .where((ts <= F.lit(max_ts)) & (ts >= F.lit(window_start(min_ts, widest, tile))))
        .select(
            F.col("entity_id").alias("__key"),
            ts.alias("__t"),
            F.unix_micros("created_timestamp").alias("__c"),
            *[F.col(c).alias(f"__e_{c}") for c in columns],
        )
    )
    # The window start at label time t: the start of t's tile, plus one tile, minus the window.
    tile_start = F.col("__ts") - F.pmod(F.col("__ts"), F.lit(tile))
    lab = labels.select("__row", "__ts", F.col(j.key).alias("__lkey"), tile_start.alias("__tile"))
    joined = lab.join(
        side,
        (F.col("__lkey") == F.col("__key"))
        & (F.col("__t") <= F.col("__ts"))
        & (F.col("__t") >= F.col("__tile") + F.lit(tile - widest)),
        "left",
    )
    aggs: list[Column] = []
    for i, o in enumerate(outs):
        cond = F.col("__t") >= F.col("__tile") + F.lit(tile - o.window_us)
        if o.bucket is not None:
            cond &= F.col(f"__e_{o.bucket_column}") == F.lit(o.bucket)
        value = F.col(f"__e_{o.column}") if o.column else F.lit(1)
        if o.column:
            cond &= value.isNotNull() & ~F.isnan(value)
        name = f"__f{i}"
        if o.function == "count":
            agg = F.count(F.when(cond, F.lit(1)))
        elif o.function == "sum":
            agg = F.coalesce(F.sum(F.when(cond, value)), F.lit(0.0))
        elif o.function == "mean":
            agg = F.avg(F.when(cond, value))
        elif o.function == "min":
            agg = F.min(F.when(cond, value))
        elif o.function == "max":
            agg = F.max(F.when(cond, value))
        elif o.function == "last":
            agg = F.max_by(value, F.when(cond, F.struct(F.col("__t"), F.col("__c"))))
        else:  # count_distinct
            agg = F.count_distinct(F.when(cond, value))
        aggs.append(agg.alias(name))
    return joined.groupBy("__row", "__lkey").agg(*aggs)


# -- transforms and executor-side writers --------------------------------------------------------


def _is_spark_frame(data: Any) -> bool:
    return type(data).__module__.startswith("pyspark.sql") and hasattr(data, "mapInArrow")


def _to_arrow(df: DataFrame) -> pa.Table:
    with _quiet():
        table: pa.Table = df.toArrow()
    return table


def _latest_types(group: RegisteredGroup, table: pa.Table) -> pa.Table:
    """Spark's result in the built-in engine's types (µs times as int64, features typed)."""
    import pyarrow as pa

    fields = [
        pa.field("entity_id", pa.string()),
        pa.field("event_timestamp", pa.int64()),
        pa.field("created_timestamp", pa.int64()),
    ]
    fields += [pa.field(n, arrow_type(t)) for n, t in stored_columns(group).items()]
    schema = pa.schema(fields)
    return pa.Table.from_arrays(
        [table.column(f.name).cast(f.type) for f in fields], schema=schema
    ).sort_by("entity_id")


def _feature_row_fields(group: RegisteredGroup) -> list[tuple[str, str]]:
    """(column, Spark type) of the rows a group's transform produces (before write times)."""
    spark_types = {
        "float32": "float",
        "float64": "double",
        "int32": "int",
        "int64": "bigint",
        "bool": "boolean",
        "string": "string",
    }
    fields = [("entity_id", "string"), ("event_timestamp", "timestamp")]
    return fields + [(name, spark_types[dtype]) for name, dtype in stored_columns(group).items()]


def transform_with_spark(df: DataFrame, group: RegisteredGroup) -> DataFrame:
    """Source rows (a Spark DataFrame) -> the group's feature rows (``entity_id``,
    ``event_timestamp`` and the feature, or event, columns) through the group's pandas
    transform, run on the executors batch by batch (``mapInPandas``): the same function
    ``ingest`` runs, for ingests too big for one process. Append the result with
    :meth:`SparkOfflineStore.append`."""
    from carrara.feature_cache.definitions import resolve_transform

    fields = _feature_row_fields(group)
    schema = ", ".join(f"`{name}` {kind}" for name, kind in fields)
    # Resolved here and shipped with the task: a transform registered in this process
    # (@transform) is unknown to the executors' registries.
    fn = resolve_transform(group.definition.transform)
    with _quiet():
        return df.mapInPandas(_batch_transformer(group, fields, fn), schema)


def _batch_transformer(
    group: RegisteredGroup, fields: list[tuple[str, str]], fn: Callable[[Any], Any] | None
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    ref = group.definition.transform
    key = group.entity.key
    names = [name for name, _ in fields]

    def run(frames: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for frame in frames:
            out = frame if fn is None else fn(frame)
            if not isinstance(out, pd.DataFrame):
                raise InvalidArgumentError(
                    f"transform {ref!r} of feature group {group.name!r} returned "
                    f"{type(out).__name__}; it must return a pandas DataFrame"
                )
            if "entity_id" not in out.columns and key in out.columns:
                out = out.rename(columns={key: "entity_id"})
            missing = [n for n in names if n not in out.columns]
            if missing:
                raise InvalidArgumentError(
                    f"transform {ref!r} of feature group {group.name!r} gave no column(s) "
                    f"{', '.join(missing)}; it gave {', '.join(map(str, out.columns))}"
                )
            out = out[names].copy()
            out["entity_id"] = out["entity_id"].astype(str)
            out["event_timestamp"] = pd.to_datetime(out["event_timestamp"], utc=True)
            yield out

    return run


def _partition_appender(
    root: str, group: RegisteredGroup, created_us: int | None
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        store = DuckDBOfflineStore(root)
        rows = 0
        pending = [b for b in batches if b.num_rows]
        if pending:
            rows = store.append(group, pa.Table.from_batches(pending), created_us=created_us)
        yield pa.RecordBatch.from_pydict({"rows": pa.array([rows], pa.int64())})

    return run


#: What each partition's writer reports: values written, rows looked at, rows already past
#: the TTL, the newest event time among them.
_WRITE_SCHEMA = "written long, rows long, expired long, newest long"


def _write_partitions(
    latest: DataFrame, url: str, namespace: str | None, group: RegisteredGroup, chunk: int
) -> list[Any]:
    """Each executor writes its partitions of ``latest`` to the online store at ``url``;
    one row of :data:`_WRITE_SCHEMA` counts per partition."""
    write = _partition_writer(url, namespace, group, group.definition.ttl_us, chunk)
    with _quiet():
        parts: list[Any] = latest.mapInArrow(write, _WRITE_SCHEMA).collect()
    return parts


def _partition_writer(
    url: str, namespace: str | None, group: RegisteredGroup, ttl_us: int, chunk: int
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import numpy as np
        import pyarrow as pa

        from carrara.feature_cache.materialize import table_to_vectors
        from carrara.feature_cache.online_store import open_online_store

        written = rows = expired = 0
        newest: int | None = None
        store = None
        try:
            for batch in batches:
                if not batch.num_rows:
                    continue
                if store is None:
                    store = open_online_store(url, namespace=namespace)
                table = pa.Table.from_batches([batch])
                event_us = np.asarray(table.column("event_timestamp").to_numpy(), np.int64)
                rows += table.num_rows
                top = int(event_us.max())
                newest = top if newest is None else max(newest, top)
                if ttl_us:  # the online store's rule: expired at event time + TTL
                    expired += int(((event_us + ttl_us) // 1000 <= store.now_ms()).sum())
                for vectors in table_to_vectors(group, table, chunk=chunk):
                    written += store.write_vectors(vectors, ttl_us)
        finally:
            if store is not None:
                store.close()
        yield pa.RecordBatch.from_pydict(
            {
                "written": pa.array([written], pa.int64()),
                "rows": pa.array([rows], pa.int64()),
                "expired": pa.array([expired], pa.int64()),
                "newest": pa.array([newest], pa.int64()),
            }
        )

    return run
