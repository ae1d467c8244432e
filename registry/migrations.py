"""The registry schema as numbered migrations for SQLite and PostgreSQL.

Timestamps are ISO-8601 UTC text and JSON documents are text on both dialects, so the same
queries run everywhere; ids are integer surrogate keys. ``upgrade(url)`` applies what is missing.
"""

from __future__ import annotations

from carrara.sql import Database, Migration, connect

__all__ = ["COMPONENT", "MIGRATIONS", "TABLES", "migrate", "upgrade"]

COMPONENT = "registry"

#: Every table the registry owns, in an order safe for dumping and comparing.
TABLES = (
    "models",
    "model_versions",
    "version_feature_groups",
    "gate_results",
    "approvals",
    "deployments",
    "audit_log",
    "api_tokens",
    "registry_outbox",
)


def _ddl(serial: str) -> str:
    # ``serial`` is the dialect's auto-increment integer primary key.
    return f"""
CREATE TABLE models (
    model_id {serial},
    name TEXT NOT NULL UNIQUE,
    framework TEXT NOT NULL DEFAULT '',
    artifact_path TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    high_stakes INTEGER NOT NULL DEFAULT 0,
    gates_json TEXT NOT NULL DEFAULT '[]',
    last_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE model_versions (
    version_id {serial},
    model_id BIGINT NOT NULL REFERENCES models(model_id),
    version_number INTEGER NOT NULL,
    metrics_json TEXT NOT NULL DEFAULT '{{}}',
    evaluations_json TEXT NOT NULL DEFAULT '{{}}',
    feature_store_version TEXT NOT NULL DEFAULT '[]',
    training_dataset_ref TEXT NOT NULL DEFAULT '',
    framework TEXT NOT NULL DEFAULT '',
    framework_version TEXT NOT NULL DEFAULT '',
    artifact_path TEXT NOT NULL DEFAULT '',
    artifact_sha256 TEXT NOT NULL DEFAULT '',
    artifact_size INTEGER NOT NULL DEFAULT 0,
    native_artifact_path TEXT NOT NULL DEFAULT '',
    native_artifact_sha256 TEXT NOT NULL DEFAULT '',
    native_artifact_size INTEGER NOT NULL DEFAULT 0,
    native_format TEXT NOT NULL DEFAULT '',
    signature_json TEXT NOT NULL DEFAULT '{{}}',
    tags_json TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL DEFAULT 'STAGING'
        CHECK (status IN ('STAGING', 'PRODUCTION', 'ARCHIVED')),
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    promoted_at TEXT,
    promoted_by TEXT,
    archived_at TEXT,
    run_id TEXT NOT NULL DEFAULT '',
    UNIQUE (model_id, version_number)
);
CREATE UNIQUE INDEX model_versions_one_production ON model_versions (model_id)
    WHERE status = 'PRODUCTION';
CREATE TABLE version_feature_groups (
    version_id BIGINT NOT NULL REFERENCES model_versions(version_id),
    feature_group_version TEXT NOT NULL,
    PRIMARY KEY (version_id, feature_group_version)
);
CREATE INDEX version_feature_groups_by_group
    ON version_feature_groups (feature_group_version);
CREATE TABLE gate_results (
    gate_result_id {serial},
    version_id BIGINT NOT NULL REFERENCES model_versions(version_id),
    gate TEXT NOT NULL,
    dataset TEXT NOT NULL,
    metric TEXT NOT NULL,
    value DOUBLE PRECISION,
    reference DOUBLE PRECISION,
    passed INTEGER NOT NULL,
    detail TEXT NOT NULL,
    evaluated_by TEXT NOT NULL,
    evaluated_at TEXT NOT NULL
);
CREATE INDEX gate_results_by_version ON gate_results (version_id);
CREATE TABLE approvals (
    approval_id {serial},
    version_id BIGINT NOT NULL REFERENCES model_versions(version_id),
    approver TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    UNIQUE (version_id, approver)
);
CREATE TABLE deployments (
    deployment_id {serial},
    model_id BIGINT NOT NULL REFERENCES models(model_id),
    version_id BIGINT NOT NULL REFERENCES model_versions(version_id),
    traffic_split_json TEXT NOT NULL,
    serving_endpoint TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 0,
    previous_id BIGINT,
    rollback_of BIGINT
);
CREATE INDEX deployments_by_model ON deployments (model_id, deployment_id);
CREATE UNIQUE INDEX deployments_one_active ON deployments (model_id) WHERE is_active = 1;
CREATE TABLE audit_log (
    audit_id {serial},
    model_id BIGINT,
    version_id BIGINT,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{{}}',
    created_at TEXT NOT NULL
);
CREATE INDEX audit_log_by_model ON audit_log (model_id, audit_id);
CREATE TABLE api_tokens (
    token_id {serial},
    subject TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    roles TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE registry_outbox (
    event_id {serial},
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    published_at TEXT
)
"""


_DECISION = "decision TEXT NOT NULL DEFAULT 'approved' CHECK (decision IN ('approved', 'rejected'))"
_APPROVALS_SQLITE = f"""
CREATE TABLE approvals_new (
    approval_id INTEGER PRIMARY KEY AUTOINCREMENT,
    version_id BIGINT NOT NULL REFERENCES model_versions(version_id),
    approver TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    {_DECISION}
);
INSERT INTO approvals_new (approval_id, version_id, approver, comment, created_at)
    SELECT approval_id, version_id, approver, comment, created_at FROM approvals;
DROP TABLE approvals;
ALTER TABLE approvals_new RENAME TO approvals;
CREATE INDEX approvals_by_version ON approvals (version_id, approval_id)
"""
_APPROVALS_POSTGRESQL = f"""
ALTER TABLE approvals ADD COLUMN {_DECISION};
ALTER TABLE approvals DROP CONSTRAINT IF EXISTS approvals_version_id_approver_key;
CREATE INDEX approvals_by_version ON approvals (version_id, approval_id)
"""

MIGRATIONS = [
    Migration(
        "0001_initial",
        sqlite=_ddl("INTEGER PRIMARY KEY AUTOINCREMENT"),
        postgresql=_ddl("BIGSERIAL PRIMARY KEY"),
    ),
    # What the gateway needs besides the artifact (e.g. its assembler spec), carried opaquely
    # to gateways in deployment events.
    Migration(
        "0002_serving_spec",
        sql="ALTER TABLE model_versions ADD COLUMN serving_spec_json TEXT NOT NULL DEFAULT '{}'",
    ),
    # Approvers' decisions: a row is an approval or a rejection (its comment the reason), and
    # one approver may decide a version more than once (approve, reject, approve again), so
    # the (version_id, approver) uniqueness goes. SQLite cannot drop a table constraint:
    # the table is rebuilt with its rows and ids.
    Migration(
        "0003_approval_decisions",
        sqlite=_APPROVALS_SQLITE,
        postgresql=_APPROVALS_POSTGRESQL,
    ),
]


def migrate(db: Database) -> list[str]:
    """Bring ``db`` to the latest registry schema; returns the migration ids applied now."""
    return db.migrate(COMPONENT, MIGRATIONS)


def upgrade(url: str) -> list[str]:
    """Apply pending registry migrations to the database at ``url`` (``carrara db upgrade``)."""
    with connect(url) as db:
        return migrate(db)
