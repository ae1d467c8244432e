"""FeatureCache: LRU order, TTL with a fake clock, stats, and concurrent use without the GIL."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from carrara.core import FeatureCache, FeatureVector, ManualClock, encode_feature_vector
from carrara.errors import DecodeError, InvalidArgumentError


def fv(key: str, value: float = 1.0) -> bytes:
    return encode_feature_vector(key, "g", 1, np.array([value], np.float32))


def test_defaults_match_the_seed_gateway() -> None:
    cache = FeatureCache()
    assert (cache.capacity, cache.ttl_seconds, cache.shards) == (10_000, 30.0, 16)


def test_lru_order_and_eviction() -> None:
    cache = FeatureCache(capacity=3, shards=1)
    for k in "abc":
        cache.put(k, fv(k))
    assert cache.keys_by_recency() == ["c", "b", "a"]
    assert cache.get("a") is not None  # a becomes most recent
    assert cache.keys_by_recency() == ["a", "c", "b"]
    cache.put("d", fv("d"))  # evicts b, the least recently used
    assert cache.keys_by_recency() == ["d", "a", "c"]
    assert cache.get("b") is None
    cache.put("c", fv("c", 9.0))  # replace in place: no eviction, moves to front
    assert cache.keys_by_recency() == ["c", "d", "a"]
    got = cache.get("c")
    assert got is not None and got.values.tolist() == [9.0]
    assert cache.stats() == {
        "hits": 2,
        "misses": 1,
        "insertions": 5,
        "evictions": 1,
        "expirations": 0,
        "size": 3,
    }


def test_capacity_is_exact_over_shards() -> None:
    cache = FeatureCache(capacity=100, shards=7)
    for i in range(1_000):
        cache.put(f"k{i}", fv("k"))
    assert len(cache) <= 100
    assert cache.stats()["evictions"] == 1_000 - len(cache)
    assert sum(len(cache.keys_by_recency(s)) for s in range(7)) == len(cache)


def test_ttl_expiry_with_fake_clock() -> None:
    clock = ManualClock(100.0)
    cache = FeatureCache(capacity=10, ttl_seconds=30.0, shards=1, clock=clock)
    cache.put("a", fv("a"))
    cache.put("short", fv("short"), ttl_seconds=5.0)
    clock.advance(4.999)
    assert cache.get("short") is not None
    clock.advance(0.001)  # exactly at expiry: gone
    assert cache.get("short") is None
    assert "a" in cache
    clock.set(129.999)
    assert cache.get("a") is not None
    clock.set(130.0)
    assert "a" not in cache
    assert cache.get("a") is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["expirations"], s["size"]) == (2, 2, 2, 0)


def test_purge_expired_and_expired_victims() -> None:
    clock = ManualClock()
    cache = FeatureCache(capacity=4, ttl_seconds=10.0, shards=1, clock=clock)
    for k in "abcd":
        cache.put(k, fv(k), ttl_seconds=1.0 if k in "ab" else None)
    clock.advance(2.0)
    assert cache.purge_expired() == 2
    assert sorted(cache.keys_by_recency()) == ["c", "d"]
    cache.put("e", fv("e"), ttl_seconds=1.0)
    cache.put("f", fv("f"))
    clock.advance(5.0)
    cache.put("g", fv("g"))  # full: the LRU victim "c" is still live -> an eviction
    assert cache.stats()["evictions"] == 1
    assert cache.stats()["expirations"] == 2


def test_erase_clear_contains() -> None:
    cache = FeatureCache(capacity=10)
    cache.put_many(["a", "b"], [fv("a"), FeatureVector("b", "g", 1, [2.0])])
    assert cache.erase("a") and not cache.erase("a")
    assert [v.entity_id if v else None for v in cache.get_many(["a", "b"])] == [None, "b"]
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity"),
        ({"ttl_seconds": 0.0}, "ttl_seconds"),
        ({"ttl_seconds": -1.0}, "ttl_seconds"),
        ({"shards": 0}, "shards"),
    ],
)
def test_invalid_options(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        FeatureCache(**kwargs)  # type: ignore[arg-type]


def test_bad_values_are_refused_without_side_effects() -> None:
    cache = FeatureCache(capacity=10)
    with pytest.raises(DecodeError):
        cache.put("a", b"\xff\xff\xff")
    with pytest.raises(TypeError, match="must be bytes"):
        cache.put("a", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be str"):
        cache.put(b"a", fv("a"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="2 keys and 1 values"):
        cache.put_many(["a", "b"], [fv("a")])
    with pytest.raises(DecodeError):
        cache.put_many(["a", "b"], [fv("a"), b"\xff"])
    assert len(cache) == 0
    assert cache.stats()["insertions"] == 0


def test_threads_hammer_the_cache() -> None:
    """Eight threads mix puts and gets; the cache releases the GIL, so they really overlap.

    Invariants: size never exceeds capacity, counters add up, and every value read is the one
    written for that key (values encode their key number)."""
    cache = FeatureCache(capacity=500, shards=8)
    encoded = [fv(f"k{i}", float(i)) for i in range(2_000)]
    gets = [0] * 8
    wrong: list[str] = []

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        keys = rng.integers(0, 2_000, size=5_000)
        ops = rng.integers(0, 3, size=5_000)
        for key, op in zip(keys, ops, strict=True):
            i = int(key)
            if op == 0:
                cache.put(f"k{i}", encoded[i])
            else:
                gets[t] += 1
                v = cache.get(f"k{i}")
                if v is not None and (v.values[0] != i or v.entity_id != f"k{i}"):
                    wrong.append(f"k{i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert not wrong
    assert s["hits"] + s["misses"] == sum(gets)
    assert s["hits"] > 0 and s["misses"] > 0
    assert len(cache) <= 500
    assert s["size"] == len(cache)
    assert s["insertions"] - s["evictions"] - s["expirations"] >= len(cache)
