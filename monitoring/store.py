"""Reads and writes of monitoring's tables that several modules share: per-model config, and
the drift / performance history the report and the CLI show."""

from __future__ import annotations

import msgspec

from carrara.sql import Database

from .config import ModelMonitorConfig
from .drift import FeatureDrift
from .schema import ensure_schema
from .windows import WindowState, load_windows

__all__ = [
    "configure_model",
    "drift_history",
    "model_config",
    "performance_history",
    "purge_before",
    "versions_of",
    "windows_of",
]

_config_decoder = msgspec.msgpack.Decoder(ModelMonitorConfig)
_drift_decoder = msgspec.msgpack.Decoder(FeatureDrift)


def configure_model(db: Database, model: str, config: ModelMonitorConfig) -> None:
    """Set window length, drift thresholds and degradation margins of ``model``."""
    ensure_schema(db)
    with db.transaction() as tx:
        tx.execute("DELETE FROM monitoring_model_config WHERE model = ?", (model,))
        tx.execute(
            "INSERT INTO monitoring_model_config (model, config) VALUES (?, ?)",
            (model, msgspec.msgpack.encode(config)),
        )


def model_config(db: Database, model: str, default: ModelMonitorConfig) -> ModelMonitorConfig:
    ensure_schema(db)
    with db.transaction() as tx:
        row = tx.fetchone("SELECT config FROM monitoring_model_config WHERE model = ?", (model,))
    return default if row is None else _config_decoder.decode(bytes(row[0]))


def drift_history(db: Database, model: str, version: int) -> list[tuple[int, FeatureDrift]]:
    """(window start, result) of every judged window and feature, oldest first."""
    ensure_schema(db)
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT window_start, result FROM monitoring_drift WHERE model = ? AND version = ?"
            " ORDER BY window_start, feature",
            (model, version),
        )
    return [(int(s), _drift_decoder.decode(bytes(b))) for s, b in rows]


def performance_history(
    db: Database, model: str, version: int
) -> list[tuple[int, str, float, int]]:
    """(window start, metric, value, labelled count) per prediction window, oldest first."""
    ensure_schema(db)
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT window_start, metric, value, n FROM monitoring_performance"
            " WHERE model = ? AND version = ? ORDER BY window_start, metric",
            (model, version),
        )
    return [(int(s), str(m), float(v), int(n)) for s, m, v, n in rows]


def windows_of(db: Database, model: str, version: int) -> list[tuple[int, int, WindowState]]:
    """(start, window_ms, counts) of every stored window of a version, oldest first."""
    ensure_schema(db)
    with db.transaction() as tx:
        return load_windows(tx, model, version)


def versions_of(db: Database, model: str) -> list[int]:
    """Versions of ``model`` that have a profile or logged predictions."""
    ensure_schema(db)
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT version FROM monitoring_profiles WHERE model = ?"
            " UNION SELECT DISTINCT version FROM monitoring_windows WHERE model = ?",
            (model, model),
        )
    return sorted({int(r[0]) for r in rows})


def purge_before(db: Database, cutoff_ms: int) -> int:
    """Delete predictions, labels, windows and drift/performance rows older than
    ``cutoff_ms`` (prediction time); returns the predictions deleted. Dedup only covers what is
    kept: a redelivery of a purged prediction would count again, so keep more than the event
    log retains."""
    ensure_schema(db)
    with db.transaction() as tx:
        tx.execute(
            "DELETE FROM monitoring_labels WHERE request_id IN (SELECT request_id FROM"
            " monitoring_predictions WHERE timestamp_ms < ?)",
            (cutoff_ms,),
        )
        n = tx.execute(
            "DELETE FROM monitoring_predictions WHERE timestamp_ms < ?", (cutoff_ms,)
        ).rowcount
        tx.execute(
            "DELETE FROM monitoring_windows WHERE window_start + window_ms <= ?", (cutoff_ms,)
        )
        for table in ("monitoring_drift", "monitoring_performance"):
            tx.execute(f"DELETE FROM {table} WHERE window_start < ?", (cutoff_ms,))
    return int(n)
