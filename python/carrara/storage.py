"""Files under a local folder or any fsspec URL (``s3://bucket/prefix``, ``gs://...``,
``memory://...``): how the artifact store, the checkpoints and the offline store open a root,
publish a file whole (no reader ever sees part of it) and list what other processes wrote.

Credentials and endpoints are the filesystem's own: for S3 botocore reads ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` and ``AWS_ENDPOINT_URL`` (an S3-compatible server such
as MinIO), and fsspec applies ``FSSPEC_S3_*`` variables or its config file as
``storage_options``; nothing here reads them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec  # type: ignore[import-untyped,unused-ignore]

__all__ = [
    "WHOLE_OBJECT_PROTOCOLS",
    "is_local",
    "open_root",
    "publish_bytes",
    "publish_file",
    "refresh",
]

#: Stores where one PUT (or a completed multipart upload) makes the object appear whole, so
#: the final name can be written directly; any other non-local store gets a temporary name and
#: a move, since a streamed write there may show partial bytes.
WHOLE_OBJECT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "memory"})


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return tuple(p) if isinstance(p, (tuple, list)) else (str(p),)


def is_local(fs: Any) -> bool:
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def open_root(root: str | Path) -> tuple[Any, str, bool]:
    """``(filesystem, root, local)`` for a folder or fsspec URL: a local root is made absolute
    (``file://`` stripped); a remote one keeps its URL, without a trailing ``/``."""
    url = str(root)
    local = "://" not in url or url.startswith("file://")
    if local:
        url = os.path.abspath(url.removeprefix("file://"))
    fs, _ = fsspec.core.url_to_fs(url)
    return fs, url.rstrip("/") or "/", local


def refresh(fs: Any, path: str) -> None:
    """Forget cached listings of ``path``, its parents and everything under it, so the next
    listing or lookup shows what other processes wrote (s3fs and gcsfs cache listings per
    filesystem instance, and fsspec shares instances within a process)."""
    fs.invalidate_cache(path)  # the path and its parents
    cache = getattr(fs, "dircache", None)
    if cache:
        prefix = fs._strip_protocol(path).rstrip("/") + "/"
        for key in [k for k in list(cache) if str(k).startswith(prefix)]:
            cache.pop(key, None)


def _fsync_dir(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def publish_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` as ``path`` so that readers see the old object or the whole new one,
    never a part, and a writer killed midway leaves nothing under ``path``: a local file is
    written to a temporary name, fsynced and renamed; an object store gets one PUT of the
    final name (s3fs switches to a multipart upload for large data, invisible until
    completed); other stores a temporary name and a move."""
    folder = path.rsplit("/", 1)[0]
    if is_local(fs):
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
        os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)
        return
    fs.makedirs(folder, exist_ok=True)  # a no-op on object stores whose bucket exists
    if set(_protocols(fs)) & WHOLE_OBJECT_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def publish_file(fs: Any, source: str | Path, path: str) -> None:
    """Upload the local file ``source`` as ``path`` of a non-local store, whole or not at all
    (as :func:`publish_bytes`; s3fs uploads a large file in parts, completed at the end)."""
    folder = path.rsplit("/", 1)[0]
    fs.makedirs(folder, exist_ok=True)
    if set(_protocols(fs)) & WHOLE_OBJECT_PROTOCOLS:
        fs.put_file(str(source), path)
        return
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
    fs.put_file(str(source), tmp)
    fs.mv(tmp, path)
