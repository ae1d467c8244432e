"""The event log: append-only topics with consumer groups and at-least-once delivery.

Two backends behind one narrow interface (so a Kafka adapter fits later):

- ``local:///path/events.db`` — a durable SQLite log (WAL, safe across processes);
  ``local://`` alone is an in-memory log for tests.
- ``redis://host:port/db[?prefix=...]`` — Redis Streams: XADD, XREADGROUP, XACK, and XAUTOCLAIM
  for redelivery. Each topic is one stream key ``{prefix}:{topic}`` (one key per command, so
  Redis Cluster-safe).

Semantics, identical on both backends: a consumer group sees every event of a topic from the
start of the retained log; each event goes to one consumer of the group; an event read but not
acked within the visibility timeout (``?visibility_timeout_ms=``, default 30 s) is handed out
again, possibly to another consumer. Event ids are opaque strings, increasing per topic.

Topics used by the platform are listed in :data:`carrara.types.TOPICS`; any name of
``[A-Za-z0-9._-]`` works.

Retention: a topic keeps every event unless it has a length cap. The ``predictions`` topic is
capped by default (:data:`DEFAULT_TOPIC_MAXLEN`, about the newest 1,000,000 events), so an
unread or slowly read prediction log cannot grow Redis without bound; ``deployments``,
``alerts`` and the other topics are never trimmed unless asked. Per topic, ``?maxlen.TOPIC=N``
on the URL sets the cap (``0``: no cap); ``?maxlen=N`` caps every topic that has no cap of its
own. Trimmed events are gone even if a group has not acked them.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlencode, urlsplit, urlunsplit

import msgspec

from carrara.errors import ConfigError, InvalidArgumentError, UnavailableError
from carrara.plugins import StoreKind
from carrara.types import TOPICS

__all__ = [
    "DEFAULT_TOPIC_MAXLEN",
    "Event",
    "EVENT_LOGS",
    "EventLog",
    "LocalEventLog",
    "RedisEventLog",
    "open_event_log",
]

DEFAULT_VISIBILITY_TIMEOUT_MS = 30_000
#: Length caps applied unless configured otherwise: the high-volume prediction log only
#: (events the platform must not lose, such as deployments and alerts, are never trimmed).
DEFAULT_TOPIC_MAXLEN: Mapping[str, int] = {
    str(topic): info.maxlen for topic, info in TOPICS.items() if info.maxlen is not None
}
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class Event(msgspec.Struct, frozen=True):
    """One event as a consumer receives it."""

    topic: str
    id: str
    payload: bytes
    timestamp_ms: int


def _topic_caps(maxlen: int | None, topic_maxlen: Mapping[str, int] | None) -> dict[str, int]:
    """Per-topic caps: ``topic_maxlen`` first, then (for the other topics) the built-in
    defaults unless ``maxlen`` caps every topic. A cap of 0 means none."""
    caps = dict(DEFAULT_TOPIC_MAXLEN) if maxlen is None else {}
    for topic, cap in (topic_maxlen or {}).items():
        _check_name("topic", topic)
        if cap < 0:
            raise ConfigError(f"the length cap of topic {topic} must be >= 0, got {cap}")
        caps[topic] = cap
    return caps


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r}: use 1-200 characters of letters, digits, '.', '_', '-'"
        )


class EventLog(ABC):
    """Append-only topics with consumer groups (at-least-once)."""

    visibility_timeout_ms: int
    _maxlen: int | None = None
    _caps: Mapping[str, int] = DEFAULT_TOPIC_MAXLEN

    @classmethod
    @abstractmethod
    def from_url(cls, url: str) -> EventLog:
        """Open the log ``url`` names (see :func:`open_event_log` for the common options)."""

    def maxlen(self, topic: str) -> int | None:
        """About how many events ``topic`` keeps (None: all of them)."""
        cap = self._caps.get(topic, self._maxlen)
        return cap or None

    @abstractmethod
    def append(self, topic: str, payload: bytes) -> str:
        """Append one event; returns its id."""

    @abstractmethod
    def append_many(self, topic: str, payloads: Sequence[bytes]) -> list[str]:
        """Append events in order in one round trip; returns their ids."""

    @abstractmethod
    def read(
        self, topic: str, group: str, consumer: str, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]:
        """Up to ``count`` events for ``consumer`` of ``group``: first events whose visibility
        timeout expired without an ack, then new ones. Waits up to ``block_ms`` when there are
        none (0: return at once)."""

    @abstractmethod
    def ack(self, topic: str, group: str, ids: Iterable[str]) -> None:
        """Mark events as processed by ``group``; they are not delivered to it again."""

    @abstractmethod
    def read_after(
        self, topic: str, after: str | None, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]:
        """Up to ``count`` events of ``topic`` with ids after ``after`` (None: from the start
        of the retained log), oldest first, with no consumer group: for a reader that keeps its
        own offset (a gateway following deployments leaves nothing behind in the log). Waits
        up to ``block_ms`` when there are none."""

    @abstractmethod
    def pending_count(self, topic: str, group: str) -> int:
        """Events delivered to ``group`` and not acked yet (what its consumers still hold)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the log is unusable afterwards."""

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- local (SQLite) ---------------------------------------------------------------------------

_LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_topic_seq ON events(topic, seq);
CREATE TABLE IF NOT EXISTS consumer_groups (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (topic, grp)
);
CREATE TABLE IF NOT EXISTS pending (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    delivered_ms INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    PRIMARY KEY (topic, grp, seq)
);
CREATE INDEX IF NOT EXISTS pending_due ON pending(topic, grp, delivered_ms);
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalEventLog(EventLog):
    """A durable event log in one SQLite file (or in memory), safe across threads and
    processes: every read/append is one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(
        self,
        path: str | None,
        *,
        visibility_timeout_ms: int = DEFAULT_VISIBILITY_TIMEOUT_MS,
        poll_interval_ms: int = 10,
        maxlen: int | None = None,
        topic_maxlen: Mapping[str, int] | None = None,
    ) -> None:
        self.visibility_timeout_ms = visibility_timeout_ms
        self._maxlen = maxlen
        self._caps = _topic_caps(maxlen, topic_maxlen)
        # Events appended per topic since this instance last trimmed it: a large cap is
        # enforced every tenth of it (the trim reads up to ``cap`` index entries).
        self._since_trim: dict[str, int] = {}
        self._poll_s = poll_interval_ms / 1000
        self._path = path or ":memory:"
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: the log is I/O-light and this keeps it simple.
        self._lock = threading.Lock()
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise UnavailableError(f"cannot open event log {self._path}: {exc}") from exc
        conn = self._conn
        if self._path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_LOCAL_SCHEMA)

    @classmethod
    def from_url(cls, url: str) -> LocalEventLog:
        """``local:///path/events.db`` or ``local://`` (in memory)."""
        parts, _, visibility, maxlen, topic_maxlen = parse_log_url(url)
        path = (parts.netloc + parts.path) or None
        return cls(path, visibility_timeout_ms=visibility, maxlen=maxlen, topic_maxlen=topic_maxlen)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UnavailableError("the event log is closed")
        return self._conn

    def append(self, topic: str, payload: bytes) -> str:
        return self.append_many(topic, [payload])[0]

    def append_many(self, topic: str, payloads: Sequence[bytes]) -> list[str]:
        _check_name("topic", topic)
        if not payloads:
            return []
        now = _now_ms()
        ids: list[str] = []
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for payload in payloads:
                    cur = conn.execute(
                        "INSERT INTO events (topic, payload, timestamp_ms) VALUES (?, ?, ?)",
                        (topic, bytes(payload), now),
                    )
                    ids.append(str(cur.lastrowid))
                cap = self.maxlen(topic)
                since = self._since_trim.get(topic, 0) + len(payloads)
                if cap is not None and since >= max(1, cap // 10):
                    since = 0
                    # Keep the newest ``cap`` events of the topic (like Redis XADD MAXLEN).
                    conn.execute(
                        "DELETE FROM events WHERE topic = ? AND seq < (SELECT seq FROM events"
                        " WHERE topic = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                        (topic, topic, cap - 1),
                    )
                    conn.execute(
                        "DELETE FROM pending WHERE topic = ? AND seq < (SELECT min(seq)"
                        " FROM events WHERE topic = ?)",
                        (topic, topic),
                    )
                self._since_trim[topic] = since
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return ids

    def read(
        self, topic: str, group: str, consumer: str, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]:
        _check_name("topic", topic)
        _check_name("consumer group", group)
        if count <= 0:
            raise InvalidArgumentError(f"count must be > 0, got {count}")
        deadline = time.monotonic() + block_ms / 1000
        while True:
            events = self._read_once(topic, group, consumer, count)
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(min(self._poll_s, max(0.0, deadline - time.monotonic())))

    def _read_once(self, topic: str, group: str, consumer: str, count: int) -> list[Event]:
        now = _now_ms()
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT OR IGNORE INTO consumer_groups (topic, grp, last_seq) VALUES (?, ?, 0)",
                    (topic, group),
                )
                # Redeliveries first: events handed out earlier whose visibility timeout expired.
                rows: list[tuple[int, bytes, int]] = conn.execute(
                    "SELECT e.seq, e.payload, e.timestamp_ms FROM pending p"
                    " JOIN events e ON e.seq = p.seq"
                    " WHERE p.topic = ? AND p.grp = ? AND p.delivered_ms <= ?"
                    " ORDER BY p.seq LIMIT ?",
                    (topic, group, now - self.visibility_timeout_ms, count),
                ).fetchall()
                if rows:
                    conn.executemany(
                        "UPDATE pending SET consumer = ?, delivered_ms = ?,"
                        " deliveries = deliveries + 1 WHERE topic = ? AND grp = ? AND seq = ?",
                        [(consumer, now, topic, group, r[0]) for r in rows],
                    )
                if len(rows) < count:
                    (last,) = conn.execute(
                        "SELECT last_seq FROM consumer_groups WHERE topic = ? AND grp = ?",
                        (topic, group),
                    ).fetchone()
                    new: list[tuple[int, bytes, int]] = conn.execute(
                        "SELECT seq, payload, timestamp_ms FROM events"
                        " WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                        (topic, last, count - len(rows)),
                    ).fetchall()
                    if new:
                        conn.executemany(
                            "INSERT INTO pending (topic, grp, seq, consumer, delivered_ms,"
                            " deliveries) VALUES (?, ?, ?, ?, ?, 1)",
                            [(topic, group, r[0], consumer, now) for r in new],
                        )
                        conn.execute(
                            "UPDATE consumer_groups SET last_seq = ? WHERE topic = ? AND grp = ?",
                            (new[-1][0], topic, group),
                        )
                        rows.extend(new)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return [Event(topic, str(seq), bytes(payload), ts) for seq, payload, ts in rows]

    def ack(self, topic: str, group: str, ids: Iterable[str]) -> None:
        seqs = []
        for i in ids:
            try:
                seqs.append((topic, group, int(i)))
            except ValueError as exc:
                raise InvalidArgumentError(f"{i!r} is not an id of this event log") from exc
        if not seqs:
            return
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "DELETE FROM pending WHERE topic = ? AND grp = ? AND seq = ?", seqs
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def read_after(
        self, topic: str, after: str | None, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]:
        _check_name("topic", topic)
        if count <= 0:
            raise InvalidArgumentError(f"count must be > 0, got {count}")
        try:
            last = int(after) if after else 0
        except ValueError as exc:
            raise InvalidArgumentError(f"{after!r} is not an id of this event log") from exc
        deadline = time.monotonic() + block_ms / 1000
        while True:
            with self._lock:
                conn = self._db()
                if last:
                    # Ids are never reused within a file (AUTOINCREMENT); an offset past the
                    # highest id ever given means the log was recreated: read it from the start.
                    row = conn.execute(
                        "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
                    ).fetchone()
                    if row is None or row[0] < last:
                        last = 0
                rows: list[tuple[int, bytes, int]] = conn.execute(
                    "SELECT seq, payload, timestamp_ms FROM events"
                    " WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (topic, last, count),
                ).fetchall()
            if rows or time.monotonic() >= deadline:
                return [Event(topic, str(seq), bytes(p), ts) for seq, p, ts in rows]
            time.sleep(min(self._poll_s, max(0.0, deadline - time.monotonic())))

    def pending_count(self, topic: str, group: str) -> int:
        """Events delivered to ``group`` and not acked yet."""
        with self._lock:
            row = (
                self._db()
                .execute("SELECT COUNT(*) FROM pending WHERE topic = ? AND grp = ?", (topic, group))
                .fetchone()
            )
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# -- Redis Streams ----------------------------------------------------------------------------

