"""carrara.eventlog: the same tests against the local SQLite log and real Redis Streams."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carrara.errors import ConfigError, InvalidArgumentError
from carrara.eventlog import Event, EventLog, LocalEventLog, open_event_log

VISIBILITY_MS = 600


@pytest.fixture(
    params=["local-file", "local-memory", pytest.param("redis", marks=pytest.mark.integration)]
)
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    opts = f"visibility_timeout_ms={VISIBILITY_MS}"
    if request.param == "local-file":
        return f"local:///{tmp_path / 'events.db'}?{opts}"
    if request.param == "local-memory":
        return f"local://?{opts}"
    redis_url = request.getfixturevalue("redis_url")
    namespace = request.getfixturevalue("redis_namespace")
    return f"{redis_url}?prefix={namespace}&{opts}"


@pytest.fixture(params=["local-file", pytest.param("redis", marks=pytest.mark.integration)])
def shared_log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A log several instances (threads, processes) share: not the in-memory one."""
    opts = f"visibility_timeout_ms={VISIBILITY_MS}"
    if request.param == "local-file":
        return f"local:///{tmp_path / 'events.db'}?{opts}"
    redis_url = request.getfixturevalue("redis_url")
    namespace = request.getfixturevalue("redis_namespace")
    return f"{redis_url}?prefix={namespace}&{opts}"


@pytest.fixture
def log(log_url: str) -> Iterator[EventLog]:
    el = open_event_log(log_url)
    yield el
    el.close()


def test_append_then_read_in_order(log: EventLog) -> None:
    ids = [log.append("deployments", b"a"), *log.append_many("deployments", [b"b", b"c"])]
    assert len(set(ids)) == 3
    events = log.read("deployments", "g", "c1", count=10)
    assert [e.payload for e in events] == [b"a", b"b", b"c"]
    assert [e.id for e in events] == ids
    assert all(isinstance(e, Event) and e.topic == "deployments" for e in events)
    now_ms = time.time() * 1000
    assert all(abs(e.timestamp_ms - now_ms) < 60_000 for e in events)
    # Nothing new for this group until more is appended.
    assert log.read("deployments", "g", "c1") == []


def test_topics_are_independent(log: EventLog) -> None:
    log.append("alerts", b"x")
    log.append("predictions", b"y")
    assert [e.payload for e in log.read("alerts", "g", "c")] == [b"x"]
    assert [e.payload for e in log.read("predictions", "g", "c")] == [b"y"]


def test_each_group_sees_every_event_and_consumers_split_them(log: EventLog) -> None:
    log.append_many("feature-updates", [str(i).encode() for i in range(10)])
    first = log.read("feature-updates", "g1", "a", count=4)
    second = log.read("feature-updates", "g1", "b", count=100)
    assert [e.payload for e in first + second] == [str(i).encode() for i in range(10)]
    other = log.read("feature-updates", "g2", "a", count=100)
    assert len(other) == 10


def test_unacked_events_are_redelivered_after_the_visibility_timeout(log: EventLog) -> None:
    log.append_many("training-events", [b"1", b"2", b"3"])
    got = log.read("training-events", "g", "dies", count=10)
    assert len(got) == 3
    log.ack("training-events", "g", [got[0].id])
    # Within the timeout nobody else gets them.
    assert log.read("training-events", "g", "survivor") == []
    time.sleep(VISIBILITY_MS / 1000 + 0.1)
    again = log.read("training-events", "g", "survivor", count=10)
    assert [e.payload for e in again] == [b"2", b"3"]
    assert [e.id for e in again] == [got[1].id, got[2].id]
    log.ack("training-events", "g", [e.id for e in again])
    time.sleep(VISIBILITY_MS / 1000 + 0.1)
    assert log.read("training-events", "g", "survivor") == []


def test_blocking_read_waits_for_an_append(shared_log_url: str) -> None:
    reader = open_event_log(shared_log_url)
    writer = open_event_log(shared_log_url)
    started = time.monotonic()
    assert reader.read("alerts", "g", "c", block_ms=50) == []
    assert time.monotonic() - started >= 0.04

    def later() -> None:
        time.sleep(0.1)
        writer.append("alerts", b"late")

    t = threading.Thread(target=later)
    t.start()
    try:
        started = time.monotonic()
        got = reader.read("alerts", "g", "c", block_ms=5000)
        assert [e.payload for e in got] == [b"late"]
        assert time.monotonic() - started < 4
    finally:
        t.join()
        writer.close()
        reader.close()


def test_bad_names_and_urls_are_rejected(log: EventLog) -> None:
    with pytest.raises(InvalidArgumentError, match="topic"):
        log.append("no spaces", b"x")
    with pytest.raises(InvalidArgumentError, match="count"):
        log.read("alerts", "g", "c", count=0)
    with pytest.raises(ConfigError, match="local:///"):
        open_event_log("kafka://broker:9092")


