"""Training checkpoints in the artifact store, so a job resumes where a dead worker stopped.

Layout: ``{artifact root}/checkpoints/{job_id}/{run}/epoch-{n:06d}.ckpt`` where ``run`` is
``main`` or ``trial-{k}`` for a hyperparameter-search trial. A preempted run's mid-epoch
checkpoint (``step`` optimizer steps into epoch ``n``, after epoch ``n - 1`` completed) is
``epoch-{n:06d}-step-{step:09d}.ckpt``; checkpoints order by (completed epoch, step), so it sorts
after epoch ``n - 1``'s and before epoch ``n``'s, and keep-N pruning counts it as one. One file
is::

    b"CRCKPT1\\n" | u32 big-endian header length | header (msgspec JSON) | trainer blob

The header holds the epoch, the early-stopping state and the blob's sha256 and size, so a torn
or corrupted file is recognised and skipped (:meth:`CheckpointStore.latest` falls back to the
newest intact one). Local files are written to a temp name, fsynced and renamed into place;
object stores (``s3://``, ``gs://``...) get one PUT of the final name, which appears whole or
not at all (:func:`carrara.storage.publish_bytes`). A search trial's final native model is kept
beside its checkpoints (``model.native``) so the best trial's model can be exported later.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import time
from typing import TYPE_CHECKING, Any

import fsspec  # type: ignore[import-untyped,unused-ignore]
import msgspec

from carrara.errors import InvalidArgumentError
from carrara.storage import publish_bytes, refresh

if TYPE_CHECKING:
    from carrara.registry.registry import ModelRegistry

__all__ = ["CheckpointHeader", "CheckpointStore", "StoredCheckpoint", "checkpoint_root"]

log = logging.getLogger(__name__)

MAGIC = b"CRCKPT1\n"
_LEN = struct.Struct(">I")
_NAME = re.compile(r"^epoch-(\d{6,})(?:-step-(\d{9,}))?\.ckpt$")
_RUN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MODEL_FILE = "model.native"


class CheckpointHeader(msgspec.Struct, frozen=True, kw_only=True):
    epoch: int  # the last completed epoch
    sha256: str
    size: int
    created_at_us: int
    early_stopping: dict[str, Any] | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    step: int = 0  # > 0: a mid-epoch checkpoint, this many steps into epoch + 1


class StoredCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint read back and verified."""

    epoch: int
    state: bytes
    path: str
    early_stopping: dict[str, Any] | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    step: int = 0  # > 0: a mid-epoch checkpoint, this many steps into epoch + 1


_header_decoder = msgspec.json.Decoder(CheckpointHeader)


def checkpoint_root(registry: ModelRegistry) -> str:
    """Where checkpoints live: ``checkpoints/`` under the registry's artifact store root."""
    return f"{registry.artifacts.root}/checkpoints"


def encode(header: CheckpointHeader, state: bytes) -> bytes:
    head = msgspec.json.encode(header)
    return MAGIC + _LEN.pack(len(head)) + head + state


