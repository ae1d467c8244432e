"""`carrara db upgrade` migrates the registry, the feature catalog and monitoring, idempotently,
on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from carrara.cli import main
from carrara.feature_cache import catalog
from carrara.monitoring import schema as monitoring_schema
from carrara.registry import migrations as registry_migrations
from carrara.sql import connect
from carrara.training import queue as training_queue


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def test_db_upgrade(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'c.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    assert main(["db", "upgrade", "--url", url]) == 0
    first = capsys.readouterr().out
    assert (
        "registry: applied" in first
        and "feature catalog: applied" in first
        and "monitoring: applied" in first
    )
    assert main(["db", "upgrade", "--url", url]) == 0
    assert capsys.readouterr().out.count("up to date") == 4
    with connect(url) as db:
        for component, module in [
            ("registry", registry_migrations),
            ("feature_cache", catalog),
            ("monitoring", monitoring_schema),
            ("training", training_queue),
        ]:
            assert db.applied_migrations(component) == [m.id for m in module.MIGRATIONS]
