"""The online store: latest feature vector per entity and group version.

Freshness. Every write of a batch (:meth:`OnlineStore.write_vectors`, what batch and
streaming materialization and aggregated ingestion call) also records, per group version, a
:class:`WriteRecord`: when it last wrote (wall clock), the newest event time it ever wrote and
how many rows the last write had — one small extra write per batch. On Redis it is the hash
``[{namespace}:]carrara-freshness`` (field ``{group}:{version}``, value ``"{ms} {rows}"``)
and the sorted set ``[{namespace}:]carrara-freshness-event`` (member ``{group}:{version}``,
score the newest event time in µs, only ever raised: ``ZADD GT``); on Redis Cluster the same
two keys behind one hash tag (one node, one round trip). ``-`` never occurs in a group name,
so these keys cannot collide with feature vectors.

Key ``{group}:{version}:{entity_id}`` (with an optional ``{namespace}:`` prefix), value the
``FeatureVector`` protobuf (its ``created_timestamp_us`` is the write time). A value expires
when its event time is older than the group's TTL, matching the offline point-in-time rule.
Two backends with one interface and one test suite: Redis (one ``MGET`` per batch read,
one pipeline per batch write; on Redis Cluster the keys are stored hash-tagged and a batch is
one pipelined round trip per node, :mod:`carrara.feature_cache.redis_cluster`) and an
in-process map. Others plug in by class path
(:data:`ONLINE_STORES`, :mod:`carrara.plugins`).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import msgspec

from carrara.core import FeatureVector, decode_feature_vector
from carrara.errors import UnavailableError
from carrara.feature_cache.redis_cluster import ClusterStats, RedisClusterIO
from carrara.plugins import StoreKind

__all__ = [
    "ONLINE_STORES",
    "EmbeddedOnlineStore",
    "OnlineStore",
    "RedisClusterOnlineStore",
    "RedisOnlineStore",
    "WriteRecord",
    "open_online_store",
]

#: (key, FeatureVector bytes, absolute expiry in ms since the epoch or None for never)
Item = tuple[str, bytes, int | None]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: The freshness records' key suffix (``-`` cannot appear in a group name).
FRESHNESS_KEY = "carrara-freshness"


class WriteRecord(msgspec.Struct, frozen=True):
    """What the online store knows of a group version's writes."""

    last_write_ms: int  # wall clock of the last write that stored rows (ms since the epoch)
    newest_event_us: int  # newest event time ever written (µs since the epoch)
    rows_last_write: int  # rows that write stored


def _field(group: str, version: int) -> str:
    return f"{group}:{version}"


def _parse_field(field: str | bytes) -> tuple[str, int] | None:
    text = field.decode() if isinstance(field, bytes) else field
    group, _, version = text.rpartition(":")
    return (group, int(version)) if group and version.isdigit() else None


def _records(
    stamps: dict[Any, Any], newest: list[Any] | dict[Any, Any]
) -> dict[tuple[str, int], WriteRecord]:
    """Freshness records from a ``HGETALL`` reply (a dict) and a ``ZRANGE ... WITHSCORES``
    reply (a flat member, score list, or pairs as redis-py and RESP3 give them)."""
    scores: dict[Any, Any]
    if isinstance(newest, dict):
        scores = newest
    elif newest and isinstance(newest[0], list | tuple):
        scores = dict(newest)
    else:
        scores = dict(zip(newest[::2], newest[1::2], strict=True))
    events = {_parse_field(k): int(float(v)) for k, v in scores.items()}
    out: dict[tuple[str, int], WriteRecord] = {}
    for k, v in stamps.items():
        key = _parse_field(k)
        text = v.decode() if isinstance(v, bytes) else str(v)
        at, _, rows = text.partition(" ")
        if key is None or not at.isdigit() or not rows.isdigit():
            continue
        out[key] = WriteRecord(int(at), events.get(key, 0), int(rows))
    return out


