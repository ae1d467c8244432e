"""The online store on a real Redis Cluster the tests start (3 masters; 3 more as replicas for
the failover test): values equal to the embedded store's, keys spread over every master, one
round trip per node, MOVED/ASK/TRYAGAIN followed, and reads degraded (never failed) while a
master is down or failing over, complete again once it is back or its replica is promoted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from carrara.errors import UnavailableError
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.feature_cache.online_store import (
    RedisClusterOnlineStore,
    open_online_store,
)
from carrara.feature_cache.redis_cluster import SHARDS, key_slot, shard_tags
from tests.redis_cluster import RedisCluster, available, redis_cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="redis-server / redis-cli are not installed"),
]

N = 3_000
DEFS = Definitions(
    entities=(
        Entity(name="driver", join_key="driver_id"),
        Entity(name="rider", join_key="rider_id"),
    ),
    groups=(
        FeatureGroup(
            name="trips",
            entity="driver",
            features=tuple(Feature(name=f"f{i}") for i in range(16)),
            ttl_days=0.0,
        ),
        FeatureGroup(
            name="ratings",
            entity="rider",
            features=(Feature(name="rating", dtype="float32"), Feature(name="n", dtype="int64")),
            ttl_days=0.0,
        ),
    ),
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """3 masters, no replicas (a killed master stays down until restarted)."""
    with redis_cluster(masters=3) as c:
        yield c


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port)


def _service(root: Path, online_url: str, namespace: str = "t") -> FeatureService:
    svc = FeatureService.open(
        catalog_url=f"sqlite:///{root / 'catalog.db'}",
        offline_path=str(root / "offline"),
        online_url=online_url,
        namespace=namespace,
    )
    svc.apply(DEFS)
    return svc


def _fill(svc: FeatureService, n: int = N) -> None:
    now = pd.Timestamp.now(tz="UTC")
    rng = np.random.default_rng(7)
    trips = pd.DataFrame(
        {"driver_id": [f"d{i}" for i in range(n)], "event_timestamp": now}
        | {f"f{j}": rng.random(n) for j in range(16)}
    )
    ratings = pd.DataFrame(
        {
            "rider_id": [f"r{i}" for i in range(n)],
            "event_timestamp": now,
            "rating": rng.random(n).astype(np.float32),
            "n": rng.integers(0, 1000, n),
        }
    )
    svc.ingest("trips", trips)
    svc.ingest("ratings", ratings)
    svc.materialize()


@pytest.fixture(scope="module")
def filled(
    cluster: RedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FeatureService, FeatureService]]:
    """The same rows materialized into the cluster and into an embedded store."""
    root = tmp_path_factory.mktemp("fs")
    on_cluster = _service(root / "c", cluster.url)
    embedded = _service(root / "e", "memory://")
    _fill(on_cluster)
    _fill(embedded)
    yield on_cluster, embedded
    on_cluster.close()
    embedded.close()


def _ids(prefix: str, n: int = N) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _assert_same(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(a.found, b.found)
    np.testing.assert_array_equal(a.missing, b.missing)
    np.testing.assert_array_equal(a.values, b.values)


def test_sdk_reads_equal_the_embedded_store(
    filled: tuple[FeatureService, FeatureService],
) -> None:
    on_cluster, embedded = filled
    assert isinstance(on_cluster.online, RedisClusterOnlineStore)
    for group, prefix in (("trips", "d"), ("ratings", "r")):
        ids = [*_ids(prefix), "absent-1", "absent-2"]
        for batch in (1, 100, 1000):
            for start in range(0, len(ids), 997):
                chunk = ids[start : start + batch]
                got = on_cluster.get_online(group, chunk)
                want = embedded.get_online(group, chunk)
                _assert_same(got, want)
        whole = on_cluster.get_online(group, ids[:1000], features=None)
        assert whole.found.all()
    assert on_cluster.online.stats.degraded_keys == 0  # type: ignore[attr-defined]


def test_freshness_is_recorded_as_on_the_embedded_store(
    filled: tuple[FeatureService, FeatureService],
) -> None:
    on_cluster, embedded = filled
    got = {f.group: f for f in on_cluster.freshness()}
    want = {f.group: f for f in embedded.freshness()}
    assert set(got) == set(want) == {"ratings", "trips"}
    for name, f in got.items():
        assert f.rows_last_write == want[name].rows_last_write and f.rows_last_write
        assert f.stale is want[name].stale is False
        # Each service was filled with its own "now" (seconds apart).
        assert f.newest_event_ts == pytest.approx(want[name].newest_event_ts, abs=30)
        assert f.age_s is not None and 0 <= f.age_s < 600


def test_keys_are_hash_tagged_and_spread_over_every_master(
    cluster: RedisCluster, filled: tuple[FeatureService, FeatureService]
) -> None:
    tags = shard_tags()
    assert len({key_slot(t) for t in tags}) == SHARDS
    masters = cluster.masters()
    assert len(masters) == 3
    counts = []
    freshness: list[bytes] = []
    for port in masters:
        node = _node(port)
        keys = list(node.scan_iter(count=1000))
        assert all(k.split(b"}", 1)[0] + b"}" in tags for k in keys)
        assert all(k.split(b"}", 1)[1].startswith(b"t:") for k in keys)  # the namespace
        # The freshness records: two keys behind one tag, so on one node.
        mine = [k for k in keys if b":carrara-freshness" in k]
        assert len(mine) in (0, 2)
        freshness += mine
        counts.append(len(keys) - len(mine))
        node.close()
    assert sorted(k.split(b"}", 1)[1] for k in freshness) == [
        b"t:carrara-freshness",
        b"t:carrara-freshness-event",
    ]
    assert sum(counts) == 2 * N
    assert min(counts) > 0.25 * 2 * N, counts  # even: each master holds about a third


def test_a_batch_read_is_one_round_trip_per_node(
    cluster: RedisCluster,
    filled: tuple[FeatureService, FeatureService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = filled[0].online
    assert isinstance(store, RedisClusterOnlineStore)
    keys = store.keys("trips", 1, _ids("d", 1000))
    store.get_many(keys)  # connections open
    for port in cluster.masters():
        _node(port).config_resetstat()
    sends: list[tuple[str, int]] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append((self.host, self.port))
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    values = store.get_many(keys)
    monkeypatch.undo()
    assert all(v is not None for v in values)
    assert sorted(p for _, p in sends) == cluster.masters()  # one send per node
    mgets = []
    for port in cluster.masters():
        stats = _node(port).info("commandstats")
        mgets.append(stats.get("cmdstat_mget", {}).get("calls", 0))
        assert "cmdstat_get" not in stats
    # One MGET per shard the batch touches (all of them here), spread over the three nodes.
    assert sum(mgets) == SHARDS and min(mgets) >= SHARDS // 4, mgets


def _owner(cluster: RedisCluster, slot: int) -> tuple[int, bytes]:
    for port in cluster.masters():
        for entry in _node(port).execute_command("CLUSTER SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                return int(entry[2][1]), entry[2][2]
    raise AssertionError(f"no owner for slot {slot}")


def _node_id(port: int) -> bytes:
    return _node(port).execute_command("CLUSTER MYID")  # type: ignore[no-any-return]


def test_moved_ask_and_tryagain_while_a_slot_migrates(
    cluster: RedisCluster, filled: tuple[FeatureService, FeatureService]
) -> None:
    on_cluster, embedded = filled
    store = on_cluster.online
    assert isinstance(store, RedisClusterOnlineStore)
    keys = store.keys("trips", 1, _ids("d"))
    before = store.get_many(keys)
    slot = key_slot(shard_tags()[5])
    src_port, src_id = _owner(cluster, slot)
    dst_port = next(p for p in cluster.masters() if p != src_port)
    dst_id = _node_id(dst_port)
    src, dst = _node(src_port), _node(dst_port)
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    moving = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100_000)
    assert moving
    half = moving[: len(moving) // 2]
    src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *half)
    redirects = store.stats.redirects
    assert store.get_many(keys) == before  # TRYAGAIN -> single GETs -> ASK for the moved half
    assert store.stats.redirects > redirects
    src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *moving[len(half) :])
    for port in cluster.masters():
        _node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    refreshes = store.stats.refreshes
    assert store.get_many(keys) == before  # MOVED -> slot map refreshed -> retried
    assert store.stats.refreshes > refreshes
    _assert_same(on_cluster.get_online("trips", _ids("d")), embedded.get_online("trips", _ids("d")))
    # Writes follow the move too.
    vec_keys = store.keys("ratings", 1, ["r-new"])
    store.set_many([(vec_keys[0], b"x", None)])
    assert store.get_many(vec_keys) == [b"x"]
    store.delete_many(vec_keys)
    assert store.get_many(vec_keys) == [None]


def _until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_killed_master_degrades_reads_until_it_restarts(
    cluster: RedisCluster, filled: tuple[FeatureService, FeatureService]
) -> None:
    on_cluster, embedded = filled
    store = on_cluster.online
    assert isinstance(store, RedisClusterOnlineStore)
    ids = _ids("d")
    keys = store.keys("trips", 1, ids)
    want = store.get_many(keys)
    victim = cluster.masters()[1]
    _node(victim).save()  # no persistence configured: a snapshot to come back with
    victim_slots = {
        s
        for e in _node(victim).execute_command("CLUSTER SLOTS")
        if int(e[2][1]) == victim
        for s in range(int(e[0]), int(e[1]) + 1)
    }
    on_victim = [
        i for i, k in enumerate(keys) if key_slot(store.io.physical([k])[0][0]) in victim_slots
    ]
    assert 0 < len(on_victim) < len(keys)
    cluster.kill(victim)
    for _ in range(3):  # degraded, not failed: that node's keys missing, the rest served
        got = store.get_many(keys)
        assert [i for i, v in enumerate(got) if v is None] == on_victim
        assert all(got[i] == want[i] for i in range(len(keys)) if i not in set(on_victim))
        sdk = on_cluster.get_online("trips", ids)
        assert int((~sdk.found).sum()) == len(on_victim)
    assert store.stats.degraded_keys >= 3 * len(on_victim)
    with pytest.raises(UnavailableError, match="unreachable"):
        store.set_many([(keys[on_victim[0]], b"x", None)])
    time.sleep(1.5)  # past the node timeout: the others mark it failed, and still serve
    got = store.get_many(keys)
    assert sum(v is None for v in got) == len(on_victim)
    cluster.start(victim)
    waited = _until(lambda: store.get_many(keys) == want, 20, "reads complete after restart")
    assert waited < 20
    _assert_same(on_cluster.get_online("trips", ids), embedded.get_online("trips", ids))
    cluster.wait_ok()


def test_failover_degrades_reads_then_the_promoted_replica_serves(tmp_path: Path) -> None:
    with redis_cluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        svc = _service(tmp_path, cluster.url, namespace="")
        _fill(svc, 1000)
        store = svc.online
        assert isinstance(store, RedisClusterOnlineStore)
        keys = store.keys("ratings", 1, _ids("r", 1000))
        want = store.get_many(keys)
        assert all(v is not None for v in want)
        masters = cluster.masters()
        victim = masters[0]
        master = _node(victim)

        def replicated() -> bool:
            info = master.info("replication")
            slave = info.get("slave0")
            return isinstance(slave, dict) and slave["offset"] == info["master_repl_offset"]

        _until(replicated, 10, "replica caught up")
        cluster.kill(victim)
        got = store.get_many(keys)
        lost = sum(v is None for v in got)
        assert 0 < lost < len(keys)  # degraded, not failed
        assert svc.get_online("ratings", _ids("r", 1000)).found.sum() == len(keys) - lost
        waited = _until(lambda: store.get_many(keys) == want, 20, "replica promoted")
        assert victim not in cluster.masters() and len(cluster.masters()) == 3
        assert store.stats.degraded_keys >= lost
        print(f"failover: reads complete again {waited:.1f} s after the master was killed")
        svc.close()


def test_the_gateway_reads_a_cluster_through_the_python_store(
    filled: tuple[FeatureService, FeatureService],
) -> None:
    from carrara.gateway.embedded import StoreReader, serving_store

    store = filled[0].online
    reader = serving_store(store)
    assert isinstance(reader, StoreReader)  # the C++ core reads standalone Redis only
    # The core asks for un-namespaced keys; the reader adds the namespace, the store the tag.
    got = reader.mget(["trips:1:d1", "trips:1:d2", "trips:1:nope"])
    assert got[0] is not None and got[1] is not None and got[2] is None


def test_open_by_url_keeps_namespace_and_options(cluster: RedisCluster) -> None:
    store = open_online_store(cluster.url, namespace="ns")
    assert isinstance(store, RedisClusterOnlineStore)
    assert store.keys("g", 2, ["e"]) == ["ns:g:2:e"]  # logical keys as on standalone Redis
    store.set_many([("ns:g:2:e", b"v", None)])
    assert store.get_many(["ns:g:2:e", "ns:g:2:f"]) == [b"v", None]
    store.delete_many(["ns:g:2:e"])
    store.close()


def test_any_entity_id_round_trips(cluster: RedisCluster) -> None:
    """Non-ASCII ids, and braces that would be a hash tag of their own in an untagged key."""
    store = open_online_store(cluster.url, namespace="ids")
    ids = ["é", "a:b", "{x}", "}{", "日本", "", " ", *(f"{{u{i}}}" for i in range(200))]
    keys = store.keys("g", 1, ids)
    store.set_many([(k, k.encode(), None) for k in keys])
    assert store.get_many(keys) == [k.encode() for k in keys]
    assert store.get_many([keys[0], "ids:g:1:absent", keys[-1]]) == [
        keys[0].encode(),
        None,
        keys[-1].encode(),
    ]
    store.delete_many(keys)
    assert store.get_many(keys) == [None] * len(keys)
    store.close()
