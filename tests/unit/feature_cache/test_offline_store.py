"""The offline store: date-partitioned Parquet per group version, append and compaction."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carrara.errors import InvalidArgumentError
from carrara.feature_cache import Definitions
from carrara.feature_cache.offline_store import DuckDBOfflineStore


def _rows(fc: Any, n: int, start: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "entity_id": [f"d{i % 5}" for i in range(n)],
            "event_timestamp": [fc.ts(start + i * 3600 * 7) for i in range(n)],
            "fare_mean": [float(i) for i in range(n)],
            "fare_p50": [i / 2 for i in range(n)],
            "trip_count": list(range(n)),
        }
    )


def test_append_writes_date_partitions_with_the_group_schema(
    service: Any, definitions: Definitions, fc: Any
) -> None:
    service.apply(definitions)
    assert service.write_offline("trips", _rows(fc, 20)) == 20
    g = service.group("trips")
    files = service.offline.files("trips", 1)
    dates = sorted({Path(f).parent.name for f in files})
    assert dates == [f"date=2024-03-0{d}" for d in range(1, 7)]
    table = service.offline.read(g)
    assert table.num_rows == 20
    assert table.schema.names == [
        "entity_id",
        "event_timestamp",
        "created_timestamp",
        "fare_mean",
        "fare_p50",
        "trip_count",
    ]
    assert table.schema.field("fare_p50").type == pa.float32()
    assert table.schema.field("trip_count").type == pa.int64()
    assert str(table.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
    # the files hold no partition column
    assert "date" not in pq.read_schema(files[0]).names


def test_inputs_from_polars_and_arrow_and_integer_timestamps(
    service: Any, definitions: Definitions, fc: Any
) -> None:
    service.apply(definitions)
    df = _rows(fc, 4)
    service.write_offline("trips", pl.from_pandas(df))
    service.write_offline("trips", pa.Table.from_pandas(df, preserve_index=False))
    as_int = df.assign(event_timestamp=[int(t.value // 1000) for t in df["event_timestamp"]])
    service.write_offline("trips", as_int)
    table = service.offline.read(service.group("trips"))
    assert table.num_rows == 12
    assert len(set(table.column("event_timestamp").to_pylist())) == 4


def test_bad_rows_are_refused_with_the_fix(service: Any, definitions: Definitions, fc: Any) -> None:
    service.apply(definitions)
    with pytest.raises(InvalidArgumentError, match=r"lack feature column.*trip_count"):
        service.write_offline("trips", _rows(fc, 3).drop(columns=["trip_count"]))
    with pytest.raises(InvalidArgumentError, match="no column 'event_timestamp'"):
        service.write_offline("trips", _rows(fc, 3).drop(columns=["event_timestamp"]))
    with pytest.raises(InvalidArgumentError, match="cannot be read as int64"):
        service.write_offline("trips", _rows(fc, 3).assign(trip_count=["a", "b", "c"]))
    with pytest.raises(InvalidArgumentError, match="pandas or Polars"):
        service.write_offline("trips", [1, 2, 3])


def test_versions_have_separate_datasets(service: Any, definitions: Definitions, fc: Any) -> None:
    from carrara.feature_cache import Feature

    service.apply(definitions)
    service.write_offline("trips", _rows(fc, 5))
    g2 = fc.trips_group(features=(*fc.trips_group().features, Feature(name="tip")))
    service.apply(Definitions(entities=definitions.entities, groups=(g2,)))
    service.write_offline("trips", _rows(fc, 3).assign(tip=1.0))
    assert service.offline.read(service.group("trips", 1)).num_rows == 5
    assert service.offline.read(service.group("trips", 2)).num_rows == 3


def test_compaction_merges_files_and_drops_replayed_rows(
    service: Any, definitions: Definitions, fc: Any
) -> None:
    service.apply(definitions)
    df = _rows(fc, 10).assign(created_timestamp=fc.ts(999_999))
    for _ in range(3):
        service.write_offline("trips", df)  # the same rows three times (a replayed append)
    service.write_offline("trips", _rows(fc, 10, start=60))
    g = service.group("trips")
    before = service.offline.read(g)
    result = service.compact("trips")
    assert result.files_before > result.files_after == result.partitions
    after = service.offline.read(g)
    assert after.num_rows == 20 == result.rows
    key = ["entity_id", "event_timestamp", "created_timestamp"]
    assert (
        before.to_pandas()
        .drop_duplicates()
        .sort_values(key)
        .reset_index(drop=True)
        .equals(after.to_pandas().sort_values(key).reset_index(drop=True))
    )
    assert service.compact("trips").files_before == result.files_after


def test_fsspec_object_store_paths(definitions: Definitions, fc: Any, tmp_path: Path) -> None:
    import fsspec

    from carrara.feature_cache import Catalog

    root = f"memory://carrara-{uuid.uuid4().hex[:8]}"
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        catalog.apply(definitions)
        g = catalog.get_group("trips")
        store = DuckDBOfflineStore(root)
        store.append(g, _rows(fc, 6))
        assert all(f.startswith("/carrara-") for f in store.files("trips", 1))
        assert store.read(g).num_rows == 6
        assert store.compact(g).rows == 6
    finally:
        catalog.close()
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
