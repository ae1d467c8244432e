"""The artifact store (local folder and an fsspec object store) and the token store."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec  # type: ignore[import-untyped,unused-ignore]
import pytest

from carrara.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from carrara.registry import ArtifactIntegrityError, ArtifactStore, TokenStore
from carrara.registry.auth import require_role
from carrara.registry.migrations import migrate
from carrara.sql import Database, connect


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield ArtifactStore(tmp_path / "artifacts")
        return
    root = f"memory://carrara-test-{uuid.uuid4().hex}"
    yield ArtifactStore(root)
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_put_and_load_verify_sha256(store: ArtifactStore) -> None:
    data = b"model bytes" * 1000
    a = store.put("fraud", "model", data, suffix=".onnx")
    b = store.put("fraud", "model", data, suffix=".onnx")
    assert a.sha256 == hashlib.sha256(data).hexdigest() and a.size == len(data)
    assert a.path != b.path  # never overwrites an earlier artifact
    assert store.load(a.path, a.sha256) == data


def test_changed_bytes_are_refused(store: ArtifactStore) -> None:
    a = store.put("fraud", "model", b"original")
    fs, path = fsspec.core.url_to_fs(a.path)
    if isinstance(store.root, str) and "://" not in store.root:
        Path(a.path).chmod(0o644)
    with fs.open(path, "wb") as fh:
        fh.write(b"0riginal")
    with pytest.raises(ArtifactIntegrityError, match="registered " + a.sha256):
        store.load(a.path, a.sha256)


def test_missing_artifact(store: ArtifactStore) -> None:
    a = store.put("fraud", "model", b"x")
    store.delete(a.path)
    with pytest.raises(NotFoundError, match="missing from the artifact store"):
        store.load(a.path, a.sha256)


def test_local_artifacts_are_read_only(tmp_path: Path) -> None:
    a = ArtifactStore(tmp_path).put("m", "model", b"x")
    assert Path(a.path).stat().st_mode & 0o222 == 0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with connect(f"sqlite:///{tmp_path / 'r.db'}") as database:
        migrate(database)
        yield database


def test_tokens_are_stored_hashed_and_carry_roles(db: Database) -> None:
    tokens = TokenStore(db)
    secret = tokens.create("bob", ["approver"])
    with db.transaction() as tx:
        stored = tx.fetchall("SELECT token_sha256 FROM api_tokens")
    assert stored == [(hashlib.sha256(secret.encode()).hexdigest(),)]
    who = tokens.authenticate(secret)
    assert who.subject == "bob" and who.has("approver") and not who.has("deployer")
    require_role(who, "approver", "approving")
    with pytest.raises(PermissionDeniedError):
        require_role(who, "publisher", "registering")
    admin = tokens.authenticate(tokens.create("root", ["admin"]))
    assert admin.has("deployer") and admin.has("publisher") and not admin.has("approver")
    with pytest.raises(UnauthenticatedError, match="unknown bearer token"):
        tokens.authenticate(secret + "x")
    tokens.revoke(tokens.list()[0].token_id)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        tokens.authenticate(secret)
    with pytest.raises(InvalidArgumentError, match="unknown role"):
        tokens.create("eve", ["superuser"])
    with db.transaction() as tx:
        actions = [r[0] for r in tx.fetchall("SELECT action FROM audit_log ORDER BY audit_id")]
    assert actions == ["token.create", "token.create", "token.revoke"]


def test_registry_on_an_object_store(tmp_path: Path) -> None:
    from carrara.registry import ModelRegistry, Principal

    root = f"memory://carrara-test-{uuid.uuid4().hex}"
    who = Principal("ci", frozenset({"admin"}))
    try:
        with ModelRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", root) as reg:
            v = reg.register("m", actor=who, serving_artifact=b"onnx", framework="torch")
            assert v.artifact_path.startswith(root + "/m/")
            assert reg.load_artifact("m", 1) == b"onnx"
            with fsspec.open(v.artifact_path, "wb") as fh:
                fh.write(b"other")
            with pytest.raises(ArtifactIntegrityError):
                reg.load_artifact("m", 1)
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
