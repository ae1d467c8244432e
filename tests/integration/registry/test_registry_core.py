"""Registration, lookups, artifacts and lineage on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from carrara.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from carrara.registry import ArtifactIntegrityError, ModelRegistry, Signature, TensorSpec
from carrara.registry.migrations import COMPONENT, MIGRATIONS, upgrade
from carrara.sql import connect

from .conftest import ONNX_BYTES, PUBLISHER, READER, register, snapshot


def test_upgrade_applies_each_migration_once(db_url: str) -> None:
    assert upgrade(db_url) == [m.id for m in MIGRATIONS]
    assert upgrade(db_url) == []


def test_upgrade_keeps_data_written_under_an_older_schema(db_url: str, tmp_path: Path) -> None:
    with connect(db_url) as db:
        assert db.migrate(COMPONENT, MIGRATIONS[:1]) == ["0001_initial"]
        with db.transaction() as tx:
            tx.execute(
                "INSERT INTO models (name, created_by, created_at, last_version)"
                " VALUES ('old', 'x', '2026-01-01', 1)"
            )
            tx.execute(
                "INSERT INTO model_versions (model_id, version_number, created_by, created_at)"
                " SELECT model_id, 1, 'x', '2026-01-01' FROM models"
            )
    assert upgrade(db_url) == [m.id for m in MIGRATIONS[1:]]
    with ModelRegistry.open(db_url, tmp_path / "a") as reg:
        old = reg.get_version("old", 1)
        assert (old.status, old.serving_spec) == ("STAGING", {})
        assert register(reg, "old", serving_spec={"k": 1}).serving_spec == {"k": 1}
        assert reg.get_version("old", 2).serving_spec == {"k": 1}


def test_register_records_everything_that_produced_the_version(registry: ModelRegistry) -> None:
    sig = Signature(
        inputs=[TensorSpec("x", "float32", [-1, 4])], outputs=[TensorSpec("p", "float32", [-1, 1])]
    )
    v = register(
        registry,
        native_artifact=b"native-pickle",
        native_format="pkl",
        metrics={"auc": 0.91, "loss": 0.2},
        evaluations={"holdout-2024": {"auc": 0.9}},
        feature_store_version=["trips:3", "drivers:1"],
        training_dataset_ref="s3://datasets/fraud@snap-42",
        signature=sig,
        run_id="job-17",
        tags={"team": "risk"},
    )
    assert (v.model, v.version, v.status) == ("fraud", 1, "STAGING")
    got = registry.get_version("fraud", 1)
    assert got == v
    assert got.metrics == {"auc": 0.91, "loss": 0.2}
    assert got.evaluations == {"holdout-2024": {"auc": 0.9}}
    assert got.feature_store_version == ["trips:3", "drivers:1"]
    assert got.signature == sig
    assert (got.framework, got.framework_version, got.run_id) == ("sklearn", "1.5.0", "job-17")
    assert got.tags == {"team": "risk"}
    assert got.artifact_sha256 == hashlib.sha256(ONNX_BYTES).hexdigest()
    assert got.native_artifact_sha256 == hashlib.sha256(b"native-pickle").hexdigest()
    assert registry.load_artifact("fraud", 1) == ONNX_BYTES
    assert registry.load_artifact("fraud", 1, "native") == b"native-pickle"
    assert register(registry).version == 2
    assert [m.name for m in registry.list_models()] == ["fraud"]
    assert registry.get_model("fraud").latest_version == 2


def test_register_from_a_file_path(registry: ModelRegistry, tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    payload = os.urandom(3 * (1 << 20) + 7)  # spans several copy chunks
    src.write_bytes(payload)
    v = register(registry, serving_artifact=src)
    assert v.artifact_sha256 == hashlib.sha256(payload).hexdigest()
    assert registry.load_artifact("fraud", v.version) == payload


def test_tampered_artifact_is_refused_at_load(registry: ModelRegistry) -> None:
    v = register(registry)
    path = Path(v.artifact_path)
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # written read-only
    path.chmod(0o644)
    path.write_bytes(ONNX_BYTES + b"evil")
    with pytest.raises(ArtifactIntegrityError, match="fails its integrity check") as exc:
        registry.load_artifact("fraud", v.version)
    assert v.artifact_sha256 in str(exc.value)
    assert hashlib.sha256(ONNX_BYTES + b"evil").hexdigest() in str(exc.value)


def test_unknown_model_and_version_errors_say_what_exists(registry: ModelRegistry) -> None:
    with pytest.raises(NotFoundError, match="no models yet"):
        registry.get_version("fraud", 1)
    register(registry)
    register(registry)
    with pytest.raises(NotFoundError, match="model 'fraud' has no version 7; latest is 2"):
        registry.get_version("fraud", 7)
    with pytest.raises(NotFoundError, match="known: fraud"):
        registry.get_model("churn")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"serving_artifact": None}, "needs an artifact"),
        ({"framework": ""}, "framework"),
        ({"metrics": {"auc": float("nan")}}, "finite"),
        ({"feature_store_version": ["trips"]}, "group:version"),
    ],
)
def test_bad_registration_changes_nothing(
    registry: ModelRegistry, kw: dict[str, object], message: str
) -> None:
    register(registry)
    before = snapshot(registry)
    files_before = sorted(p for p in Path(registry.artifacts.root).rglob("*"))
    with pytest.raises(InvalidArgumentError, match=message):
        register(registry, **kw)
    assert snapshot(registry) == before
    assert sorted(p for p in Path(registry.artifacts.root).rglob("*")) == files_before


def test_reader_cannot_register(registry: ModelRegistry) -> None:
    before = snapshot(registry)
    with pytest.raises(PermissionDeniedError, match="role 'publisher'"):
        register(registry, actor=READER)
    assert snapshot(registry) == before


def test_lineage_both_ways(registry: ModelRegistry) -> None:
    register(
        registry, feature_store_version=["trips:3"], training_dataset_ref="snap-1", run_id="j1"
    )
    register(registry, feature_store_version=["trips:4", "drivers:1"], run_id="j2")
    register(registry, "eta", feature_store_version=["trips:3", "drivers:1"], run_id="j3")
    lin = registry.lineage("fraud", 1)
    assert (lin.training_dataset_ref, lin.feature_group_versions, lin.run_id) == (
        "snap-1",
        ["trips:3"],
        "j1",
    )
    assert [(v.model, v.version) for v in registry.versions_using("trips:3")] == [
        ("eta", 1),
        ("fraud", 1),
    ]
    assert [(v.model, v.version) for v in registry.versions_using("drivers:1")] == [
        ("eta", 1),
        ("fraud", 2),
    ]
    assert registry.versions_using("trips:9") == []
    assert [(v.model, v.version) for v in registry.versions_from_dataset("snap-1")] == [
        ("fraud", 1)
    ]


def test_failed_transaction_removes_its_artifacts(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(registry)
    files_before = sorted(Path(registry.artifacts.root).rglob("*"))

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(registry, "_audit", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        register(registry)
    assert sorted(Path(registry.artifacts.root).rglob("*")) == files_before
    assert registry.get_model("fraud").latest_version == 1
    _ = PUBLISHER


def test_missing_artifact_file_changes_nothing(registry: ModelRegistry, tmp_path: Path) -> None:
    register(registry)
    before = snapshot(registry)
    files = sorted(Path(registry.artifacts.root).rglob("*"))
    with pytest.raises(NotFoundError, match=r"nope\.onnx does not exist"):
        register(registry, serving_artifact=tmp_path / "nope.onnx")
    assert snapshot(registry) == before
    assert sorted(Path(registry.artifacts.root).rglob("*")) == files
