"""Fixtures of the chaos suite: a restartable private Redis, the per-case figure record (saved
to build/chaos/<case>.json with the test's outcome), and the short/full switch.

The short run is part of ``make test``; ``make chaos`` sets CARRARA_CHAOS_FULL=1 for longer
loads, more faults and more fuzz inputs, then renders RELIABILITY.md.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.chaos.procs import PrivateRedis
from tests.chaos.record import FULL, CaseRecord

_OUTCOME = pytest.StashKey[dict[str, str]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_OUTCOME, {})[report.when] = report.outcome
    return report


@pytest.fixture
def full() -> bool:
    """True under ``make chaos`` (CARRARA_CHAOS_FULL=1)."""
    return FULL


@pytest.fixture
def chaos_record(request: pytest.FixtureRequest) -> Iterator[Callable[..., CaseRecord]]:
    """``chaos_record(case, title=..., asserted=...)``: a record saved after the test, with
    the test's outcome (figures are saved even when an assertion fails)."""
    made: list[CaseRecord] = []

    def make(case: str, *, title: str, asserted: str) -> CaseRecord:
        rec = CaseRecord(case, title=title, asserted=asserted)
        made.append(rec)
        return rec

    yield make
    outcomes = request.node.stash.get(_OUTCOME, {})
    outcome = outcomes.get("call", outcomes.get("setup", "failed"))
    for rec in made:
        rec.save(outcome)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path)
    r.start()
    try:
        yield r
    finally:
        r.close()