def test_local_log_is_durable_and_shared_across_instances(tmp_path: Path) -> None:
    url = f"local:///{tmp_path / 'sub' / 'events.db'}?visibility_timeout_ms=100000"
    with open_event_log(url) as a:
        ids = a.append_many("deployments", [b"x", b"y"])
        assert [e.id for e in a.read("deployments", "g", "c", count=1)] == ids[:1]
    with open_event_log(url) as b:
        # The first event is pending (unacked) in group g; the second is still new.
        assert [e.payload for e in b.read("deployments", "g", "c2")] == [b"y"]
        assert isinstance(b, LocalEventLog)
        assert b.pending_count("deployments", "g") == 2


def test_concurrent_consumers_get_each_event_exactly_once_when_acked(
    shared_log_url: str,
) -> None:
    log_url = shared_log_url
    writer = open_event_log(log_url)
    writer.append_many("predictions", [str(i).encode() for i in range(300)])
    seen: list[bytes] = []
    lock = threading.Lock()

    def consume(name: str) -> None:
        el = open_event_log(log_url)
        try:
            while True:
                batch = el.read("predictions", "g", name, count=7)
                if not batch:
                    return
                el.ack("predictions", "g", [e.id for e in batch])
                with lock:
                    seen.extend(e.payload for e in batch)
        finally:
            el.close()

    threads = [threading.Thread(target=consume, args=(f"c{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert sorted(seen, key=int) == [str(i).encode() for i in range(300)]


def test_maxlen_keeps_the_newest_events(log_url: str) -> None:
    with open_event_log(f"{log_url}&maxlen=5") as el:
        for i in range(30):
            el.append("alerts", str(i).encode())
        el.append("predictions", b"other topic")
        got = [int(e.payload) for e in el.read("alerts", "g", "c", count=100)]
        # Redis trims approximately (whole nodes), so it may keep more than 5.
        assert got[-5:] == [25, 26, 27, 28, 29]
        assert len(got) == 5 if "local:" in log_url else len(got) <= 30
        assert [e.payload for e in el.read("predictions", "g", "c")] == [b"other topic"]
    with pytest.raises(ConfigError, match="maxlen must be > 0"):
        open_event_log("local://?maxlen=0")


def test_the_prediction_log_is_bounded_and_deployments_and_alerts_are_not(log_url: str) -> None:
    with open_event_log(log_url) as el:  # the default: only predictions are capped
        assert el.maxlen("predictions") == 1_000_000
        assert el.maxlen("deployments") is None and el.maxlen("alerts") is None
    with open_event_log(f"{log_url}&maxlen.predictions=300") as el:
        for i in range(20):
            el.append_many("predictions", [f"{i}-{j}".encode() for j in range(100)])
            el.append_many("alerts", [f"{i}-{j}".encode() for j in range(100)])
        kept = el.read("predictions", "g", "c", count=10_000)
        # Redis trims whole stream nodes (100 entries by default): at most one node more.
        assert 300 <= len(kept) <= 400, len(kept)
        assert kept[-1].payload == b"19-99"
        assert len(el.read("alerts", "g", "c", count=10_000)) == 2_000  # never trimmed
    with open_event_log(f"{log_url}&maxlen.predictions=0&maxlen=50") as el:
        assert el.maxlen("predictions") is None and el.maxlen("alerts") == 50
    for bad in ("maxlen.predictions=-1", "maxlen.bad%20topic=5", "maxlen.predictions=x"):
        with pytest.raises(ConfigError, match="maxlen"):
            open_event_log(f"local://?{bad}")


def test_read_after_follows_an_offset_without_a_group(shared_log_url: str) -> None:
    with open_event_log(shared_log_url) as log, open_event_log(shared_log_url) as reader:
        ids = log.append_many("deployments", [b"a", b"b", b"c"])
        log.append("other", b"x")
        first = reader.read_after("deployments", None, count=2)
        assert [e.payload for e in first] == [b"a", b"b"]
        rest = reader.read_after("deployments", first[-1].id)
        assert [(e.id, e.payload) for e in rest] == [(ids[2], b"c")]
        assert reader.read_after("deployments", ids[2]) == []
        # A blocking read returns as soon as an event arrives.
        threading.Timer(0.2, lambda: log.append("deployments", b"d")).start()
        started = time.monotonic()
        got = reader.read_after("deployments", ids[2], block_ms=5_000)
        assert [e.payload for e in got] == [b"d"] and time.monotonic() - started < 4
        # Reading by offset leaves no consumer group behind (groups read from the start).
        assert [e.payload for e in reader.read("deployments", "fresh", "c1")] == [
            b"a",
            b"b",
            b"c",
            b"d",
        ]
        with pytest.raises(InvalidArgumentError):
            reader.read_after("deployments", None, count=0)


def test_read_after_on_a_recreated_local_log_starts_again(tmp_path: Path) -> None:
    url = f"local:///{tmp_path / 'events.db'}"
    with open_event_log(url) as log:
        offset = log.append_many("deployments", [b"a", b"b", b"c"])[-1]
    (tmp_path / "events.db").unlink()
    with open_event_log(url) as log:
        log.append("deployments", b"new")
        assert [e.payload for e in log.read_after("deployments", offset)] == [b"new"]
