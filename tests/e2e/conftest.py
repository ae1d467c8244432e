"""One run of ``carrara demo --keep`` on the real PostgreSQL + Redis for the whole session: the
demo's own test checks its report, the console's browser test explores what it left."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from rich.console import Console

from carrara.demo import DemoReport, _drop_redis_prefix, _drop_schema, demo_report

from ..conftest import POSTGRES_ADMIN_URL, REDIS_URL

DEMO_ENTITIES = 3_000
DEMO_TRAIN_ROWS = 8_000


class KeptDemo(msgspec.Struct, frozen=True):
    report: DemoReport
    text: str  # what the demo printed
    root: Path


@pytest.fixture(scope="session")
def kept_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeptDemo]:
    root = tmp_path_factory.mktemp("kept-demo")
    out = io.StringIO()
    report = demo_report(
        DEMO_ENTITIES,
        path=root,
        load_seconds=1.0,
        rate=300.0,
        train_rows=DEMO_TRAIN_ROWS,
        backend="postgres,redis",
        pg_url=POSTGRES_ADMIN_URL,
        redis_url=REDIS_URL,
        keep=True,
        console=Console(file=out, width=160),
    )
    try:
        yield KeptDemo(report, out.getvalue(), root)
    finally:
        if report.isolation:
            _drop_schema(POSTGRES_ADMIN_URL, report.isolation)
            _drop_redis_prefix(REDIS_URL, report.isolation)
