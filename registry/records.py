"""What every registry concern shares: the locked row lookups, row-to-struct mapping, checks.

The lookups take an open ``Transaction`` so each concern composes them into its own single
transaction; ``model_row(..., lock=True)`` is the per-model write lock every write takes first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.registry.types import Gate, Model, ModelVersion, Signature, TrafficSplit
from carrara.sql import Transaction

__all__ = [
    "FEATURE_GROUP_VERSION",
    "MODEL_COLUMNS",
    "VERSION_COLUMNS",
    "check_metrics",
    "check_name",
    "gates_decoder",
    "latest_decisions",
    "model_from_row",
    "model_row",
    "spec_decoder",
    "split_decoder",
    "to_json",
    "version_from_row",
    "version_row",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: A feature group version as lineage records it: ``"group:version"``.
FEATURE_GROUP_VERSION = re.compile(r"^[A-Za-z0-9_.-]+:[0-9]+$")

#: The columns ``version_from_row`` reads, over ``model_versions v JOIN models m``.
VERSION_COLUMNS = (
    "v.version_id, m.name, v.version_number, v.status, v.metrics_json, v.evaluations_json,"
    " v.framework, v.framework_version, v.feature_store_version, v.training_dataset_ref,"
    " v.signature_json, v.run_id, v.tags_json, v.artifact_path, v.artifact_sha256,"
    " v.native_artifact_path, v.native_artifact_sha256, v.native_format, v.created_by,"
    " v.created_at, v.promoted_at, v.promoted_by, v.archived_at, v.serving_spec_json"
)
#: The columns ``model_from_row`` reads, over ``models m``.
MODEL_COLUMNS = (
    "m.model_id, m.name, m.framework, m.created_by, m.created_at, m.description,"
    " m.high_stakes, m.gates_json, m.last_version,"
    " (SELECT p.version_number FROM model_versions p"
    "  WHERE p.model_id = m.model_id AND p.status = 'PRODUCTION')"
)

gates_decoder = msgspec.json.Decoder(list[Gate])
split_decoder = msgspec.json.Decoder(TrafficSplit)
spec_decoder = msgspec.json.Decoder(dict[str, Any])
_signature_decoder = msgspec.json.Decoder(Signature)
_evals_decoder = msgspec.json.Decoder(dict[str, dict[str, float]])
_metrics_decoder = msgspec.json.Decoder(dict[str, float])
_tags_decoder = msgspec.json.Decoder(dict[str, str])
_list_decoder = msgspec.json.Decoder(list[str])


def to_json(value: Any) -> str:
    """``value`` as JSON text, the form every JSON column holds on both dialects."""
    return msgspec.json.encode(value).decode()


def check_name(kind: str, name: str) -> None:
    """Refuse a model name that would not work in URLs, paths and the CLI."""
    if not _NAME.match(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def check_metrics(what: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as finite floats keyed by text; refuses anything else, naming the metric."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgumentError(f"{what} {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{what} {key!r} must be finite, got {value}")
        out[str(key)] = float(value)
    return out


def _lock(tx: Transaction) -> str:
    return " FOR UPDATE" if tx.dialect == "postgresql" else ""


def model_row(tx: Transaction, name: str, *, lock: bool = False) -> tuple[Any, ...]:
    """``(model_id, name, high_stakes, gates_json, last_version)``; the error lists models.

    ``lock=True`` takes the model's row lock (PostgreSQL; SQLite serializes writers anyway).
    """
    sql = (
        "SELECT model_id, name, high_stakes, gates_json, last_version FROM models"
        " WHERE name = ?" + (_lock(tx) if lock else "")
    )
    row = tx.fetchone(sql, (name,))
    if row is None:
        known = [r[0] for r in tx.fetchall("SELECT name FROM models ORDER BY name LIMIT 20")]
        hint = f"known: {', '.join(known)}" if known else "the registry has no models yet"
        raise NotFoundError(f"model {name!r} does not exist; {hint}")
    return row


def version_row(tx: Transaction, model: tuple[Any, ...], version: int) -> tuple[Any, ...]:
    """One version of ``model`` (a ``model_row``) as ``VERSION_COLUMNS``; the error names
    the latest version."""
    row = tx.fetchone(
        f"SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m"
        " ON m.model_id = v.model_id WHERE v.model_id = ? AND v.version_number = ?",
        (model[0], version),
    )
    if row is None:
        latest = model[4]
        hint = f"latest is {latest}" if latest else "it has no versions yet"
        raise NotFoundError(f"model {model[1]!r} has no version {version}; {hint}")
    return row


def version_from_row(row: Sequence[Any]) -> ModelVersion:
    """A ``VERSION_COLUMNS`` row as a ``ModelVersion``."""
    return ModelVersion(
        version_id=row[0],
        model=row[1],
        version=row[2],
        status=row[3],
        metrics=_metrics_decoder.decode(row[4]),
        evaluations=_evals_decoder.decode(row[5]),
        framework=row[6],
        framework_version=row[7],
        feature_store_version=_list_decoder.decode(row[8]),
        training_dataset_ref=row[9],
        signature=_signature_decoder.decode(row[10]),
        run_id=row[11],
        tags=_tags_decoder.decode(row[12]),
        artifact_path=row[13],
        artifact_sha256=row[14],
        native_artifact_path=row[15],
        native_artifact_sha256=row[16],
        native_format=row[17],
        created_by=row[18],
        created_at=row[19],
        promoted_at=row[20],
        promoted_by=row[21],
        archived_at=row[22],
        serving_spec=spec_decoder.decode(row[23]),
    )


def model_from_row(row: Sequence[Any]) -> Model:
    """A ``MODEL_COLUMNS`` row as a ``Model``."""
    return Model(
        model_id=row[0],
        name=row[1],
        framework=row[2],
        created_by=row[3],
        created_at=row[4],
        description=row[5],
        high_stakes=bool(row[6]),
        gates=gates_decoder.decode(row[7]),
        latest_version=row[8],
        production_version=row[9],
    )


def latest_decisions(tx: Transaction, version_ids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
    """The latest approver decision of each of ``version_ids`` (absent: never decided), as
    ``(approver, comment, created_at, decision)``."""
    if not version_ids:
        return {}
    marks = ", ".join("?" for _ in version_ids)
    rows = tx.fetchall(
        "SELECT a.version_id, a.approver, a.comment, a.created_at, a.decision FROM approvals a"
        f" WHERE a.version_id IN ({marks}) AND a.approval_id = (SELECT MAX(b.approval_id)"
        " FROM approvals b WHERE b.version_id = a.version_id)",
        list(version_ids),
    )
    return {r[0]: tuple(r[1:]) for r in rows}
