# mypy: disable-error-code="import-untyped"
"""Streaming materialization: feature-source rows from the event log, through the group's
transform, into the online store and the offline store.

Producers publish :class:`FeatureUpdate` messages (msgpack) to the ``feature-updates`` topic;
:class:`StreamingMaterializer` consumes them in a consumer group (at-least-once: a batch is
acked only after both stores are written; a replay is harmless because offline duplicates are
equal rows and online writes keep the most recent value).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from carrara.errors import InvalidArgumentError
from carrara.eventlog import EventLog
from carrara.feature_cache.catalog import RegisteredGroup
from carrara.feature_cache.materialize import table_to_vectors
from carrara.feature_cache.offline_store import OfflineStore
from carrara.feature_cache.online_store import OnlineStore
from carrara.types import Topic

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "FeatureUpdate",
    "StreamResult",
    "StreamingMaterializer",
    "publish_rows",
]

log = logging.getLogger(__name__)


class FeatureUpdate(msgspec.Struct, frozen=True):
    """Source rows for one feature group (before its transform). Each row needs the
    entity id (``entity_id`` or the entity's join key) and ``event_timestamp``."""

    group: str
    rows: list[dict[str, Any]]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(FeatureUpdate)


def publish_rows(
    log_: EventLog, group: str, rows: Sequence[dict[str, Any]], *, batch: int = 500
) -> list[str]:
    """Publish source rows for ``group`` (``batch`` rows per event); returns event ids."""
    payloads = [
        _encoder.encode(FeatureUpdate(group, list(rows[i : i + batch])))
        for i in range(0, len(rows), batch)
    ]
    return log_.append_many(Topic.FEATURE_UPDATES, payloads)


class StreamResult(msgspec.Struct):
    events: int = 0
    rows: int = 0
    online_written: int = 0
    offline_rows: int = 0
    skipped_events: int = 0


class StreamingMaterializer:
    """A consumer of ``feature-updates`` that applies each group's transform and writes both
    stores. ``resolve(name)`` gives the group version to write (normally the latest);
    ``prepare(group, rows)`` applies its transform and returns an Arrow table."""

    def __init__(
        self,
        event_log: EventLog,
        offline: OfflineStore,
        online: OnlineStore,
        resolve: Callable[[str], RegisteredGroup],
        prepare: Callable[[RegisteredGroup, list[dict[str, Any]]], pa.Table],
        *,
        consumer_group: str = "feature-materializer",
        consumer: str | None = None,
    ) -> None:
        self.log = event_log
        self.offline = offline
        self.online = online
        self._resolve = resolve
        self._prepare = prepare
        self.consumer_group = consumer_group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"

    def run_once(self, *, count: int = 100, block_ms: int = 0) -> StreamResult:
        """Consume up to ``count`` events, write them, ack them."""
        result = StreamResult()
        events = self.log.read(
            Topic.FEATURE_UPDATES,
            self.consumer_group,
            self.consumer,
            count=count,
            block_ms=block_ms,
        )
        if not events:
            return result
        by_group: dict[str, tuple[list[dict[str, Any]], list[bytes]]] = {}
        dead: list[bytes] = []
        for event in events:
            result.events += 1
            try:
                update = _decoder.decode(event.payload)
            except msgspec.DecodeError as exc:
                # A poison message would block the consumer forever: set it aside.
                log.error(
                    "malformed feature update %s to %s: %s",
                    event.id,
                    Topic.FEATURE_UPDATES_DEAD,
                    exc,
                )
                result.skipped_events += 1
                dead.append(event.payload)
                continue
            rows, payloads = by_group.setdefault(update.group, ([], []))
            rows.extend(update.rows)
            payloads.append(event.payload)
        for name, (rows, payloads) in by_group.items():
            try:
                self._write(name, rows, result)
            except (LookupError, InvalidArgumentError) as exc:
                # Rows that can never be written (unknown group, rows the schema or transform
                # refuses) go to the dead-letter topic, event by event, so one bad event does
                # not take its neighbours along; other errors (a store down) propagate
                # un-acked and the events are delivered again.
                if len(payloads) == 1:
                    log.error("event for %r to %s: %s", name, Topic.FEATURE_UPDATES_DEAD, exc)
                    result.skipped_events += 1
                    dead.append(payloads[0])
                    continue
                for payload in payloads:
                    try:
                        self._write(name, _decoder.decode(payload).rows, result)
                    except (LookupError, InvalidArgumentError) as one:
                        log.error("event for %r to %s: %s", name, Topic.FEATURE_UPDATES_DEAD, one)
                        result.skipped_events += 1
                        dead.append(payload)
        if dead:
            self.log.append_many(Topic.FEATURE_UPDATES_DEAD, dead)
        self.log.ack(Topic.FEATURE_UPDATES, self.consumer_group, [e.id for e in events])
        return result

    def _write(self, name: str, rows: list[dict[str, Any]], result: StreamResult) -> None:
        group = self._resolve(name)
        table = self._prepare(group, rows)
        if group.definition.offline:
            result.offline_rows += self.offline.append(group, table)
        if group.definition.online:
            latest = _latest_per_entity(table)
            for vectors in table_to_vectors(group, latest):
                result.online_written += self.online.write_vectors(vectors, group.definition.ttl_us)
        result.rows += table.num_rows

    def run(
        self,
        *,
        max_events: int | None = None,
        max_seconds: float | None = None,
        stop_when_idle: bool = False,
        block_ms: int = 500,
        count: int = 100,
    ) -> StreamResult:
        """Consume until ``max_events`` events, ``max_seconds``, or (``stop_when_idle``) the
        first empty read."""
        total = StreamResult()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while True:
            if max_events is not None and total.events >= max_events:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            want = count if max_events is None else min(count, max_events - total.events)
            r = self.run_once(count=want, block_ms=0 if stop_when_idle else block_ms)
            for field in msgspec.structs.fields(StreamResult):
                setattr(total, field.name, getattr(total, field.name) + getattr(r, field.name))
            if r.events == 0 and stop_when_idle:
                break
        return total


def _latest_per_entity(table: pa.Table) -> pa.Table:
    """Each entity's row with the greatest (event_timestamp, created_timestamp)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table,
        sort_keys=[
            ("entity_id", "ascending"),
            ("event_timestamp", "descending"),
            ("created_timestamp", "descending"),
        ],
    )
    ordered = table.take(order)
    ids = ordered.column("entity_id").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), first.fill_null(True)])
    return ordered.filter(keep)