def decode(data: bytes, path: str = "") -> StoredCheckpoint | None:
    """The checkpoint in ``data``, or None when it is torn or corrupt."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size:
        return None
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if len(data) < start + n:
        return None
    try:
        header = _header_decoder.decode(data[start : start + n])
    except msgspec.DecodeError:
        return None
    state = data[start + n :]
    if len(state) != header.size or hashlib.sha256(state).hexdigest() != header.sha256:
        return None
    return StoredCheckpoint(
        epoch=header.epoch,
        state=state,
        path=path,
        early_stopping=header.early_stopping,
        extra=header.extra,
        step=header.step,
    )


class CheckpointStore:
    """Checkpoints of one run (``main`` or one trial) of one job, newest ``keep`` kept."""

    def __init__(self, root: str, job_id: str, run: str = "main", *, keep: int = 2) -> None:
        if keep < 1:
            raise InvalidArgumentError(f"checkpoint.keep must be >= 1, got {keep}")
        for what, value in (("job id", job_id), ("run", run)):
            if not _RUN.match(value):
                raise InvalidArgumentError(
                    f"checkpoint {what} {value!r} must be 1-64 letters, digits, '_', '.', '-'"
                )
        self._local = "://" not in root or root.startswith("file://")
        if self._local:
            root = os.path.abspath(root.removeprefix("file://"))
        self.root = root.rstrip("/")
        self.job_id = job_id
        self.run = run
        self.keep = keep
        self._fs: Any
        self._fs, _ = fsspec.core.url_to_fs(self.root)

    @classmethod
    def for_registry(
        cls, registry: ModelRegistry, job_id: str, run: str = "main", *, keep: int = 2
    ) -> CheckpointStore:
        return cls(checkpoint_root(registry), job_id, run, keep=keep)

    def scoped(self, run: str) -> CheckpointStore:
        """The store of another run of the same job."""
        return CheckpointStore(self.root, self.job_id, run, keep=self.keep)

    @property
    def job_dir(self) -> str:
        return f"{self.root}/{self.job_id}"

    @property
    def run_dir(self) -> str:
        return f"{self.job_dir}/{self.run}"

    # -- files --------------------------------------------------------------------------------

    def _write(self, path: str, data: bytes) -> None:
        """Atomic: readers see the old file or the whole new one, never a part, and a writer
        killed midway leaves nothing under ``path`` (local: temp + fsync + rename; object
        stores: one PUT or completed multipart upload of the final name; see
        :func:`carrara.storage.publish_bytes`)."""
        publish_bytes(self._fs, path, data)

    def _read(self, path: str) -> bytes | None:
        refresh(self._fs, path)  # a cached listing would hide what another process wrote
        try:
            with self._fs.open(path, "rb") as src:
                data: bytes = src.read()
        except FileNotFoundError:
            return None
        return data

    def _names(self) -> list[str]:
        refresh(self._fs, self.run_dir)  # another process (the worker) may have written
        try:
            entries = self._fs.ls(self.run_dir, detail=False)
        except FileNotFoundError:
            return []
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]

    # -- checkpoints --------------------------------------------------------------------------

    def positions(self) -> list[tuple[int, int]]:
        """(completed epoch, step) of every checkpoint file (intact or not), oldest first;
        step 0 is an end-of-epoch checkpoint."""
        out = []
        for m in (_NAME.match(n) for n in self._names()):
            if m is not None:
                step = int(m.group(2)) if m.group(2) is not None else 0
                # A mid-epoch file is named for the epoch in progress (see the module doc).
                out.append((int(m.group(1)) - (1 if step else 0), step))
        return sorted(out)

    def epochs(self) -> list[int]:
        """Epochs with an end-of-epoch checkpoint file (intact or not), oldest first."""
        return [epoch for epoch, step in self.positions() if step == 0]

    def path(self, epoch: int, step: int = 0) -> str:
        if step:
            return f"{self.run_dir}/epoch-{epoch + 1:06d}-step-{step:09d}.ckpt"
        return f"{self.run_dir}/epoch-{epoch:06d}.ckpt"

    def save(
        self,
        epoch: int,
        state: bytes,
        *,
        early_stopping: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        step: int = 0,
    ) -> str:
        """Write the checkpoint of ``epoch`` (plus ``step`` steps of the next epoch: a
        preempted run's mid-epoch checkpoint) and drop all but the newest ``keep``."""
        if step < 0:
            raise InvalidArgumentError(f"checkpoint step must be >= 0, got {step}")
        header = CheckpointHeader(
            epoch=epoch,
            sha256=hashlib.sha256(state).hexdigest(),
            size=len(state),
            created_at_us=time.time_ns() // 1000,
            early_stopping=early_stopping,
            extra=extra or {},
            step=step,
        )
        path = self.path(epoch, step)
        self._write(path, encode(header, state))
        for old in self.positions()[: -self.keep]:
            self._remove(self.path(*old))
        return path

    def latest(self) -> StoredCheckpoint | None:
        """The newest intact checkpoint (a mid-epoch one included); torn or corrupt files are
        skipped (and logged)."""
        for epoch, step in reversed(self.positions()):
            path = self.path(epoch, step)
            data = self._read(path)
            ckpt = decode(data, path) if data is not None else None
            if ckpt is not None and (ckpt.epoch, ckpt.step) == (epoch, step):
                return ckpt
            log.warning("checkpoint %s is torn or corrupt; trying an older one", path)
        return None

    # -- a finished trial's model --------------------------------------------------------------

    def save_model(self, native: bytes) -> str:
        header = CheckpointHeader(
            epoch=-1,
            sha256=hashlib.sha256(native).hexdigest(),
            size=len(native),
            created_at_us=time.time_ns() // 1000,
        )
        path = f"{self.run_dir}/{MODEL_FILE}"
        self._write(path, encode(header, native))
        return path

    def load_model(self) -> bytes | None:
        path = f"{self.run_dir}/{MODEL_FILE}"
        data = self._read(path)
        ckpt = decode(data, path) if data is not None else None
        return ckpt.state if ckpt is not None else None

    # -- cleanup ------------------------------------------------------------------------------

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(path)

    def delete_job(self) -> None:
        """Remove every checkpoint of the job (all runs): called once the job succeeded."""
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(self.job_dir, recursive=True)
