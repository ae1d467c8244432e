"""The model registry: versions with lineage, gated promotion, approvals, deployments, audit.

Every write is one database transaction that first locks the model's row (``FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serializes writers), so version numbers are assigned
without gaps or duplicates and a model never has two PRODUCTION versions or two active
deployments. Roles are checked here, so the REST API and embedded callers obey the same rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from carrara.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from carrara.registry.artifacts import ArtifactStore, StoredArtifact
from carrara.registry.auth import Principal, TokenStore, require_role
from carrara.registry.deployments import (
    Served,
    default_split,
    deployed_variants,
    split_versions,
    validate_split,
)
from carrara.registry.gates import evaluate_gates, validate_gates
from carrara.registry.migrations import migrate
from carrara.registry.types import (
    Approval,
    AuditEntry,
    Deployment,
    Gate,
    GateResult,
    Lineage,
    Model,
    ModelVersion,
    PromotionResult,
    Signature,
    TrafficSplit,
)
from carrara.registry.util import now_iso
from carrara.sql import Database, Transaction, connect

__all__ = ["DEPLOYMENTS_TOPIC", "EventPublisher", "Evaluator", "ModelRegistry"]

#: Event-log topic that carries every deployment change (payload: msgspec JSON ``Deployment``).
DEPLOYMENTS_TOPIC = "deployments"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FEATURE_GROUP_VERSION = re.compile(r"^[A-Za-z0-9_.-]+:[0-9]+$")

_VERSION_COLUMNS = (
    "v.version_id, m.name, v.version_number, v.status, v.metrics_json, v.evaluations_json,"
    " v.framework, v.framework_version, v.feature_store_version, v.training_dataset_ref,"
    " v.signature_json, v.run_id, v.tags_json, v.artifact_path, v.artifact_sha256,"
    " v.native_artifact_path, v.native_artifact_sha256, v.native_format, v.created_by,"
    " v.created_at, v.promoted_at, v.promoted_by, v.archived_at, v.serving_spec_json"
)
_MODEL_COLUMNS = (
    "m.model_id, m.name, m.framework, m.created_by, m.created_at, m.description,"
    " m.high_stakes, m.gates_json, m.last_version,"
    " (SELECT p.version_number FROM model_versions p"
    "  WHERE p.model_id = m.model_id AND p.status = 'PRODUCTION')"
)
_DEPLOYMENT_COLUMNS = (
    "d.deployment_id, m.name, v.version_number, d.traffic_split_json, d.serving_endpoint,"
    " d.created_by, d.created_at, d.is_active, d.rollback_of, d.previous_id"
)

_gates_decoder = msgspec.json.Decoder(list[Gate])
_split_decoder = msgspec.json.Decoder(TrafficSplit)
_signature_decoder = msgspec.json.Decoder(Signature)
_evals_decoder = msgspec.json.Decoder(dict[str, dict[str, float]])
_metrics_decoder = msgspec.json.Decoder(dict[str, float])
_tags_decoder = msgspec.json.Decoder(dict[str, str])
_list_decoder = msgspec.json.Decoder(list[str])
_spec_decoder = msgspec.json.Decoder(dict[str, Any])


class EventPublisher(Protocol):
    """The part of ``carrara.eventlog.EventLog`` the registry needs."""

    def append(self, topic: str, payload: bytes) -> str: ...


#: Computes a version's metrics on a named evaluation dataset (used by promotion when the
#: version has no recorded metrics for a gate's dataset).
Evaluator = Callable[[ModelVersion, str], Mapping[str, float]]


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _check_metrics(what: str, metrics: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgumentError(f"{what} {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{what} {key!r} must be finite, got {value}")
        out[str(key)] = float(value)
    return out


class ModelRegistry:
    """Registered models and versions over one database and one artifact store."""

    def __init__(
        self,
        db: Database,
        artifacts: ArtifactStore,
        *,
        events: EventPublisher | None = None,
        evaluator: Evaluator | None = None,
        owns_db: bool = False,
    ) -> None:
        self.db = db
        self.artifacts = artifacts
        self.events = events
        self.evaluator = evaluator
        self.tokens = TokenStore(db)
        self._owns_db = owns_db

    @classmethod
    def open(
        cls,
        url: str,
        artifact_root: str | Path,
        *,
        events: EventPublisher | None = None,
        evaluator: Evaluator | None = None,
        upgrade: bool = True,
    ) -> ModelRegistry:
        """Open (and by default migrate) the registry at ``url``; ``close()`` closes the DB."""
        db = connect(url)
        try:
            if upgrade:
                migrate(db)
        except BaseException:
            db.close()
            raise
        return cls(
            db, ArtifactStore(artifact_root), events=events, evaluator=evaluator, owns_db=True
        )

    def close(self) -> None:
        """Close the database if this registry opened it."""
        if self._owns_db:
            self.db.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups ----------------------------------------------------------------------------

    def _lock(self, tx: Transaction) -> str:
        return " FOR UPDATE" if tx.dialect == "postgresql" else ""

    def _model_row(self, tx: Transaction, name: str, *, lock: bool = False) -> tuple[Any, ...]:
        sql = (
            "SELECT model_id, name, high_stakes, gates_json, last_version FROM models"
            " WHERE name = ?" + (self._lock(tx) if lock else "")
        )
        row = tx.fetchone(sql, (name,))
        if row is None:
            known = [r[0] for r in tx.fetchall("SELECT name FROM models ORDER BY name LIMIT 20")]
            hint = f"known: {', '.join(known)}" if known else "the registry has no models yet"
            raise NotFoundError(f"model {name!r} does not exist; {hint}")
        return row

    def _version_row(
        self, tx: Transaction, model: tuple[Any, ...], version: int
    ) -> tuple[Any, ...]:
        row = tx.fetchone(
            f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m"
            " ON m.model_id = v.model_id WHERE v.model_id = ? AND v.version_number = ?",
            (model[0], version),
        )
        if row is None:
            latest = model[4]
            hint = f"latest is {latest}" if latest else "it has no versions yet"
            raise NotFoundError(f"model {model[1]!r} has no version {version}; {hint}")
        return row

    @staticmethod
    def _version(row: Sequence[Any]) -> ModelVersion:
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
            serving_spec=_spec_decoder.decode(row[23]),
        )

    @staticmethod
    def _model(row: Sequence[Any]) -> Model:
        return Model(
            model_id=row[0],
            name=row[1],
            framework=row[2],
            created_by=row[3],
            created_at=row[4],
            description=row[5],
            high_stakes=bool(row[6]),
            gates=_gates_decoder.decode(row[7]),
            latest_version=row[8],
            production_version=row[9],
        )

    def get_model(self, name: str) -> Model:
        """A model with its policy, latest and production version numbers."""
        with self.db.transaction() as tx:
            self._model_row(tx, name)
            row = tx.fetchone(f"SELECT {_MODEL_COLUMNS} FROM models m WHERE m.name = ?", (name,))
        assert row is not None
        return self._model(row)

    def list_models(self) -> list[Model]:
        """Every model, by name."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(f"SELECT {_MODEL_COLUMNS} FROM models m ORDER BY m.name")
        return [self._model(r) for r in rows]

    def get_version(self, name: str, version: int) -> ModelVersion:
        """One version; the error names the latest version when it does not exist."""
        with self.db.transaction() as tx:
            return self._version(self._version_row(tx, self._model_row(tx, name), version))

    def list_versions(self, name: str, *, status: str | None = None) -> list[ModelVersion]:
        """A model's versions in order, optionally only those in one status."""
        with self.db.transaction() as tx:
            model = self._model_row(tx, name)
            sql = (
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m"
                " ON m.model_id = v.model_id WHERE v.model_id = ?"
            )
            params: list[Any] = [model[0]]
            if status is not None:
                if status not in ("STAGING", "PRODUCTION", "ARCHIVED"):
                    raise InvalidArgumentError(
                        f"unknown status {status!r}; use STAGING, PRODUCTION or ARCHIVED"
                    )
                sql += " AND v.status = ?"
                params.append(status)
            rows = tx.fetchall(sql + " ORDER BY v.version_number", params)
        return [self._version(r) for r in rows]

    def version_for_run(self, name: str, run_id: str) -> ModelVersion | None:
        """The (first) version of model ``name`` registered by training run ``run_id``, or
        None (also when the model does not exist): lets a resumed job register only once."""
        if not run_id:
            raise InvalidArgumentError("version_for_run needs a run id")
        with self.db.transaction() as tx:
            row = tx.fetchone(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m"
                " ON m.model_id = v.model_id WHERE m.name = ? AND v.run_id = ?"
                " ORDER BY v.version_number LIMIT 1",
                (name, run_id),
            )
        return self._version(row) if row is not None else None

    def production_version(self, name: str) -> ModelVersion | None:
        """The one PRODUCTION version, or None."""
        found = self.list_versions(name, status="PRODUCTION")
        return found[0] if found else None

    # -- models -----------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        *,
        actor: Principal,
        framework: str = "",
        description: str = "",
        high_stakes: bool = False,
        gates: Sequence[Gate] = (),
    ) -> Model:
        """Create a model with its promotion policy (gates, high-stakes flag)."""
        require_role(actor, "publisher", "creating a model")
        _check_name("model", name)
        validate_gates(gates)
        with self.db.transaction() as tx:
            if tx.fetchone("SELECT 1 FROM models WHERE name = ?", (name,)) is not None:
                raise AlreadyExistsError(
                    f"model {name!r} already exists; change its policy with update_model "
                    "(carrara models update)"
                )
            row = tx.fetchone(
                "INSERT INTO models (name, framework, created_by, created_at, description,"
                " high_stakes, gates_json) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING model_id",
                (
                    name,
                    framework,
                    actor.subject,
                    now_iso(),
                    description,
                    int(high_stakes),
                    _json(list(gates)),
                ),
            )
            assert row is not None
            self._audit(
                tx,
                row[0],
                None,
                actor,
                "model.create",
                {"high_stakes": high_stakes, "gates": [msgspec.to_builtins(g) for g in gates]},
            )
        return self.get_model(name)

    def update_model(
        self,
        name: str,
        *,
        actor: Principal,
        description: str | None = None,
        high_stakes: bool | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Model:
        """Change a model's promotion policy; audited, since it changes what may ship."""
        require_role(actor, "admin", "changing a model's promotion policy")
        if gates is not None:
            validate_gates(gates)
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            changes: dict[str, Any] = {}
            if description is not None:
                tx.execute(
                    "UPDATE models SET description = ? WHERE model_id = ?", (description, model[0])
                )
                changes["description"] = description
            if high_stakes is not None:
                tx.execute(
                    "UPDATE models SET high_stakes = ? WHERE model_id = ?",
                    (int(high_stakes), model[0]),
                )
                changes["high_stakes"] = high_stakes
            if gates is not None:
                tx.execute(
                    "UPDATE models SET gates_json = ? WHERE model_id = ?",
                    (_json(list(gates)), model[0]),
                )
                changes["gates"] = [msgspec.to_builtins(g) for g in gates]
            self._audit(tx, model[0], None, actor, "model.update", changes)
        return self.get_model(name)

    # -- registration -------------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        actor: Principal,
        serving_artifact: bytes | str | Path | None,
        native_artifact: bytes | str | Path | None = None,
        native_format: str = "",
        framework: str,
        framework_version: str = "",
        metrics: Mapping[str, float] | None = None,
        evaluations: Mapping[str, Mapping[str, float]] | None = None,
        feature_store_version: Sequence[str] = (),
        training_dataset_ref: str = "",
        signature: Signature | None = None,
        run_id: str = "",
        tags: Mapping[str, str] | None = None,
        serving_spec: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store the artifacts and record a new version; its number is the model's next one.

        Creates the model on first registration. Artifacts are written before the transaction
        and removed again if it fails, so a failed registration leaves nothing behind.
        """
        require_role(actor, "publisher", "registering a model version")
        _check_name("model", name)
        if serving_artifact is None and native_artifact is None:
            raise InvalidArgumentError(
                f"registering {name!r} needs an artifact: the serving one (ONNX) and/or the "
                "framework-native one"
            )
        if not framework:
            raise InvalidArgumentError("registering a version needs its framework (e.g. 'sklearn')")
        metric_values = _check_metrics("metric", metrics or {})
        eval_values = {
            str(ds): _check_metrics(f"evaluation metric on {ds!r}", m)
            for ds, m in (evaluations or {}).items()
        }
        groups = list(dict.fromkeys(feature_store_version))
        bad = [g for g in groups if not _FEATURE_GROUP_VERSION.match(g)]
        if bad:
            raise InvalidArgumentError(
                f"feature group versions must look like 'group:version' (e.g. 'trips:3'); got {bad}"
            )
        tag_values = {str(k): str(v) for k, v in (tags or {}).items()}
        spec = dict(serving_spec or {})
        signature = signature or Signature()

        written: list[StoredArtifact] = []
        try:
            serving = None
            native = None
            if serving_artifact is not None:
                serving = self.artifacts.put(name, "model", serving_artifact, suffix=".onnx")
                written.append(serving)
            if native_artifact is not None:
                suffix = f".{native_format}" if native_format else ""
                native = self.artifacts.put(name, "native", native_artifact, suffix=suffix)
                written.append(native)
            with self.db.transaction() as tx:
                now = now_iso()
                # The row lock taken by this UPDATE orders concurrent registrations of one
                # model; the counter rolls back with a failed transaction, so no gaps.
                bump = (
                    "UPDATE models SET last_version = last_version + 1 WHERE name = ?"
                    " RETURNING model_id, last_version"
                )
                row = tx.fetchone(bump, (name,))
                if row is None:  # first version: create the model (racing creators are fine)
                    tx.execute(
                        "INSERT INTO models (name, framework, created_by, created_at)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                        (name, framework, actor.subject, now),
                    )
                    row = tx.fetchone(bump, (name,))
                assert row is not None
                model_id, number = row
                vrow = tx.fetchone(
                    "INSERT INTO model_versions (model_id, version_number, metrics_json,"
                    " evaluations_json, feature_store_version, training_dataset_ref, framework,"
                    " framework_version, artifact_path, artifact_sha256, artifact_size,"
                    " native_artifact_path, native_artifact_sha256, native_artifact_size,"
                    " native_format, signature_json, tags_json, status, created_by, created_at,"
                    " run_id, serving_spec_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                    " ?, ?, ?, ?, 'STAGING', ?, ?, ?, ?) RETURNING version_id",
                    (
                        model_id,
                        number,
                        _json(metric_values),
                        _json(eval_values),
                        _json(groups),
                        training_dataset_ref,
                        framework,
                        framework_version,
                        serving.path if serving else "",
                        serving.sha256 if serving else "",
                        serving.size if serving else 0,
                        native.path if native else "",
                        native.sha256 if native else "",
                        native.size if native else 0,
                        native_format,
                        _json(signature),
                        _json(tag_values),
                        actor.subject,
                        now,
                        run_id,
                        _json(spec),
                    ),
                )
                assert vrow is not None
                version_id = vrow[0]
                if groups:
                    tx.execute(
                        "INSERT INTO version_feature_groups (version_id, feature_group_version)"
                        " VALUES " + ", ".join("(?, ?)" for _ in groups),
                        [x for g in groups for x in (version_id, g)],
                    )
                self._audit(
                    tx,
                    model_id,
                    version_id,
                    actor,
                    "version.register",
                    {"version": number, "status": "STAGING", "run_id": run_id},
                )
        except BaseException:
            for art in written:
                self.artifacts.delete(art.path)
            raise
        return ModelVersion(
            version_id=version_id,
            model=name,
            version=number,
            status="STAGING",
            metrics=metric_values,
            evaluations=eval_values,
            framework=framework,
            framework_version=framework_version,
            feature_store_version=groups,
            training_dataset_ref=training_dataset_ref,
            signature=signature,
            run_id=run_id,
            tags=tag_values,
            artifact_path=serving.path if serving else "",
            artifact_sha256=serving.sha256 if serving else "",
            native_artifact_path=native.path if native else "",
            native_artifact_sha256=native.sha256 if native else "",
            native_format=native_format,
            created_by=actor.subject,
            created_at=now,
            serving_spec=spec,
        )

    def load_artifact(
        self, name: str, version: int, kind: Literal["serving", "native"] = "serving"
    ) -> bytes:
        """A version's artifact bytes, refused if they no longer match the recorded sha256."""
        v = self.get_version(name, version)
        path, digest = (
            (v.artifact_path, v.artifact_sha256)
            if kind == "serving"
            else (v.native_artifact_path, v.native_artifact_sha256)
        )
        if not path:
            raise NotFoundError(f"model {name!r} version {version} has no {kind} artifact")
        return self.artifacts.load(path, digest, what=f"{kind} artifact of {name!r} v{version}")

    def record_evaluation(
        self,
        name: str,
        version: int,
        dataset: str,
        metrics: Mapping[str, float],
        *,
        actor: Principal,
    ) -> ModelVersion:
        """Record metrics of a version on a named evaluation dataset (what gates read)."""
        require_role(actor, "publisher", "recording evaluation metrics")
        return self._record_evaluation(name, version, dataset, metrics, actor)

    def _record_evaluation(
        self,
        name: str,
        version: int,
        dataset: str,
        metrics: Mapping[str, float],
        actor: Principal,
    ) -> ModelVersion:
        if not dataset:
            raise InvalidArgumentError("an evaluation needs the name of its dataset")
        values = _check_metrics(f"evaluation metric on {dataset!r}", metrics)
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            v = self._version(self._version_row(tx, model, version))
            evals = {**v.evaluations, dataset: {**v.evaluations.get(dataset, {}), **values}}
            tx.execute(
                "UPDATE model_versions SET evaluations_json = ? WHERE version_id = ?",
                (_json(evals), v.version_id),
            )
            self._audit(
                tx,
                model[0],
                v.version_id,
                actor,
                "version.evaluate",
                {"version": version, "dataset": dataset, "metrics": values},
            )
        return self.get_version(name, version)

    # -- lifecycle ----------------------------------------------------------------------------

    def approve(self, name: str, version: int, *, actor: Principal, comment: str = "") -> Approval:
        """Sign off a version of a high-stakes model for promotion (approver role only)."""
        require_role(actor, "approver", "approving a promotion")
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            v = self._version(self._version_row(tx, model, version))
            if v.status != "STAGING":
                raise FailedPreconditionError(
                    f"model {name!r} version {version} is {v.status}; only STAGING versions "
                    "can be approved"
                )
            if (
                tx.fetchone(
                    "SELECT 1 FROM approvals WHERE version_id = ? AND approver = ?",
                    (v.version_id, actor.subject),
                )
                is not None
            ):
                raise AlreadyExistsError(
                    f"{actor.subject!r} already approved model {name!r} version {version}"
                )
            now = now_iso()
            tx.execute(
                "INSERT INTO approvals (version_id, approver, comment, created_at)"
                " VALUES (?, ?, ?, ?)",
                (v.version_id, actor.subject, comment, now),
            )
            self._audit(
                tx,
                model[0],
                v.version_id,
                actor,
                "version.approve",
                {"version": version, "comment": comment},
            )
        return Approval(
            model=name, version=version, approver=actor.subject, comment=comment, created_at=now
        )

    def approvals(self, name: str, version: int) -> list[Approval]:
        """Sign-offs recorded for a version, oldest first."""
        with self.db.transaction() as tx:
            model = self._model_row(tx, name)
            v = self._version_row(tx, model, version)
            rows = tx.fetchall(
                "SELECT approver, comment, created_at FROM approvals WHERE version_id = ?"
                " ORDER BY approval_id",
                (v[0],),
            )
        return [
            Approval(model=name, version=version, approver=r[0], comment=r[1], created_at=r[2])
            for r in rows
        ]

    def promote(self, name: str, version: int, *, actor: Principal) -> PromotionResult:
        """Run the gates (and approval check) and make ``version`` the one PRODUCTION version.

        The previous PRODUCTION version is archived in the same transaction. A refused promotion
        still records its gate results and a ``version.promote_refused`` audit entry, then
        raises ``FailedPreconditionError`` saying which check failed.
        """
        require_role(actor, "deployer", "promoting a version")
        self._run_evaluator(name, version, actor)
        refused: FailedPreconditionError | None = None
        archived: int | None = None
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            # The candidate and the current production version in one round trip.
            rows = [
                self._version(r)
                for r in tx.fetchall(
                    f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m"
                    " ON m.model_id = v.model_id WHERE v.model_id = ?"
                    " AND (v.version_number = ? OR v.status = 'PRODUCTION')",
                    (model[0], version),
                )
            ]
            found = [r for r in rows if r.version == version]
            if not found:
                self._version_row(tx, model, version)  # raises NotFoundError with the hint
            v = found[0]
            if v.status != "STAGING":
                what = (
                    "it is already the PRODUCTION version"
                    if v.status == "PRODUCTION"
                    else "archived versions cannot return; register a new version"
                )
                raise FailedPreconditionError(
                    f"cannot promote model {name!r} version {version}: {what}"
                )
            prod_rows = [r for r in rows if r.status == "PRODUCTION"]
            prod = prod_rows[0] if prod_rows else None
            gates = _gates_decoder.decode(model[3])
            results = evaluate_gates(
                gates,
                v.evaluations,
                prod.evaluations if prod else None,
                production_version=prod.version if prod else None,
            )
            now = now_iso()
            if results:
                tx.execute(
                    "INSERT INTO gate_results (version_id, gate, dataset, metric, value,"
                    " reference, passed, detail, evaluated_by, evaluated_at) VALUES "
                    + ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" for _ in results),
                    [
                        x
                        for r in results
                        for x in (
                            v.version_id,
                            r.gate,
                            r.dataset,
                            r.metric,
                            r.value,
                            r.reference,
                            int(r.passed),
                            r.detail,
                            actor.subject,
                            now,
                        )
                    ],
                )
            failed = [r for r in results if not r.passed]
            reasons = [r.detail for r in failed]
            approvers: list[str] = []
            if model[2]:
                approvers = [
                    r[0]
                    for r in tx.fetchall(
                        "SELECT approver FROM approvals WHERE version_id = ? ORDER BY approval_id",
                        (v.version_id,),
                    )
                ]
                if not approvers:
                    reasons.append(
                        f"model {name!r} is high-stakes: version {version} needs an approval "
                        "from a user with the 'approver' role (carrara models approve "
                        f"{name} {version})"
                    )
            if reasons:
                self._audit(
                    tx,
                    model[0],
                    v.version_id,
                    actor,
                    "version.promote_refused",
                    {
                        "version": version,
                        "reasons": reasons,
                        "gates": [msgspec.to_builtins(r) for r in results],
                    },
                )
                refused = FailedPreconditionError(
                    f"promotion of model {name!r} version {version} refused: " + "; ".join(reasons)
                )
            else:
                entries: list[tuple[int | None, Mapping[str, Any]]] = []
                if prod is not None:
                    # Archive first: the partial unique index allows one PRODUCTION row.
                    tx.execute(
                        "UPDATE model_versions SET status = 'ARCHIVED', archived_at = ?"
                        " WHERE version_id = ?",
                        (now, prod.version_id),
                    )
                    archived = prod.version
                    entries.append(
                        (
                            prod.version_id,
                            {
                                "version": prod.version,
                                "from": "PRODUCTION",
                                "to": "ARCHIVED",
                                "replaced_by": version,
                            },
                        )
                    )
                tx.execute(
                    "UPDATE model_versions SET status = 'PRODUCTION', promoted_at = ?,"
                    " promoted_by = ? WHERE version_id = ?",
                    (now, actor.subject, v.version_id),
                )
                entries.append(
                    (
                        v.version_id,
                        {
                            "version": version,
                            "from": "STAGING",
                            "to": "PRODUCTION",
                            "gates": [msgspec.to_builtins(r) for r in results],
                            "approvers": approvers,
                        },
                    )
                )
                self._audit_many(tx, model[0], actor, "version.status", entries)
        if refused is not None:
            raise refused
        promoted = msgspec.structs.replace(
            v, status="PRODUCTION", promoted_at=now, promoted_by=actor.subject
        )
        return PromotionResult(version=promoted, archived_version=archived, gate_results=results)

    def _run_evaluator(self, name: str, version: int, actor: Principal) -> None:
        if self.evaluator is None:
            return
        model = self.get_model(name)
        v = self.get_version(name, version)
        for ds in dict.fromkeys(g.dataset for g in model.gates):
            needed = {g.metric for g in model.gates if g.dataset == ds}
            if not needed <= set(v.evaluations.get(ds, {})):
                self._record_evaluation(name, version, ds, self.evaluator(v, ds), actor)

    def gate_results(self, name: str, version: int) -> list[GateResult]:
        """Every gate check run for a version (passed or not), oldest first."""
        with self.db.transaction() as tx:
            v = self._version_row(tx, self._model_row(tx, name), version)
            rows = tx.fetchall(
                "SELECT gate, dataset, metric, value, reference, passed, detail FROM gate_results"
                " WHERE version_id = ? ORDER BY gate_result_id",
                (v[0],),
            )
        return [
            GateResult(
                gate=r[0],
                dataset=r[1],
                metric=r[2],
                value=r[3],
                reference=r[4],
                passed=bool(r[5]),
                detail=r[6],
            )
            for r in rows
        ]

    def archive(self, name: str, version: int, *, actor: Principal) -> ModelVersion:
        """Retire a version; refused while the active deployment still routes to it."""
        require_role(actor, "deployer", "archiving a version")
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            v = self._version(self._version_row(tx, model, version))
            if v.status == "ARCHIVED":
                raise FailedPreconditionError(
                    f"model {name!r} version {version} is already archived"
                )
            active = self._active(tx, model[0])
            if active is not None and version in split_versions(active.traffic_split):
                raise FailedPreconditionError(
                    f"model {name!r} version {version} is in active deployment "
                    f"#{active.deployment_id}; deploy without it first"
                )
            tx.execute(
                "UPDATE model_versions SET status = 'ARCHIVED', archived_at = ?"
                " WHERE version_id = ?",
                (now_iso(), v.version_id),
            )
            self._audit(
                tx,
                model[0],
                v.version_id,
                actor,
                "version.status",
                {"version": version, "from": v.status, "to": "ARCHIVED"},
            )
        return self.get_version(name, version)

    # -- deployments --------------------------------------------------------------------------

    def _deployment(self, row: Sequence[Any], variants: list[Any]) -> Deployment:
        return Deployment(
            deployment_id=row[0],
            model=row[1],
            version=row[2],
            traffic_split=_split_decoder.decode(row[3]),
            variants=variants,
            serving_endpoint=row[4],
            created_by=row[5],
            created_at=row[6],
            is_active=bool(row[7]),
            rollback_of=row[8],
        )

    def _deployments(self, tx: Transaction, where: str, params: Sequence[Any]) -> list[Deployment]:
        rows = tx.fetchall(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d JOIN models m"
            " ON m.model_id = d.model_id JOIN model_versions v ON v.version_id = d.version_id"
            f" WHERE {where} ORDER BY d.deployment_id",
            params,
        )
        out = []
        for r in rows:
            split = _split_decoder.decode(r[3])
            out.append(
                self._deployment(
                    r, deployed_variants(split, self._artifact_map(tx, r[1], split_versions(split)))
                )
            )
        return out

    def _artifact_map(self, tx: Transaction, name: str, versions: list[int]) -> dict[int, Served]:
        if not versions:
            return {}
        marks = ", ".join("?" for _ in versions)
        rows = tx.fetchall(
            "SELECT v.version_number, v.artifact_path, v.artifact_sha256, v.serving_spec_json"
            " FROM model_versions v JOIN models m ON m.model_id = v.model_id"
            f" WHERE m.name = ? AND v.version_number IN ({marks})",
            [name, *versions],
        )
        return {r[0]: Served(r[1], r[2], _spec_decoder.decode(r[3])) for r in rows}

    def _active(self, tx: Transaction, model_id: int) -> Deployment | None:
        found = self._deployments(tx, "d.model_id = ? AND d.is_active = 1", (model_id,))
        return found[0] if found else None

    def deploy(
        self,
        name: str,
        version: int,
        split: TrafficSplit | None = None,
        *,
        actor: Principal,
        serving_endpoint: str = "",
        prepare: Callable[[Deployment], None] | None = None,
    ) -> Deployment:
        """Make a traffic split the model's active deployment and publish it to gateways.

        Checked before anything is recorded: every version exists, none is archived, each has
        a serving artifact that matches its registered sha256, and on a high-stakes model every
        version taking live traffic (routed or fallback; shadows excepted) is PRODUCTION or
        approved. ``prepare`` (e.g. loading the model in an embedded gateway) runs before the
        commit; if it raises, nothing is recorded.
        """
        require_role(actor, "deployer", "deploying a model")
        split = split or default_split(version)
        validate_split(split, version)
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            path_version = self._version_row(tx, model, version)
            wanted = split_versions(split)
            marks = ", ".join("?" for _ in wanted)
            rows = tx.fetchall(
                "SELECT version_number, status, artifact_path, artifact_sha256, version_id"
                f" FROM model_versions WHERE model_id = ? AND version_number IN ({marks})",
                [model[0], *wanted],
            )
            found = {r[0]: r for r in rows}
            missing = [n for n in wanted if n not in found]
            if missing:
                raise NotFoundError(
                    f"the split names version(s) {missing} that model {name!r} does not have; "
                    f"latest is {model[4]}"
                )
            archived = [n for n in wanted if found[n][1] == "ARCHIVED"]
            if archived:
                raise FailedPreconditionError(
                    f"the split names archived version(s) {archived} of model {name!r}; "
                    "deploy STAGING or PRODUCTION versions"
                )
            no_serving = [n for n in wanted if not found[n][2]]
            if no_serving:
                raise FailedPreconditionError(
                    f"version(s) {no_serving} of model {name!r} have no serving (ONNX) artifact"
                )
            if model[2]:
                self._check_live_approvals(tx, name, split, found)
            for n in wanted:
                self.artifacts.verify(
                    found[n][2], found[n][3], what=f"serving artifact of {name!r} version {n}"
                )
            deployment = self._insert_deployment(
                tx,
                model,
                path_version[0],
                split,
                actor,
                serving_endpoint,
                rollback_of=None,
                action="deployment.create",
            )
            if prepare is not None:
                prepare(deployment)
        self.publish_pending()
        return deployment

    def _check_live_approvals(
        self, tx: Transaction, name: str, split: TrafficSplit, found: Mapping[int, Sequence[Any]]
    ) -> None:
        """On a high-stakes model, a version may take live traffic (routed, canary or
        fallback) only once PRODUCTION or approved; shadows see traffic but answer nobody."""
        live = {v.version for v in split.variants}
        if split.fallback is not None:
            live.add(split.fallback.version)
        staging = sorted(n for n in live if found[n][1] == "STAGING")
        if not staging:
            return
        marks = ", ".join("?" for _ in staging)
        approved = {
            r[0]
            for r in tx.fetchall(
                f"SELECT DISTINCT version_id FROM approvals WHERE version_id IN ({marks})",
                [found[n][4] for n in staging],
            )
        }
        missing = [n for n in staging if found[n][4] not in approved]
        if missing:
            raise FailedPreconditionError(
                f"model {name!r} is high-stakes: STAGING version(s) {missing} have no approval "
                "and may not take live traffic; have a user with the 'approver' role run "
                f"carrara models approve {name} {missing[0]}, or deploy them as shadows"
            )

    def _insert_deployment(
        self,
        tx: Transaction,
        model: tuple[Any, ...],
        version_id: int,
        split: TrafficSplit,
        actor: Principal,
        serving_endpoint: str,
        *,
        rollback_of: int | None,
        action: str,
    ) -> Deployment:
        previous = self._active(tx, model[0])
        if previous is not None:
            tx.execute(
                "UPDATE deployments SET is_active = 0 WHERE deployment_id = ?",
                (previous.deployment_id,),
            )
        row = tx.fetchone(
            "INSERT INTO deployments (model_id, version_id, traffic_split_json, serving_endpoint,"
            " created_by, created_at, is_active, previous_id, rollback_of)"
            " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) RETURNING deployment_id",
            (
                model[0],
                version_id,
                _json(split),
                serving_endpoint,
                actor.subject,
                now_iso(),
                previous.deployment_id if previous else None,
                rollback_of,
            ),
        )
        assert row is not None
        deployment = self._deployments(tx, "d.deployment_id = ?", (row[0],))[0]
        self._audit(
            tx,
            model[0],
            version_id,
            actor,
            action,
            {
                "deployment_id": row[0],
                "previous_id": previous.deployment_id if previous else None,
                "rollback_of": rollback_of,
                "traffic_split": msgspec.to_builtins(split),
            },
        )
        tx.execute(
            "INSERT INTO registry_outbox (topic, payload, created_at) VALUES (?, ?, ?)",
            (DEPLOYMENTS_TOPIC, _json(deployment), now_iso()),
        )
        return deployment

    def rollback(self, name: str, *, actor: Principal) -> Deployment:
        """Re-activate the deployment the active one replaced, as a new history entry.

        Its versions may have been archived since (a promotion archives the old production
        version); rolling back to them is allowed on purpose, since it is the emergency path.
        """
        require_role(actor, "deployer", "rolling back a deployment")
        with self.db.transaction() as tx:
            model = self._model_row(tx, name, lock=True)
            active = tx.fetchone(
                "SELECT deployment_id, previous_id FROM deployments"
                " WHERE model_id = ? AND is_active = 1",
                (model[0],),
            )
            if active is None or active[1] is None:
                raise FailedPreconditionError(
                    f"model {name!r} has no earlier deployment to roll back to"
                    + ("" if active else " (it is not deployed)")
                )
            target = tx.fetchone(
                "SELECT version_id, traffic_split_json, serving_endpoint FROM deployments"
                " WHERE deployment_id = ?",
                (active[1],),
            )
            assert target is not None
            deployment = self._insert_deployment(
                tx,
                model,
                target[0],
                _split_decoder.decode(target[1]),
                actor,
                target[2],
                rollback_of=active[0],
                action="deployment.rollback",
            )
        self.publish_pending()
        return deployment

    def active_deployment(self, name: str) -> Deployment | None:
        """The deployment gateways should be serving, or None."""
        with self.db.transaction() as tx:
            return self._active(tx, self._model_row(tx, name)[0])

    def deployments(self, name: str) -> list[Deployment]:
        """Every deployment of a model, oldest first (the history rollbacks walk)."""
        with self.db.transaction() as tx:
            return self._deployments(tx, "d.model_id = ?", (self._model_row(tx, name)[0],))

    def publish_pending(self) -> int:
        """Send deployment events not yet on the event log; returns how many were sent.

        Events are written in the deployment's transaction (an outbox) and sent after it
        commits, so a crash or an event-log outage delays them but never loses them.
        """
        if self.events is None:
            return 0
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                "SELECT event_id, topic, payload FROM registry_outbox WHERE published_at IS NULL"
                " ORDER BY event_id"
            )
        sent = 0
        for event_id, topic, payload in rows:
            try:
                self.events.append(topic, payload.encode())
            except Exception as exc:
                raise UnavailableError(
                    f"event {event_id} on topic {topic!r} is recorded but not yet published "
                    f"({exc}); gateways will see it once the event log is back — retry with "
                    "publish_pending() (carrara models publish)"
                ) from exc
            with self.db.transaction() as tx:
                tx.execute(
                    "UPDATE registry_outbox SET published_at = ? WHERE event_id = ?",
                    (now_iso(), event_id),
                )
            sent += 1
        return sent

    # -- lineage and audit --------------------------------------------------------------------

    def lineage(self, name: str, version: int) -> Lineage:
        """What produced a version: dataset snapshot, feature group versions, training run."""
        v = self.get_version(name, version)
        return Lineage(
            model=v.model,
            version=v.version,
            training_dataset_ref=v.training_dataset_ref,
            feature_group_versions=v.feature_store_version,
            run_id=v.run_id,
            framework=v.framework,
            framework_version=v.framework_version,
        )

    def versions_using(self, feature_group_version: str) -> list[ModelVersion]:
        """Every model version trained on a feature group version (``"trips:3"``)."""
        if not _FEATURE_GROUP_VERSION.match(feature_group_version):
            raise InvalidArgumentError(
                f"feature group version must look like 'group:version' (e.g. 'trips:3'); "
                f"got {feature_group_version!r}"
            )
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {_VERSION_COLUMNS} FROM version_feature_groups f"
                " JOIN model_versions v ON v.version_id = f.version_id"
                " JOIN models m ON m.model_id = v.model_id"
                " WHERE f.feature_group_version = ? ORDER BY m.name, v.version_number",
                (feature_group_version,),
            )
        return [self._version(r) for r in rows]

    def versions_from_dataset(self, training_dataset_ref: str) -> list[ModelVersion]:
        """Every model version trained on a dataset snapshot."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m"
                " ON m.model_id = v.model_id WHERE v.training_dataset_ref = ?"
                " ORDER BY m.name, v.version_number",
                (training_dataset_ref,),
            )
        return [self._version(r) for r in rows]

    def _audit(
        self,
        tx: Transaction,
        model_id: int | None,
        version_id: int | None,
        actor: Principal,
        action: str,
        detail: Mapping[str, Any],
    ) -> None:
        tx.execute(
            "INSERT INTO audit_log (model_id, version_id, actor, action, detail_json, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                model_id,
                version_id,
                actor.subject,
                action,
                json.dumps(detail, sort_keys=True),
                now_iso(),
            ),
        )

    def _audit_many(
        self,
        tx: Transaction,
        model_id: int,
        actor: Principal,
        action: str,
        entries: Sequence[tuple[int | None, Mapping[str, Any]]],
    ) -> None:
        # One multi-row INSERT: fewer round trips on the promotion path.
        now = now_iso()
        tx.execute(
            "INSERT INTO audit_log (model_id, version_id, actor, action, detail_json, created_at)"
            " VALUES " + ", ".join("(?, ?, ?, ?, ?, ?)" for _ in entries),
            [
                x
                for version_id, detail in entries
                for x in (
                    model_id,
                    version_id,
                    actor.subject,
                    action,
                    json.dumps(detail, sort_keys=True),
                    now,
                )
            ],
        )

    def audit(self, name: str | None = None, *, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries, oldest first, for one model or for everything."""
        with self.db.transaction() as tx:
            sql = (
                "SELECT a.audit_id, m.name, v.version_number, a.actor, a.action, a.detail_json,"
                " a.created_at FROM audit_log a LEFT JOIN models m ON m.model_id = a.model_id"
                " LEFT JOIN model_versions v ON v.version_id = a.version_id"
            )
            params: list[Any] = []
            if name is not None:
                sql += " WHERE a.model_id = ?"
                params.append(self._model_row(tx, name)[0])
            rows = tx.fetchall(sql + " ORDER BY a.audit_id LIMIT ?", [*params, limit])
        return [
            AuditEntry(
                audit_id=r[0],
                model=r[1],
                version=r[2],
                actor=r[3],
                action=r[4],
                detail=json.loads(r[5]),
                created_at=r[6],
            )
            for r in rows
        ]
