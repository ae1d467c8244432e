"""Monitoring's own tables (component ``monitoring``), in the registry's database.

Profiles are keyed by (model name, version number); predictions double as the dedup set of
the consumer (request id is the primary key) and as the left side of the delayed-label join.
"""

from __future__ import annotations

import weakref

from carrara.sql import Database, Migration, connect

__all__ = ["COMPONENT", "MIGRATIONS", "ensure_schema", "upgrade"]

COMPONENT = "monitoring"

_TABLES = """
CREATE TABLE monitoring_profiles (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_ms BIGINT NOT NULL,
    profile {blob} NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE monitoring_model_config (
    model TEXT PRIMARY KEY,
    config {blob} NOT NULL
);
CREATE TABLE monitoring_predictions (
    request_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    timestamp_ms BIGINT NOT NULL
);
CREATE INDEX monitoring_predictions_mvt ON monitoring_predictions (model, version, timestamp_ms);
CREATE TABLE monitoring_labels (
    request_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    label DOUBLE PRECISION NOT NULL,
    timestamp_ms BIGINT NOT NULL
);
CREATE INDEX monitoring_labels_model ON monitoring_labels (model, timestamp_ms);
CREATE TABLE monitoring_windows (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    window_start BIGINT NOT NULL,
    window_ms BIGINT NOT NULL,
    n BIGINT NOT NULL,
    state {blob} NOT NULL,
    dirty INTEGER NOT NULL,
    PRIMARY KEY (model, version, window_start)
);
CREATE TABLE monitoring_watermarks (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    max_timestamp_ms BIGINT NOT NULL,
    last_judged_start BIGINT NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE monitoring_drift (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    window_start BIGINT NOT NULL,
    feature TEXT NOT NULL,
    result {blob} NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (model, version, window_start, feature)
);
CREATE TABLE monitoring_performance (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    window_start BIGINT NOT NULL,
    metric TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (model, version, window_start, metric)
);
CREATE TABLE monitoring_alerts (
    alert_key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    active INTEGER NOT NULL,
    alert {blob} NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE monitoring_alert_outbox (
    id {serial},
    payload {blob} NOT NULL
)
"""

MIGRATIONS = [
    Migration(
        "0001_monitoring",
        sqlite=_TABLES.format(blob="BLOB", serial="INTEGER PRIMARY KEY AUTOINCREMENT"),
        postgresql=_TABLES.format(blob="BYTEA", serial="BIGSERIAL PRIMARY KEY"),
    ),
    Migration(
        "0002_alert_clear_streak",
        sql="ALTER TABLE monitoring_alerts ADD COLUMN clear_streak INTEGER NOT NULL DEFAULT 0",
    ),
    # Which sink already took which queued alert (sinks are delivered to independently).
    Migration(
        "0003_alert_deliveries",
        sql="CREATE TABLE monitoring_alert_deliveries (outbox_id BIGINT NOT NULL,"
        " sink TEXT NOT NULL, PRIMARY KEY (outbox_id, sink))",
    ),
    # Who acknowledged a firing alert, when, and why (NULL: not acknowledged). Cleared when
    # the condition fires again after it resolved.
    Migration(
        "0004_alert_acknowledgement",
        sql="ALTER TABLE monitoring_alerts ADD COLUMN acknowledged_by TEXT;\n"
        "ALTER TABLE monitoring_alerts ADD COLUMN acknowledged_ms BIGINT;\n"
        "ALTER TABLE monitoring_alerts ADD COLUMN ack_comment TEXT",
    ),
]

_migrated: weakref.WeakSet[Database] = weakref.WeakSet()


def ensure_schema(db: Database) -> None:
    """Apply pending migrations once per ``Database`` object (cheap on later calls)."""
    if db not in _migrated:
        db.migrate(COMPONENT, MIGRATIONS)
        _migrated.add(db)


def upgrade(url: str) -> list[str]:
    """Bring monitoring's tables up to date in the database at ``url``; returns applied ids."""
    db = connect(url)
    try:
        applied = db.migrate(COMPONENT, MIGRATIONS)
    finally:
        db.close()
    return applied
