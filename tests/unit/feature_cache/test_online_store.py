"""The online store: the same tests on the in-process store and real Redis."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from carrara.core import (
    Assembler,
    AssemblerSpec,
    FeatureRef,
    FeatureVector,
    GroupSchema,
    decode_feature_vector,
)
from carrara.errors import ConfigError
from carrara.feature_cache import (
    EmbeddedOnlineStore,
    OnlineStore,
    RedisOnlineStore,
    open_online_store,
)

DAY_US = 86_400 * 1_000_000


def _vec(entity: str, values: list[float], event_us: int, created_us: int = 0) -> FeatureVector:
    return FeatureVector(
        entity, "trips", 3, np.array(values, np.float32), None, event_us, created_us
    )


def _now_us() -> int:
    return time.time_ns() // 1000


def test_keys_are_the_gateway_format(store: OnlineStore) -> None:
    ns = store.namespace
    assert store.keys("trips", 3, ["e1", "e:2"]) == [f"{ns}:trips:3:e1", f"{ns}:trips:3:e:2"]
    assembler = Assembler(
        AssemblerSpec(
            groups=(GroupSchema("trips", 3, ("a",)),), features=(FeatureRef("trips", "a"),)
        )
    )
    plain = open_online_store("memory://")
    assert plain.keys("trips", 3, ["e1"]) == [assembler.key(0, "e1")]


def test_set_get_and_delete(store: OnlineStore) -> None:
    keys = store.keys("trips", 3, ["a", "b", "c"])
    store.set_many([(keys[0], b"one", None), (keys[2], b"three", None)])
    assert store.get_many(keys) == [b"one", None, b"three"]
    assert store.get_many([]) == []
    store.delete_many([keys[0]])
    assert store.read("trips", 3, ["a", "c"]) == [None, b"three"]


def test_values_expire_at_their_absolute_time(store: OnlineStore) -> None:
    (key,) = store.keys("trips", 3, ["short"])
    store.set_many([(key, b"v", store.now_ms() + 800)])
    assert store.get_many([key]) == [b"v"]
    time.sleep(0.95)
    assert store.get_many([key]) == [None]


def test_write_vectors_honours_ttl_and_never_goes_back_in_time(store: OnlineStore) -> None:
    now = _now_us()
    ttl = 2 * DAY_US
    fresh = _vec("e1", [1, 2], now - DAY_US, now)
    stale = _vec("e2", [3, 4], now - 3 * DAY_US, now)  # older than the TTL: never written
    assert store.write_vectors([fresh, stale], ttl) == 1
    got = store.read("trips", 3, ["e1", "e2"])
    assert got[1] is None
    assert got[0] is not None
    assert decode_feature_vector(got[0]).values.tolist() == [1.0, 2.0]
    # an older event (a late or replayed one) does not replace a newer value
    older = _vec("e1", [9, 9], now - 2 * DAY_US + 10**6, now + 5)
    assert store.write_vectors([older], ttl) == 0
    # the same event written later wins the tie; a replay of it writes nothing
    rewrite = _vec("e1", [5, 6], now - DAY_US, now + 1)
    assert store.write_vectors([rewrite], ttl) == 1
    assert store.write_vectors([rewrite], ttl) == 0
    got0 = store.read("trips", 3, ["e1"])[0]
    assert got0 is not None and decode_feature_vector(got0).values.tolist() == [5.0, 6.0]
    # without a TTL values do not expire
    assert store.write_vectors([_vec("e3", [7, 8], 0)], 0) == 1
    assert store.read("trips", 3, ["e3"])[0] is not None


def test_batch_read_is_one_round_trip(store: OnlineStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.connection

    ids = [f"e{i}" for i in range(1000)]
    store.write_vectors([_vec(e, [float(i)], 0) for i, e in enumerate(ids)], 0, only_newer=False)
    sent: list[int] = []
    original = redis.connection.Connection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(1)
        original(self, command, check_health=check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    values = store.read("trips", 3, [*ids, "missing"])
    assert values[-1] is None
    assert [decode_feature_vector(v).values[0] for v in values[:-1] if v] == list(range(1000))
    assert len(sent) == (1 if isinstance(store, RedisOnlineStore) else 0)


def test_any_entity_id_round_trips(store: OnlineStore) -> None:
    ids = ["ü-über", "日本", "a b\r\nc", "$3", ""]
    store.write_vectors([_vec(e, [float(i)], 0) for i, e in enumerate(ids)], 0)
    values = store.read("trips", 3, ids)
    assert [decode_feature_vector(v).entity_id for v in values if v] == ids


@pytest.mark.integration
def test_redis_reads_survive_a_dropped_connection(redis_url: str, redis_namespace: str) -> None:
    import socket

    store = open_online_store(redis_url, namespace=redis_namespace)
    assert isinstance(store, RedisOnlineStore)
    try:
        store.write_vectors([_vec("e1", [1.0], 0)], 0)
        pool = store.client.connection_pool
        conn = pool.get_connection()
        conn._sock.shutdown(socket.SHUT_RDWR)  # the server "went away" under a pooled conn
        pool.release(conn)
        assert store.read("trips", 3, ["e1"])[0] is not None
    finally:
        store.close()


def test_embedded_expiry_uses_the_injected_clock() -> None:
    now = [1_000]
    s = EmbeddedOnlineStore(clock=lambda: now[0])
    s.set_many([("k", b"v", 1_500), ("n", b"w", None)])
    assert s.get_many(["k", "n"]) == [b"v", b"w"]
    now[0] = 1_500
    assert s.get_many(["k", "n"]) == [None, b"w"]
    assert s.purge_expired() == 1 and len(s) == 1


def test_unknown_url() -> None:
    with pytest.raises(ConfigError, match="memory://"):
        open_online_store("cassandra://x")