class OnlineStore(ABC):
    """Key-value access to encoded feature vectors (the interface every backend implements)."""

    namespace: str

    @classmethod
    @abstractmethod
    def from_url(cls, url: str) -> OnlineStore:
        """Open the store ``url`` names (its ``?namespace=`` option is the key prefix)."""

    def key_prefix(self, group: str, version: int) -> str:
        ns = f"{self.namespace}:" if self.namespace else ""
        return f"{ns}{group}:{version}:"

    def keys(self, group: str, version: int, entity_ids: Sequence[str]) -> list[str]:
        prefix = self.key_prefix(group, version)
        return [prefix + e for e in entity_ids]

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of ``keys`` in order (None: absent or expired), in one round trip."""

    @abstractmethod
    def set_many(self, items: Sequence[Item]) -> None:
        """Write values with their absolute expiry, in one round trip."""

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def now_ms(self) -> int:
        return _now_ms()

    def freshness_key(self) -> str:
        """The (logical) key of the freshness records."""
        return f"{self.namespace}:{FRESHNESS_KEY}" if self.namespace else FRESHNESS_KEY

    def record_write(  # noqa: B027 (a hook: plug-ins may keep no freshness)
        self, group: str, version: int, *, at_ms: int, newest_event_us: int, rows: int
    ) -> None:
        """Note a write of ``rows`` rows of a group version (see :class:`WriteRecord`); the
        newest event time only moves forward. A backend that does not override this (a
        plug-in) keeps no freshness: its groups read as never written."""

    def write_records(self) -> dict[tuple[str, int], WriteRecord]:
        """Every group version's :class:`WriteRecord`, by ``(group, version)``."""
        return {}

    def read(self, group: str, version: int, entity_ids: Sequence[str]) -> list[bytes | None]:
        return self.get_many(self.keys(group, version, entity_ids))

    def write_vectors(
        self, vectors: Sequence[FeatureVector], ttl_us: int, *, only_newer: bool = True
    ) -> int:
        """Write vectors (all of one group version) unless expired, and with ``only_newer``
        unless the stored value is at least as recent (event time, then write time): replays
        and late events never move an entity back in time. Returns how many were written."""
        if not vectors:
            return 0
        now_ms = self.now_ms()
        keys = [self.key_prefix(v.group, v.group_version) + v.entity_id for v in vectors]
        current: list[bytes | None] = self.get_many(keys) if only_newer else [None] * len(keys)
        items: list[Item] = []
        newest = 0
        for key, vec, old in zip(keys, vectors, current, strict=True):
            expires: int | None = None
            if ttl_us:
                expires = (vec.event_timestamp_us + ttl_us) // 1000
                if expires <= now_ms:  # too old to serve already
                    continue
            if old is not None:
                prev = decode_feature_vector(old)
                if (prev.event_timestamp_us, prev.created_timestamp_us) >= (
                    vec.event_timestamp_us,
                    vec.created_timestamp_us,
                ):
                    continue
            items.append((key, vec.encode(), expires))
            newest = max(newest, vec.event_timestamp_us)
        if items:
            self.set_many(items)
            first = vectors[0]
            self.record_write(
                first.group,
                first.group_version,
                at_ms=now_ms,
                newest_event_us=newest,
                rows=len(items),
            )
        return len(items)

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedOnlineStore(OnlineStore):
    """An in-process dict with expiry; ``clock`` (ms) is injectable for TTL tests."""

    def __init__(self, namespace: str = "", clock: Callable[[], int] | None = None) -> None:
        self.namespace = namespace
        self._clock = clock or _now_ms
        self._data: dict[str, tuple[bytes, int | None]] = {}
        self._writes: dict[tuple[str, int], WriteRecord] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> EmbeddedOnlineStore:
        """``memory://[?namespace=...]``."""
        return cls(url_namespace(url))

    def now_ms(self) -> int:
        return self._clock()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        data = self._data
        now = self._clock()
        out: list[bytes | None] = []
        for k in keys:
            entry = data.get(k)
            if entry is None or (entry[1] is not None and entry[1] <= now):
                out.append(None)
            else:
                out.append(entry[0])
        return out

    def set_many(self, items: Sequence[Item]) -> None:
        with self._lock:
            for key, value, expires in items:
                self._data[key] = (value, expires)

    def delete_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for k in keys:
                self._data.pop(k, None)

    def record_write(
        self, group: str, version: int, *, at_ms: int, newest_event_us: int, rows: int
    ) -> None:
        with self._lock:
            old = self._writes.get((group, version))
            newest = max(newest_event_us, old.newest_event_us if old else 0)
            self._writes[(group, version)] = WriteRecord(at_ms, newest, rows)

    def write_records(self) -> dict[tuple[str, int], WriteRecord]:
        with self._lock:
            return dict(self._writes)

    def purge_expired(self) -> int:
        """Drop expired entries (reads already ignore them); returns how many."""
        now = self._clock()
        with self._lock:
            dead = [k for k, (_, exp) in self._data.items() if exp is not None and exp <= now]
            for k in dead:
                del self._data[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass


class RedisOnlineStore(OnlineStore):
    """Redis through redis-py (hiredis parser when installed); ``?cluster=1`` opens a
    :class:`RedisClusterOnlineStore` instead."""

    _cluster = False

    def __init__(self, client: Any, namespace: str = "") -> None:
        self.namespace = namespace
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> RedisOnlineStore:
        """``redis://host:port/db[?namespace=...]`` (``rediss://`` for TLS, ``unix://``;
        ``?cluster=1`` for Redis Cluster, the URL naming any one node)."""
        import redis

        parts = urlsplit(url)
        options = parse_qs(parts.query)
        options.pop("namespace", None)
        cluster = options.pop("cluster", ["0"])[-1] in ("1", "true", "yes")
        client_url = urlunsplit(parts._replace(query=urlencode(options, doseq=True)))
        if cluster:
            return RedisClusterOnlineStore(RedisClusterIO(client_url), url_namespace(url))
        return cls(redis.Redis.from_url(client_url), url_namespace(url))

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self._mget(_pack_mget(keys))

    def _mget(self, packed: bytes) -> list[bytes | None]:
        """Send a packed MGET on a pooled connection and read the reply. This skips redis-py's
        per-command layers (argument packing, retry and observability wrappers), which cost
        more than the round trip itself for large batches; a broken connection is dropped and
        the (idempotent) read retried once on a fresh one."""
        import redis

        pool = self.client.connection_pool
        for attempt in range(2):
            conn = pool.get_connection()
            try:
                conn.send_packed_command([packed], check_health=False)
                values: list[bytes | None] = conn.read_response(disable_decoding=True)
                return values
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                conn.disconnect()
                if attempt:
                    raise UnavailableError(f"online store Redis is unreachable: {exc}") from exc
            except BaseException:
                conn.disconnect()  # the reply may be half read: never reuse the connection
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def set_many(self, items: Sequence[Item]) -> None:
        import redis

        pipe = self.client.pipeline(transaction=False)
        for key, value, expires in items:
            if expires is None:
                pipe.set(key, value)
            else:
                pipe.set(key, value, pxat=expires)
        try:
            pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise UnavailableError(f"online store Redis is unreachable: {exc}") from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.delete(k)
        pipe.execute()

    def record_write(
        self, group: str, version: int, *, at_ms: int, newest_event_us: int, rows: int
    ) -> None:
        import redis

        key, field = self.freshness_key(), _field(group, version)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, field, f"{at_ms} {rows}")
        pipe.zadd(f"{key}-event", {field: newest_event_us}, gt=True)
        try:
            pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise UnavailableError(f"online store Redis is unreachable: {exc}") from exc

    def write_records(self) -> dict[tuple[str, int], WriteRecord]:
        import redis

        key = self.freshness_key()
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.zrange(f"{key}-event", 0, -1, withscores=True)
        try:
            stamps, newest = pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise UnavailableError(f"online store Redis is unreachable: {exc}") from exc
        return _records(stamps, newest)

    def close(self) -> None:
        self.client.close()


