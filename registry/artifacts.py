"""The artifact store: model files kept by content hash, immutable once written.

A local folder or any fsspec URL (``s3://bucket/prefix``, ``memory://...``) holds each version's
serving artifact (ONNX) and framework-native artifact. The sha256 is computed while writing,
recorded by the registry, and checked again on every load, so a changed file is refused.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import fsspec  # type: ignore[import-untyped,unused-ignore]

from carrara.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from carrara.storage import publish_bytes, publish_file, refresh

__all__ = ["ArtifactIntegrityError", "ArtifactStore", "StoredArtifact", "sha256_bytes"]

_CHUNK = 1 << 20


class ArtifactIntegrityError(FailedPreconditionError):
    """An artifact's bytes no longer match the sha256 recorded when it was registered."""


class StoredArtifact:
    """Where an artifact was written, its sha256 and size."""

    __slots__ = ("path", "sha256", "size")

    def __init__(self, path: str, sha256: str, size: int) -> None:
        self.path = path
        self.sha256 = sha256
        self.size = size


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _copy(data: bytes | str | Path, out: _Sink) -> tuple[str, int]:
    """Write ``data`` (bytes or a file's contents) to ``out``; returns (sha256, size)."""
    digest = hashlib.sha256()
    if isinstance(data, bytes):
        digest.update(data)
        out.write(data)
        return digest.hexdigest(), len(data)
    size = 0
    with open(data, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class _Discard:
    """A sink that keeps nothing (:func:`_copy` hashing a file that is uploaded by path)."""

    def write(self, data: bytes, /) -> int:
        return len(data)


class ArtifactStore:
    """Write-once artifact files under ``root`` (a folder or an fsspec URL)."""

    def __init__(self, root: str | Path) -> None:
        root = str(root)
        self._local = "://" not in root or root.startswith("file://")
        if self._local:
            root = os.path.abspath(root.removeprefix("file://"))
            Path(root).mkdir(parents=True, exist_ok=True)
        self.root = root.rstrip("/")
        self._fs: Any
        self._fs, _ = fsspec.core.url_to_fs(self.root)

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def put(
        self, model: str, kind: str, data: bytes | str | Path, *, suffix: str = ""
    ) -> StoredArtifact:
        """Store ``data`` (bytes or a local file path) as a new artifact of ``model``.

        Each call writes a fresh path (a uuid name), so nothing registered is overwritten;
        local files are read-only and fsynced before the registry commits a row naming them.
        """
        if not isinstance(data, bytes) and not os.path.isfile(data):
            raise NotFoundError(f"artifact file {data} does not exist")
        # Flat under the model's folder: no folder per artifact, which would cost a directory
        # creation on every registration.
        path = self._join(model, f"{uuid.uuid4().hex}-{kind}{suffix}")
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # O_EXCL never touches an existing file; read-only from the moment it exists.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            with open(fd, "wb") as out:
                digest, size = _copy(data, out)
                out.flush()
                os.fsync(out.fileno())
        else:
            if self._fs.exists(path):  # pragma: no cover - uuid collision
                raise AlreadyExistsError(f"artifact {path} exists; artifacts are immutable")
            # Published whole (one PUT or a completed multipart upload): a streamed write that
            # failed midway would otherwise leave a partial object under the final name.
            if isinstance(data, bytes):
                digest, size = sha256_bytes(data), len(data)
                publish_bytes(self._fs, path, data)
            else:
                digest, size = _copy(data, _Discard())
                publish_file(self._fs, data, path)
        return StoredArtifact(path, digest, size)

    def load(self, path: str, sha256: str, *, what: str = "artifact") -> bytes:
        """Read an artifact and check it against its recorded sha256."""
        refresh(self._fs, path)  # written by another process after a listing was cached
        try:
            with self._fs.open(path, "rb") as src:
                data: bytes = src.read()
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"{what} {path} is missing from the artifact store; restore it or register "
                "a new version"
            ) from exc
        actual = sha256_bytes(data)
        if actual != sha256:
            raise ArtifactIntegrityError(
                f"{what} {path} fails its integrity check: sha256 is {actual}, registered "
                f"{sha256}; the file changed after registration, so it is refused — restore "
                "the original or register a new version"
            )
        return data

    def verify(self, path: str, sha256: str, *, what: str = "artifact") -> None:
        """Check an artifact against its recorded sha256 without holding it in memory (the
        registry does this at deploy time, so a tampered file is refused before it goes live)."""
        digest = hashlib.sha256()
        refresh(self._fs, path)
        try:
            with self._fs.open(path, "rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"{what} {path} is missing from the artifact store; restore it or register "
                "a new version"
            ) from exc
        if digest.hexdigest() != sha256:
            raise ArtifactIntegrityError(
                f"{what} {path} fails its integrity check: sha256 is {digest.hexdigest()}, "
                f"registered {sha256}; the file changed after registration, so it is refused — "
                "restore the original or register a new version"
            )

    def delete(self, path: str) -> None:
        """Remove an artifact written by a registration that did not commit."""
        try:
            if self._local:
                os.unlink(path)  # the folder's permissions allow it; the file is read-only
            else:
                self._fs.rm(path)
        except FileNotFoundError:
            pass
