"""Models and their versions: creating models, registering versions with their artifacts,
reading them back, and the lineage queries (which versions a dataset or feature group fed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from carrara.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from carrara.registry.artifacts import ArtifactStore, StoredArtifact
from carrara.registry.audit import AuditMixin
from carrara.registry.auth import Principal, require_role
from carrara.registry.gates import validate_gates
from carrara.registry.records import (
    FEATURE_GROUP_VERSION,
    MODEL_COLUMNS,
    VERSION_COLUMNS,
    check_metrics,
    check_name,
    model_from_row,
    model_row,
    to_json,
    version_from_row,
    version_row,
)
from carrara.registry.types import Gate, Lineage, Model, ModelVersion, Signature
from carrara.registry.util import now_iso

__all__ = ["ModelsMixin"]


class ModelsMixin(AuditMixin):
    """Model and version rows, registration and artifact loading, lineage queries."""

    artifacts: ArtifactStore

    # -- lookups ----------------------------------------------------------------------------

    def get_model(self, name: str) -> Model:
        """A model with its policy, latest and production version numbers."""
        with self.db.transaction() as tx:
            model_row(tx, name)
            row = tx.fetchone(f"SELECT {MODEL_COLUMNS} FROM models m WHERE m.name = ?", (name,))
        assert row is not None
        return model_from_row(row)

    def list_models(self) -> list[Model]:
        """Every model, by name."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(f"SELECT {MODEL_COLUMNS} FROM models m ORDER BY m.name")
        return [model_from_row(r) for r in rows]

    def get_version(self, name: str, version: int) -> ModelVersion:
        """One version; the error names the latest version when it does not exist."""
        with self.db.transaction() as tx:
            return version_from_row(version_row(tx, model_row(tx, name), version))

    def list_versions(self, name: str, *, status: str | None = None) -> list[ModelVersion]:
        """A model's versions in order, optionally only those in one status."""
        with self.db.transaction() as tx:
            model = model_row(tx, name)
            sql = (
                f"SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m"
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
        return [version_from_row(r) for r in rows]

    def version_for_run(self, name: str, run_id: str) -> ModelVersion | None:
        """The (first) version of model ``name`` registered by training run ``run_id``, or
        None (also when the model does not exist): lets a resumed job register only once."""
        if not run_id:
            raise InvalidArgumentError("version_for_run needs a run id")
        with self.db.transaction() as tx:
            row = tx.fetchone(
                f"SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m"
                " ON m.model_id = v.model_id WHERE m.name = ? AND v.run_id = ?"
                " ORDER BY v.version_number LIMIT 1",
                (name, run_id),
            )
        return version_from_row(row) if row is not None else None

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
        check_name("model", name)
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
                    to_json(list(gates)),
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
            model = model_row(tx, name, lock=True)
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
                    (to_json(list(gates)), model[0]),
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
        check_name("model", name)
        if serving_artifact is None and native_artifact is None:
            raise InvalidArgumentError(
                f"registering {name!r} needs an artifact: the serving one (ONNX) and/or the "
                "framework-native one"
            )
        if not framework:
            raise InvalidArgumentError("registering a version needs its framework (e.g. 'sklearn')")
        metric_values = check_metrics("metric", metrics or {})
        eval_values = {
            str(ds): check_metrics(f"evaluation metric on {ds!r}", m)
            for ds, m in (evaluations or {}).items()
        }
        groups = list(dict.fromkeys(feature_store_version))
        bad = [g for g in groups if not FEATURE_GROUP_VERSION.match(g)]
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
                        to_json(metric_values),
                        to_json(eval_values),
                        to_json(groups),
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
                        to_json(signature),
                        to_json(tag_values),
                        actor.subject,
                        now,
                        run_id,
                        to_json(spec),
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

    # -- lineage ----------------------------------------------------------------------------

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
        if not FEATURE_GROUP_VERSION.match(feature_group_version):
            raise InvalidArgumentError(
                f"feature group version must look like 'group:version' (e.g. 'trips:3'); "
                f"got {feature_group_version!r}"
            )
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {VERSION_COLUMNS} FROM version_feature_groups f"
                " JOIN model_versions v ON v.version_id = f.version_id"
                " JOIN models m ON m.model_id = v.model_id"
                " WHERE f.feature_group_version = ? ORDER BY m.name, v.version_number",
                (feature_group_version,),
            )
        return [version_from_row(r) for r in rows]

    def versions_from_dataset(self, training_dataset_ref: str) -> list[ModelVersion]:
        """Every model version trained on a dataset snapshot."""
        with self.db.transaction() as tx:
            rows = tx.fetchall(
                f"SELECT {VERSION_COLUMNS} FROM model_versions v JOIN models m"
                " ON m.model_id = v.model_id WHERE v.training_dataset_ref = ?"
                " ORDER BY m.name, v.version_number",
                (training_dataset_ref,),
            )
        return [version_from_row(r) for r in rows]