class RedisClusterOnlineStore(RedisOnlineStore):
    """Redis Cluster: the same logical keys, stored hash-tagged into :data:`SHARDS` shards
    (see :mod:`carrara.feature_cache.redis_cluster`) so a batch read is one pipelined round
    trip per node. Keys on a node that cannot answer (down, failing over) read as missing
    for that call, logged and counted in ``stats``; writes to it raise ``UnavailableError``.
    The C++ gateway core does not read this layout: a cluster URL serves through this class."""

    _cluster = True

    def __init__(self, io: RedisClusterIO, namespace: str = "") -> None:
        self.namespace = namespace
        self.io = io

    @property
    def stats(self) -> ClusterStats:
        """Degraded reads, node failures, redirects and slot-map refreshes so far."""
        return self.io.stats

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.io.get_many(keys)

    def set_many(self, items: Sequence[Item]) -> None:
        self.io.set_many(items)

    def delete_many(self, keys: Sequence[str]) -> None:
        self.io.delete_many(keys)

    def _freshness_keys(self) -> tuple[bytes, bytes]:
        # Both keys behind the hash tag of the first: one node, one pipelined round trip.
        key = self.freshness_key()
        tag = self.io.tag_of(key)
        return tag + key.encode(), tag + f"{key}-event".encode()

    def record_write(
        self, group: str, version: int, *, at_ms: int, newest_event_us: int, rows: int
    ) -> None:
        stamps, events = self._freshness_keys()
        field = _field(group, version).encode()
        self.io.call(
            stamps,
            [
                [b"HSET", stamps, field, f"{at_ms} {rows}".encode()],
                [b"ZADD", events, b"GT", b"%d" % newest_event_us, field],
            ],
        )

    def write_records(self) -> dict[tuple[str, int], WriteRecord]:
        stamps, events = self._freshness_keys()
        hgetall, zrange = self.io.call(
            stamps,
            [[b"HGETALL", stamps], [b"ZRANGE", events, b"0", b"-1", b"WITHSCORES"]],
        )
        if not isinstance(hgetall, dict):  # RESP2: a flat field, value list
            hgetall = dict(zip(hgetall[::2], hgetall[1::2], strict=True))
        return _records(hgetall, zrange)

    def close(self) -> None:
        self.io.close()