_PAYLOAD_FIELD = b"p"


class RedisEventLog(EventLog):
    """Redis Streams: one stream per topic, consumer groups created on first read (from the
    start of the stream), XAUTOCLAIM for events whose consumer did not ack in time."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "carrara:events",
        visibility_timeout_ms: int = DEFAULT_VISIBILITY_TIMEOUT_MS,
        maxlen: int | None = None,
        topic_maxlen: Mapping[str, int] | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self.visibility_timeout_ms = visibility_timeout_ms
        self._maxlen = maxlen
        self._caps = _topic_caps(maxlen, topic_maxlen)
        self._groups: set[tuple[str, str]] = set()

    @classmethod
    def from_url(cls, url: str) -> RedisEventLog:
        """``redis://host:port/db?prefix=...`` (``rediss://``, ``unix://``); other query
        options go to redis-py."""
        import redis

        parts, options, visibility, maxlen, topic_maxlen = parse_log_url(url)
        prefix = options.pop("prefix", ["carrara:events"])[-1]
        client_url = urlunsplit(parts._replace(query=urlencode(options, doseq=True)))
        return cls(
            redis.Redis.from_url(client_url),
            prefix=prefix,
            visibility_timeout_ms=visibility,
            maxlen=maxlen,
            topic_maxlen=topic_maxlen,
        )

    def _key(self, topic: str) -> str:
        _check_name("topic", topic)
        return f"{self._prefix}:{topic}"

    def append(self, topic: str, payload: bytes) -> str:
        return self.append_many(topic, [payload])[0]

    def append_many(self, topic: str, payloads: Sequence[bytes]) -> list[str]:
        import redis

        key = self._key(topic)
        if not payloads:
            return []
        cap = self.maxlen(topic)
        pipe = self._client.pipeline(transaction=False)
        for payload in payloads:
            # XADD ... MAXLEN ~ cap: Redis trims whole stream nodes, so the stream keeps
            # ``cap`` events and at most one node (100 entries by default) more.
            pipe.xadd(key, {_PAYLOAD_FIELD: bytes(payload)}, maxlen=cap, approximate=True)
        try:
            ids = pipe.execute()
        except redis.exceptions.ConnectionError as exc:
            raise UnavailableError(f"event log Redis is unreachable: {exc}") from exc
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def _ensure_group(self, key: str, group: str) -> None:
        import redis

        if (key, group) in self._groups:
            return
        try:
            self._client.xgroup_create(key, group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((key, group))

    def read(
        self, topic: str, group: str, consumer: str, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]:
        import redis

        key = self._key(topic)
        _check_name("consumer group", group)
        if count <= 0:
            raise InvalidArgumentError(f"count must be > 0, got {count}")
        try:
            self._ensure_group(key, group)
            # Redeliveries first: pending events idle longer than the visibility timeout.
            claimed = self._client.xautoclaim(
                key,
                group,
                consumer,
                min_idle_time=self.visibility_timeout_ms,
                start_id="0-0",
                count=count,
            )
            entries = [e for e in claimed[1] if e[1]]  # deleted (trimmed) entries come as None
            if len(entries) < count:
                streams = self._client.xreadgroup(
                    group,
                    consumer,
                    {key: ">"},
                    count=count - len(entries),
                    block=block_ms if block_ms > 0 and not entries else None,
                )
                for _, stream_entries in streams or []:
                    entries.extend(stream_entries)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted under us: recreate next time
                self._groups.discard((key, group))
                return []
            raise
        except redis.exceptions.ConnectionError as exc:
            raise UnavailableError(f"event log Redis is unreachable: {exc}") from exc
        out = []
        for raw_id, fields in entries:
            eid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            out.append(Event(topic, eid, bytes(fields[_PAYLOAD_FIELD]), int(eid.split("-")[0])))
        return out

    def ack(self, topic: str, group: str, ids: Iterable[str]) -> None:
        import redis

        id_list = list(ids)
        if not id_list:
            return
        try:
            self._client.xack(self._key(topic), group, *id_list)
        except redis.exceptions.ResponseError as exc:
            raise InvalidArgumentError(f"cannot ack {id_list[:3]}...: {exc}") from exc
        except redis.exceptions.ConnectionError as exc:
            raise UnavailableError(f"event log Redis is unreachable: {exc}") from exc

    def read_after(
        self, topic: str, after: str | None, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]:
        import redis

        key = self._key(topic)
        if count <= 0:
            raise InvalidArgumentError(f"count must be > 0, got {count}")
        try:
            streams = self._client.xread(
                {key: after or "0-0"}, count=count, block=block_ms if block_ms > 0 else None
            )
        except redis.exceptions.ResponseError as exc:
            raise InvalidArgumentError(f"cannot read {topic!r} after {after!r}: {exc}") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise UnavailableError(f"event log Redis is unreachable: {exc}") from exc
        out = []
        for _, entries in streams or []:
            for raw_id, fields in entries:
                eid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                out.append(Event(topic, eid, bytes(fields[_PAYLOAD_FIELD]), int(eid.split("-")[0])))
        return out

    def pending_count(self, topic: str, group: str) -> int:
        """Events delivered to ``group`` and not acked yet."""
        key = self._key(topic)
        self._ensure_group(key, group)
        info = self._client.xpending(key, group)
        return int(info["pending"])

    def close(self) -> None:
        self._client.close()


# -- opening by URL ---------------------------------------------------------------------------


def _int_option(options: dict[str, list[str]], name: str, default: int | None) -> int | None:
    if name not in options:
        return default
    try:
        return int(options[name][-1])
    except ValueError as exc:
        raise ConfigError(f"event log option {name} must be an integer") from exc


def parse_log_url(
    url: str,
) -> tuple[SplitResult, dict[str, list[str]], int, int | None, dict[str, int]]:
    """A log URL's parts, its other query options, and the common ones: the visibility
    timeout, ``maxlen`` and the ``maxlen.TOPIC`` caps."""
    parts = urlsplit(url)
    options = parse_qs(parts.query)
    visibility = _int_option(options, "visibility_timeout_ms", DEFAULT_VISIBILITY_TIMEOUT_MS)
    assert visibility is not None
    options.pop("visibility_timeout_ms", None)
    maxlen = _int_option(options, "maxlen", None)
    if maxlen is not None and maxlen <= 0:
        raise ConfigError(f"event log option maxlen must be > 0, got {maxlen}")
    options.pop("maxlen", None)
    topic_maxlen: dict[str, int] = {}
    for name in [k for k in options if k.startswith("maxlen.")]:
        cap = _int_option(options, name, None)
        assert cap is not None
        topic = name.removeprefix("maxlen.")
        if not _NAME.match(topic) or cap < 0:
            raise ConfigError(
                f"event log option {name} must name a topic and be >= 0 (0: no cap), got {cap}"
            )
        topic_maxlen[topic] = cap
        del options[name]
    return parts, options, visibility, maxlen, topic_maxlen


#: Event log backends by URL scheme; any other is a class path in place of the scheme.
EVENT_LOGS: StoreKind[EventLog] = StoreKind(
    "event log",
    EventLog,
    examples="local:///path/events.db, local:// or redis://host:port/db?prefix=...",
)
EVENT_LOGS.register("local", LocalEventLog.from_url)
EVENT_LOGS.register("redis", RedisEventLog.from_url)
EVENT_LOGS.register("rediss", RedisEventLog.from_url)
EVENT_LOGS.register("unix", RedisEventLog.from_url)


def open_event_log(url: str) -> EventLog:
    """Open an event log by URL.

    ``local:///path/events.db`` (durable SQLite), ``local://`` (in memory),
    ``redis://host:port/db?prefix=...`` or a plug-in (``package.module:ClassName://...``,
    built by its ``from_url``). Options for the built-in logs: ``visibility_timeout_ms``,
    ``maxlen`` (keep about the newest N events of every topic without a cap of its own) and
    ``maxlen.TOPIC`` (the cap of one topic; 0: none). Without them only ``predictions`` is
    capped (:data:`DEFAULT_TOPIC_MAXLEN`). Caps are approximate: Redis trims whole stream
    nodes, the local log trims every tenth of the cap; trimmed events are gone even if a
    group has not acked them.
    """
    return EVENT_LOGS.open(url)
