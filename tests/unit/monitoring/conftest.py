"""Fixtures of the monitoring tests: a SQLite database and a durable local event log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carrara.eventlog import EventLog, open_event_log
from carrara.sql import Database, connect


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = connect(f"sqlite:///{tmp_path / 'registry.db'}")
    yield database
    database.close()


@pytest.fixture
def event_log(tmp_path: Path) -> Iterator[EventLog]:
    log = open_event_log(f"local:///{tmp_path / 'events.db'}?visibility_timeout_ms=200")
    yield log
    log.close()
