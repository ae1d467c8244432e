"""Redis Cluster I/O for the online store: hash-tagged keys, one pipelined round trip per node.

Key layout. A logical key ``[{namespace}:]{group}:{version}:{entity_id}`` is stored as
``{sNN}`` + the logical key: a hash tag naming one of :data:`SHARDS` shards, picked by CRC32
of the logical key. Each shard's tag is chosen to hash into its own 1/SHARDS stripe of the
16,384 slots, so the shards spread evenly over any contiguous slot layout (what
``redis-cli --cluster create`` and rebalancing produce). A batch read of any number of keys,
over any number of groups, is then at most SHARDS ``MGET`` commands, grouped per node into one
pipeline and sent to every node before any reply is read: one concurrent round trip per node.
Why 32 (``python -m bench.redis_cluster``, 3 masters on one 2-core box): untagged keys cost one
``MGET`` per slot (redis-py ``mget_nonatomic``, what the store did before), 3-4x slower at
100 keys and 7-14x at 1,000; 16, 32 and 64 shards are within the box's noise of each other
(fewer is a little faster for 100-key batches; 256 is 2-4x slower: up to 256 commands a
batch). 32 keeps a batch to <= 32 commands while the 3 masters hold 11/11/10 shards and
data can still spread over up to 32 masters (and move in 1/32 steps) when nodes are added. A
per-entity tag (all groups of an entity together) would make a batch of n entities n commands
again, so the tag ignores the entity/group structure on purpose. The layout is fixed by
SHARDS: changing it re-keys everything (re-materialize), like moving from standalone Redis
(untagged keys, read natively by the C++ gateway core) to a cluster.

Failures. Keys on a node that is unreachable (down, failing over) or answers CLUSTERDOWN come
back as None for that call (degraded: the caller sees them missing), the others are returned;
it is logged and counted in :class:`ClusterStats`. The slot map (``CLUSTER SLOTS``) is refreshed
on MOVED and after a node failure, so reads recover when the node returns or a replica is
promoted. ASK is followed for one command; TRYAGAIN (a slot mid-migration) splits the
``MGET`` into single-key reads. Writes to an unreachable node raise ``UnavailableError``.
"""

from __future__ import annotations

import binascii
import logging
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import msgspec

from carrara.errors import UnavailableError

__all__ = ["SHARDS", "ClusterStats", "RedisClusterIO", "shard_tags"]

log = logging.getLogger(__name__)

#: Hash-tag shards of the online keys (part of the key layout: changing it re-keys everything).
SHARDS = 32
SLOTS = 16384
#: Rounds of redirects (MOVED / ASK / TRYAGAIN) one call follows before giving up on a key.
MAX_ROUNDS = 4
#: After a node fails, calls skip it (its keys read as missing) for this long before retrying,
#: doubling up to MAX_DOWN_BACKOFF_S while it keeps failing.
DOWN_BACKOFF_S = 0.25
MAX_DOWN_BACKOFF_S = 2.0
#: Least time between two slot-map refreshes asked for by failures.
REFRESH_INTERVAL_S = 0.1