def _pack_mget(keys: Sequence[str]) -> bytes:
    """The RESP encoding of ``MGET keys...`` (bulk lengths are byte lengths)."""
    head = f"*{len(keys) + 1}\r\n$4\r\nMGET\r\n"
    body = "".join([f"${len(k)}\r\n{k}\r\n" for k in keys])
    if body.isascii():  # the common case: character counts are byte counts
        return (head + body).encode()
    parts = [head.encode()]
    for k in keys:
        b = k.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def url_namespace(url: str) -> str:
    """The ``?namespace=`` option of a store URL ("" when absent)."""
    return parse_qs(urlsplit(url).query).get("namespace", [""])[-1]


def with_namespace(url: str, namespace: str) -> str:
    """``url`` with its ``?namespace=`` option set to ``namespace``."""
    base, _, query = url.partition("?")
    options = {k: v for k, v in parse_qs(query).items() if k != "namespace"}
    options["namespace"] = [namespace]
    return f"{base}?{urlencode(options, doseq=True)}"


#: Online store backends by URL scheme; any other is a class path in place of the scheme.
ONLINE_STORES: StoreKind[OnlineStore] = StoreKind(
    "online store", OnlineStore, examples="memory:// or redis://host:port/db"
)
ONLINE_STORES.register("memory", EmbeddedOnlineStore.from_url)
for _scheme in ("redis", "rediss", "unix"):
    ONLINE_STORES.register(_scheme, RedisOnlineStore.from_url)


def open_online_store(url: str, *, namespace: str | None = None) -> OnlineStore:
    """``memory://`` (in-process), ``redis://host:port/db[?namespace=...]`` (``rediss://``
    for TLS; ``?cluster=1`` for Redis Cluster) or a plug-in
    (``package.module:ClassName://...``, built by its ``from_url``); ``namespace``, when
    given, replaces the URL's."""
    if namespace is not None:
        url = with_namespace(url, namespace)
    return ONLINE_STORES.open(url)
