"""Reads and writes of monitoring's tables that several modules share: per-model config, and
the drift / performance history the report, the CLI and the JSON read API
(:mod:`carrara.monitoring.views`) show."""

from __future__ import annotations

import msgspec

from carrara.sql import Database, Transaction

from .config import ModelMonitorConfig
from .drift import FeatureDrift
from .schema import ensure_schema
from .windows import WindowState, load_windows

__all__ = [
    "ModelVersions",
    "active_alert_counts",
    "configure_model",
    "drift_history",
    "latest_judged_start",
    "model_config",
    "model_versions",
    "monitored_versions",
    "performance_history",
    "purge_before",
    "versions_of",
    "window_sizes",
    "window_state",
    "windows_of",
]

_config_decoder = msgspec.msgpack.Decoder(ModelMonitorConfig)
_drift_decoder = msgspec.msgpack.Decoder(FeatureDrift)
_state_decoder = msgspec.msgpack.Decoder(WindowState)
_MIN_START = -(2**63)


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


def _cutoff(tx: Transaction, table: str, model: str, version: int, last: int | None) -> int:
    """The start of the ``last``-th newest window of ``table`` (every window when None)."""
    if last is None:
        return _MIN_START
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    row = tx.fetchone(
        f"SELECT DISTINCT window_start FROM {table} WHERE model = ? AND version = ?"
        " ORDER BY window_start DESC LIMIT 1 OFFSET ?",
        (model, version, last - 1),
    )
    return _MIN_START if row is None else int(row[0])


def drift_history(
    db: Database, model: str, version: int, *, last: int | None = None
) -> list[tuple[int, FeatureDrift]]:
    """(window start, result) of every judged window and feature, oldest first; only the
    ``last`` newest windows when given."""
    ensure_schema(db)
    with db.transaction() as tx:
        since = _cutoff(tx, "monitoring_drift", model, version, last)
        rows = tx.fetchall(
            "SELECT window_start, result FROM monitoring_drift WHERE model = ? AND version = ?"
            " AND window_start >= ? ORDER BY window_start, feature",
            (model, version, since),
        )
    return [(int(s), _drift_decoder.decode(bytes(b))) for s, b in rows]


def latest_judged_start(db: Database, model: str, version: int) -> int | None:
    """The start of the newest judged window of a version (None before the first)."""
    ensure_schema(db)
    with db.transaction() as tx:
        row = tx.fetchone(
            "SELECT MAX(window_start) FROM monitoring_drift WHERE model = ? AND version = ?",
            (model, version),
        )
    return None if row is None or row[0] is None else int(row[0])


def performance_history(
    db: Database, model: str, version: int, *, last: int | None = None
) -> list[tuple[int, str, float, int]]:
    """(window start, metric, value, labelled count) per prediction window, oldest first; only
    the ``last`` newest windows when given."""
    ensure_schema(db)
    with db.transaction() as tx:
        since = _cutoff(tx, "monitoring_performance", model, version, last)
        rows = tx.fetchall(
            "SELECT window_start, metric, value, n FROM monitoring_performance"
            " WHERE model = ? AND version = ? AND window_start >= ? ORDER BY window_start, metric",
            (model, version, since),
        )
    return [(int(s), str(m), float(v), int(n)) for s, m, v, n in rows]


def window_sizes(db: Database, model: str, version: int) -> dict[int, tuple[int, int]]:
    """window start -> (window_ms, predictions) of the stored windows of a version (no
    histograms decoded)."""
    ensure_schema(db)
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT window_start, window_ms, n FROM monitoring_windows"
            " WHERE model = ? AND version = ?",
            (model, version),
        )
    return {int(s): (int(w), int(n)) for s, w, n in rows}


def window_state(db: Database, model: str, version: int, start: int) -> WindowState | None:
    """The counts of one stored window (None when it is not stored)."""
    ensure_schema(db)
    with db.transaction() as tx:
        row = tx.fetchone(
            "SELECT state FROM monitoring_windows WHERE model = ? AND version = ?"
            " AND window_start = ?",
            (model, version, start),
        )
    return None if row is None else _state_decoder.decode(bytes(row[0]))


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


class ModelVersions(msgspec.Struct, frozen=True):
    """What monitoring holds of one model: versions with a reference profile, with stored
    windows, and with judged windows."""

    profiled: list[int]
    windowed: list[int]
    judged: list[int]

    @property
    def known(self) -> list[int]:
        return sorted({*self.profiled, *self.windowed, *self.judged})

    @property
    def newest(self) -> int | None:
        """The newest version with windows (judged or not), else the newest profiled one."""
        with_windows = {*self.windowed, *self.judged}
        if with_windows:
            return max(with_windows)
        return max(self.profiled, default=None)


def model_versions(db: Database, model: str) -> ModelVersions:
    ensure_schema(db)
    with db.transaction() as tx:
        out = [
            sorted(
                int(r[0])
                for r in tx.fetchall(
                    f"SELECT DISTINCT version FROM {table} WHERE model = ?", (model,)
                )
            )
            for table in ("monitoring_profiles", "monitoring_windows", "monitoring_drift")
        ]
    return ModelVersions(*out)


def monitored_versions(db: Database) -> dict[str, list[int]]:
    """model -> versions with a reference profile or judged windows, by model name."""
    ensure_schema(db)
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT model, version FROM monitoring_profiles"
            " UNION SELECT DISTINCT model, version FROM monitoring_drift"
        )
    out: dict[str, set[int]] = {}
    for m, v in rows:
        out.setdefault(str(m), set()).add(int(v))
    return {m: sorted(out[m]) for m in sorted(out)}


def active_alert_counts(db: Database) -> dict[str, int]:
    """model -> how many of its alerts are firing now."""
    ensure_schema(db)
    with db.transaction() as tx:
        rows = tx.fetchall(
            "SELECT model, COUNT(*) FROM monitoring_alerts WHERE active = 1 GROUP BY model"
        )
    return {str(m): int(n) for m, n in rows}


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
