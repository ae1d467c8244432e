"""Prediction logging off the response path: batches expanded into ``PredictionRecord``s and
appended to the ``predictions`` topic.

Behind the serving engine the queue is the native one (bounded in bytes) and the engine's one
log thread calls ``write``, which appends in chunks and retries a failed append (the native
queue absorbs the wait; past its bound records are dropped and counted). Standalone,
``submit`` queues a batch (bounded by ``max_pending``) for a thread of the logger's own.
At-least-once either way; ``close()`` flushes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from carrara.gateway.engine import PredictionBatch
from carrara.types import Topic, encode

__all__ = ["Appender", "PredictionLogger"]

log = logging.getLogger(__name__)


class Appender(Protocol):
    """The part of the event log the logger needs."""

    def append_many(self, topic: str, payloads: Sequence[bytes]) -> list[str]: ...


class PredictionLogger:
    def __init__(
        self,
        log_: Appender,
        *,
        topic: str = Topic.PREDICTIONS,
        max_pending: int = 10_000,
        flush_every_s: float = 0.05,
        max_records_per_append: int = 500,
        retry_after_s: float = 0.5,
    ) -> None:
        self._log = log_
        self._topic = topic
        self._queue: queue.Queue[PredictionBatch | None] = queue.Queue(maxsize=max_pending)
        self._flush_every_s = flush_every_s
        self._max = max_records_per_append
        self._retry_after_s = retry_after_s
        self.dropped = 0
        self.written = 0
        self.failures = 0
        self._closed = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def write(self, batches: Sequence[PredictionBatch]) -> None:
        """Append ``batches`` now, in chunks, retrying failed appends until ``close``'s
        deadline (the serving engine's log thread calls this)."""
        pending = [encode(r) for b in batches for r in b.records()]
        while pending:
            chunk = pending[: self._max]
            try:
                self._log.append_many(self._topic, chunk)
            except Exception:
                self.failures += 1
                if self._closed and self._closed_deadline_passed():
                    log.error(
                        "dropping %d prediction records at shutdown: log unavailable",
                        len(pending),
                    )
                    self.dropped += len(pending)
                    return
                log.warning("prediction log append failed; retrying", exc_info=True)
                time.sleep(self._retry_after_s)
                continue
            del pending[: len(chunk)]
            self.written += len(chunk)

    def submit(self, batch: PredictionBatch) -> None:
        """Queue a batch; never blocks the caller."""
        if self._closed:
            raise RuntimeError("prediction logger is closed")
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="carrara-prediction-log", daemon=True
                    )
                    self._thread.start()
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped += len(batch.entity_ids)

    def _run(self) -> None:
        pending: list[bytes] = []
        stop = False
        while not stop or pending:
            if not stop:
                try:
                    item = self._queue.get(timeout=self._flush_every_s)
                    if item is None:
                        stop = True
                    else:
                        pending.extend(encode(r) for r in item.records())
                    # Drain whatever else is queued without waiting.
                    while len(pending) < self._max:
                        item = self._queue.get_nowait()
                        if item is None:
                            stop = True
                            break
                        pending.extend(encode(r) for r in item.records())
                except queue.Empty:
                    pass
            while pending:
                chunk = pending[: self._max]
                try:
                    self._log.append_many(self._topic, chunk)
                except Exception:
                    self.failures += 1
                    log.warning("prediction log append failed; retrying", exc_info=True)
                    time.sleep(self._retry_after_s)
                    break
                del pending[: len(chunk)]
                self.written += len(chunk)
            if stop and pending and self.failures > 0 and self._closed_deadline_passed():
                log.error(
                    "dropping %d prediction records at shutdown: log unavailable", len(pending)
                )
                return

    def _closed_deadline_passed(self) -> bool:
        return time.monotonic() > self._deadline

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush everything queued (retrying for up to ``timeout_s``) and stop."""
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic() + timeout_s
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s + 1.0)