def key_slot(key: bytes) -> int:
    """Redis Cluster's slot of ``key`` (CRC16/XMODEM of the hash tag or the whole key)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def shard_tags(shards: int = SHARDS) -> list[bytes]:
    """The hash tag (with braces) of each shard: shard ``i`` hashes into the i-th of ``shards``
    equal slot stripes. Deterministic, so every writer and reader agrees."""
    tags = []
    for i in range(shards):
        lo, hi = i * SLOTS // shards, (i + 1) * SLOTS // shards
        j = 0
        while True:
            tag = b"{s%d.%d}" % (i, j)
            if lo <= key_slot(tag) < hi:
                tags.append(tag)
                break
            j += 1
    return tags


class ClusterStats(msgspec.Struct):
    """Counters of one store (monotonic since it was opened)."""

    degraded_calls: int = 0  # reads that returned some keys as missing because of a failure
    degraded_keys: int = 0  # keys returned missing because of a failure
    node_failures: int = 0  # connection failures to a node
    redirects: int = 0  # MOVED / ASK / TRYAGAIN replies followed
    refreshes: int = 0  # slot-map refreshes


Addr = tuple[str, int]


class _Cmd:
    """One command of a round: its packed bytes and where its reply goes."""

    __slots__ = ("asking", "idx", "keys", "multi", "node", "packed", "slot")

    def __init__(
        self, node: Addr, slot: int, packed: bytes, idx: list[int], multi: bool, keys: Any
    ) -> None:
        self.node = node
        self.slot = slot
        self.packed = packed  # RESP of the command
        self.idx = idx  # output positions of its keys, in reply order
        self.multi = multi  # the reply is a list (MGET)
        #: physical keys, or a callable building them (only a TRYAGAIN split needs them)
        self.keys = keys
        self.asking = False


def _error_kind(err: Exception) -> tuple[str, str]:
    """(code, rest) of an error reply, whichever parser produced it (redis-py's cluster parser
    turns MOVED/ASK/TRYAGAIN/CLUSTERDOWN into classes and strips the code)."""
    import redis

    message = str(err)
    for cls, code in (
        (redis.exceptions.MovedError, "MOVED"),
        (redis.exceptions.AskError, "ASK"),
        (redis.exceptions.TryAgainError, "TRYAGAIN"),
        (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    ):
        if isinstance(err, cls):
            return code, message
    code, _, rest = message.partition(" ")
    return code, rest


def _pack(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


def _pack_keys(command: bytes, keys: Sequence[bytes]) -> bytes:
    head = b"*%d\r\n$%d\r\n%s\r\n" % (len(keys) + 1, len(command), command)
    return head + b"".join([b"$%d\r\n%s\r\n" % (len(k), k) for k in keys])


_ASKING = _pack(b"ASKING")


class _Failed(Exception):
    """A node could not be reached or broke the connection."""


class RedisClusterIO:
    """A slot map and a connection pool per node; batch GET / SET / DEL of physical keys in one
    pipelined round trip per node. ``url`` is the seed node (``redis://host:port``)."""

    def __init__(self, url: str, shards: int = SHARDS) -> None:
        import redis

        seed = redis.ConnectionPool.from_url(url)
        kw = dict(seed.connection_kwargs)
        seed.disconnect()
        # A node that black-holes packets must not hang reads: bounded waits unless the URL
        # sets its own.
        if kw.get("socket_connect_timeout") is None:
            kw["socket_connect_timeout"] = 0.5
        if kw.get("socket_timeout") is None:
            kw["socket_timeout"] = 1.0
        self._kwargs = kw
        self._connection_class = seed.connection_class
        self._seeds: list[Addr] = [(str(kw.get("host", "127.0.0.1")), int(kw.get("port", 6379)))]
        self.tags = shard_tags(shards)
        self._tag_strs = [t.decode() for t in self.tags]
        self.shards = shards
        self._shard_slot = [key_slot(t) for t in self.tags]
        self._pools: dict[Addr, Any] = {}
        self._slot_node: list[Addr] = []
        self._down_until: dict[Addr, float] = {}
        self._failures: dict[Addr, int] = {}
        self._stale = False
        self._last_refresh = 0.0
        self._last_warning = 0.0
        self._lock = threading.Lock()
        self.stats = ClusterStats()
        self.refresh(force=True)

    # -- topology --------------------------------------------------------------------------

    def _pool(self, node: Addr) -> Any:
        pool = self._pools.get(node)
        if pool is None:
            import redis

            with self._lock:
                pool = self._pools.get(node)
                if pool is None:
                    kw = {**self._kwargs, "host": node[0], "port": node[1]}
                    pool = redis.ConnectionPool(connection_class=self._connection_class, **kw)
                    self._pools[node] = pool
        return pool

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the slot map from the first node that answers ``CLUSTER SLOTS``; without
        ``force`` at most every REFRESH_INTERVAL_S. Returns whether it was reloaded."""
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_INTERVAL_S:
            return False
        self._last_refresh = now
        candidates = list(dict.fromkeys([*self._slot_node_set(), *self._seeds]))
        # Nodes believed up first: a dead node costs a connect attempt.
        candidates.sort(key=lambda n: self._down_until.get(n, 0.0) > now)
        errors = []
        for node in candidates:
            try:
                slots = self._command(node, b"CLUSTER", b"SLOTS")
            except _Failed as exc:
                errors.append(f"{node[0]}:{node[1]} ({exc})")
                continue
            table: list[Addr] = [node] * SLOTS
            for entry in slots:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                addr = (host or node[0], int(master[1]))
                table[start : end + 1] = [addr] * (end - start + 1)
            self._slot_node = table
            self._stale = False
            self.stats.refreshes += 1
            return True
        if not self._slot_node:
            raise UnavailableError(
                "online store Redis Cluster is unreachable: no node answered CLUSTER SLOTS: "
                + "; ".join(errors)
            )
        return False

    def _slot_node_set(self) -> list[Addr]:
        return list(dict.fromkeys(self._slot_node))

    def nodes(self) -> list[Addr]:
        """The masters of the current slot map."""
        return self._slot_node_set()

    def _command(self, node: Addr, *args: bytes) -> Any:
        import redis

        pool = self._pool(node)
        try:
            conn = pool.get_connection()  # releases itself when the connect fails
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise _Failed(str(exc)) from exc
        try:
            conn.send_packed_command([_pack(*args)], check_health=False)
            return conn.read_response(disable_decoding=True)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            conn.disconnect()
            raise _Failed(str(exc)) from exc
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    # -- batches ----------------------------------------------------------------------------

    def physical(self, keys: Sequence[str]) -> tuple[list[bytes], list[int]]:
        """Physical keys (hash tag + logical key) and their shards."""
        tags, mask = self.tags, self.shards
        enc = [k.encode() for k in keys]
        shard = [zlib.crc32(b) % mask for b in enc]
        return [tags[s] + b for s, b in zip(shard, enc, strict=True)], shard

    def _mgets(self, keys: Sequence[str]) -> list[_Cmd]:
        """One ``MGET`` per shard present in ``keys`` (the hot path: shards by numpy, packing
        as one string per shard)."""
        import numpy as np

        n = len(keys)
        enc = [k.encode() for k in keys]
        shard = np.fromiter(map(zlib.crc32, enc), np.int64, n) % self.shards
        order = np.argsort(shard, kind="stable")
        counts = np.bincount(shard, minlength=self.shards)
        positions: list[int] = order.tolist()
        ordered = [keys[i] for i in positions]
        table, tags = self._slot_node, self._tag_strs
        cmds = []
        a = 0
        for s in np.flatnonzero(counts).tolist():
            b = a + int(counts[s])
            part = ordered[a:b]
            tag = tags[s]
            tl = len(tag)
            body = "".join([f"${len(k) + tl}\r\n{tag}{k}\r\n" for k in part])
            if body.isascii():  # character counts are byte counts
                packed = f"*{b - a + 1}\r\n$4\r\nMGET\r\n{body}".encode()
            else:
                packed = _pack_keys(b"MGET", self._phys(s, part))
            slot = self._shard_slot[s]
            cmds.append(_Cmd(table[slot], slot, packed, positions[a:b], True, (s, part)))
            a = b
        return cmds

    def _phys(self, shard: int, logical: Sequence[str]) -> list[bytes]:
        tag = self.tags[shard]
        return [tag + k.encode() for k in logical]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of logical ``keys`` (None: absent, or on a node that cannot answer now)."""
        if not keys:
            return []
        self._maybe_refresh()
        out: list[bytes | None] = [None] * len(keys)
        lost = self._run(self._mgets(keys), out, write=False)
        if lost:
            self.stats.degraded_calls += 1
            self.stats.degraded_keys += lost
        return out

    def set_many(self, items: Sequence[tuple[str, bytes, int | None]]) -> None:
        """SET each key (with ``PXAT`` when it expires); raises UnavailableError when a key's
        node cannot be written."""
        if not items:
            return
        self._maybe_refresh()
        phys, shard = self.physical([k for k, _, _ in items])
        cmds = []
        table = self._slot_node
        for i, (key, (_, value, expires)) in enumerate(zip(phys, items, strict=True)):
            slot = self._shard_slot[shard[i]]
            args = (
                [b"SET", key, value]
                if expires is None
                else [b"SET", key, value, b"PXAT", b"%d" % expires]
            )
            cmds.append(_Cmd(table[slot], slot, _pack(*args), [i], False, [key]))
        self._run(cmds, [None] * len(items), write=True)

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        self._maybe_refresh()
        phys, shard = self.physical(keys)
        by_shard: dict[int, list[int]] = {}
        for i, s in enumerate(shard):
            by_shard.setdefault(s, []).append(i)
        table = self._slot_node
        cmds = []
        for s, idx in by_shard.items():
            slot = self._shard_slot[s]
            ks = [phys[i] for i in idx]
            cmds.append(_Cmd(table[slot], slot, _pack_keys(b"DEL", ks), idx, False, ks))
        self._run(cmds, [None] * len(keys), write=True)

    def tag_of(self, logical: str) -> bytes:
        """The hash tag (shard) a logical key is stored under."""
        return self.tags[zlib.crc32(logical.encode()) % self.shards]

    def call(self, key: bytes, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        """Run ``commands`` (arguments naming physical keys in ``key``'s slot) on the node
        that holds ``key``, in one pipelined round trip, following redirects; their replies
        in order. Raises UnavailableError when the node cannot answer (small bookkeeping
        such as the freshness records, not the hot path)."""
        if not commands:
            return []
        self._maybe_refresh()
        slot = key_slot(key)
        node = self._slot_node[slot]
        cmds = [
            _Cmd(node, slot, _pack(*args), [i], False, [key]) for i, args in enumerate(commands)
        ]
        out: list[Any] = [None] * len(cmds)
        if self._run(cmds, out, write=False):
            raise UnavailableError(
                f"online store Redis Cluster could not answer for {key.decode(errors='replace')}"
            )
        return out

    def _maybe_refresh(self) -> None:
        if self._stale:
            self.refresh()

    def _run(self, cmds: list[_Cmd], out: list[bytes | None], *, write: bool) -> int:
        """Send ``cmds`` (one pipeline per node, all sent before any reply is read), follow
        redirects for up to MAX_ROUNDS; returns how many keys were lost to failures (reads) or
        raises UnavailableError (writes)."""
        import redis

        lost = 0
        failed_nodes: dict[Addr, str] = {}
        for round_ in range(MAX_ROUNDS):
            if not cmds:
                break
            by_node: dict[Addr, list[_Cmd]] = {}
            for c in cmds:
                by_node.setdefault(c.node, []).append(c)
            now = time.monotonic()
            sent: list[tuple[Addr, Any, Any, list[_Cmd]]] = []
            retry: list[_Cmd] = []
            for node, group in by_node.items():
                if self._down_until.get(node, 0.0) > now:
                    failed_nodes[node] = "marked down after a recent failure"
                    lost += self._lose(group, out)
                    continue
                pool = self._pool(node)
                try:
                    conn = pool.get_connection()  # releases itself when the connect fails
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    self._node_failed(node, exc)
                    failed_nodes[node] = str(exc)
                    lost += self._lose(group, out)
                    continue
                try:
                    conn.send_packed_command(
                        [b"".join([_ASKING + c.packed if c.asking else c.packed for c in group])],
                        check_health=False,
                    )
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    conn.disconnect()
                    pool.release(conn)
                    self._node_failed(node, exc)
                    failed_nodes[node] = str(exc)
                    lost += self._lose(group, out)
                    continue
                except BaseException:
                    conn.disconnect()
                    pool.release(conn)
                    raise
                sent.append((node, pool, conn, group))
            moved = False
            for k, (node, pool, conn, group) in enumerate(sent):
                pos = 0
                try:
                    for pos, c in enumerate(group):  # noqa: B007 (pos is read on failure)
                        try:
                            if c.asking:
                                conn.read_response(disable_decoding=True)
                            reply = conn.read_response(disable_decoding=True)
                        except redis.exceptions.ResponseError as err:
                            kind, detail = _error_kind(err)
                            if kind in ("MOVED", "ASK", "TRYAGAIN"):
                                moved |= self._redirect(c, kind, detail, retry)
                            else:  # CLUSTERDOWN and the like: this command's keys only
                                failed_nodes[node] = str(err)
                                self._stale = True
                                lost += self._lose([c], out)
                            continue
                        if not write:
                            if c.multi:
                                for i, v in zip(c.idx, reply, strict=True):
                                    out[i] = v
                            else:
                                out[c.idx[0]] = reply
                    self._failures.pop(node, None)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    conn.disconnect()
                    self._node_failed(node, exc)
                    failed_nodes[node] = str(exc)
                    lost += self._lose(group[pos:], out)
                except BaseException:
                    # Replies may be half read here and on the nodes not read yet: never
                    # reuse those connections.
                    for _, other_pool, other, _ in sent[k:]:
                        other.disconnect()
                        if other is not conn:
                            other_pool.release(other)
                    raise
                finally:
                    pool.release(conn)
            if moved:  # this call follows the MOVED targets; the map is for the next ones
                self._stale = True
                self.refresh(force=round_ == 0)
            cmds = retry
        if cmds:  # redirects not settled within MAX_ROUNDS
            failed_nodes[cmds[0].node] = "still redirecting (slot migrating?)"
            lost += self._lose(cmds, out)
        if failed_nodes:
            where = ", ".join(f"{h}:{p}: {why}" for (h, p), why in failed_nodes.items())
            if write:
                raise UnavailableError(
                    f"online store Redis Cluster is unreachable or refused the write: {where}"
                )
            now = time.monotonic()
            if now - self._last_warning >= 1.0:  # once a second while it lasts
                self._last_warning = now
                log.warning(
                    "online store read degraded: %d key(s) returned missing; %s", lost, where
                )
        return lost

    def _lose(self, cmds: Sequence[_Cmd], out: list[bytes | None]) -> int:
        n = 0
        for c in cmds:
            for i in c.idx:
                out[i] = None
            n += len(c.idx)
        return n

    def _node_failed(self, node: Addr, exc: BaseException) -> None:
        self.stats.node_failures += 1
        n = self._failures.get(node, 0) + 1
        self._failures[node] = n
        # Skipped for 0.25 s, doubling while it stays down (a node that times out would
        # otherwise cost every call a timeout); back at once when its slots move.
        backoff = min(DOWN_BACKOFF_S * 2 ** (n - 1), MAX_DOWN_BACKOFF_S)
        self._down_until[node] = time.monotonic() + backoff
        self._stale = True

    def _redirect(self, c: _Cmd, kind: str, detail: str, retry: list[_Cmd]) -> bool:
        """Queue ``c`` again after a redirect; returns whether the slot map moved."""
        self.stats.redirects += 1
        if kind in ("MOVED", "ASK"):  # "<slot> <host>:<port>"
            host, _, port = detail.split(" ")[-1].rpartition(":")
            c.node = (host or c.node[0], int(port))
            c.asking = kind == "ASK"
            retry.append(c)
            return kind == "MOVED"
        if c.multi and len(c.idx) > 1:
            # TRYAGAIN, a slot mid-migration: a multi-key read cannot be served; single keys
            # can (each on the source, or ASK to the target).
            keys = self._phys(*c.keys) if isinstance(c.keys, tuple) else c.keys
            for k, i in zip(keys, c.idx, strict=True):
                get = _Cmd(c.node, c.slot, _pack(b"GET", k), [i], False, [k])
                get.multi = False
                retry.append(get)
            return False
        time.sleep(0.005)
        retry.append(c)
        return False

    def close(self) -> None:
        for pool in self._pools.values():
            pool.disconnect()
