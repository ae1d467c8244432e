"""An S3-compatible server (moto, started here) for the object storage tests: one per session,
a fresh bucket and the ``AWS_*`` environment pointing at it per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3_server import S3Server, clear_fsspec_s3, running_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="moto[server] (dev extra) runs the S3 server")
    pytest.importorskip("s3fs", reason="s3fs (serving/features extras) is the s3:// backend")
    with running_s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket's name; botocore in this process (and children started with
    ``os.environ``) talks to the test server."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    clear_fsspec_s3()
    yield s3_server.create_bucket()
    clear_fsspec_s3()
