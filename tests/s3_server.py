"""A real S3-compatible server for tests: moto in server mode on a free loopback port
(``running_s3_server``), buckets made with boto3, and the ``AWS_*`` environment that points
botocore (s3fs, boto3) in this process and in child processes at it (``S3Server.env``)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["S3Server", "clear_fsspec_s3", "running_s3_server"]


class S3Server:
    """A running moto server: its endpoint and the environment that selects it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        # What botocore reads (AWS_ENDPOINT_URL: botocore >= 1.31); no profile or config file
        # of the machine may leak in.
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "carrara-test",
            "AWS_SECRET_ACCESS_KEY": "carrara-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_REGION"],
        )

    def create_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (a fresh random name unless given); returns its name."""
        name = name or f"carrara-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (what S3 itself lists, no client cache)."""
        out: list[str] = []
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def in_progress_uploads(self, bucket: str) -> list[str]:
        """Keys with a multipart upload started and never completed (invisible as objects)."""
        r = self.client().list_multipart_uploads(Bucket=bucket)
        return sorted(u["Key"] for u in r.get("Uploads", []))


def clear_fsspec_s3() -> None:
    """Drop cached s3fs instances (they hold the endpoint and listings of an earlier test)."""
    try:
        import s3fs
    except ImportError:  # pragma: no cover - the dev extra installs it
        return
    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1 and a port the OS picks, until the block ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
