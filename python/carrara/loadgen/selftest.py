"""A loopback HTTP server with a known latency distribution, to check the harness against.

Each request is answered after a delay drawn from a known distribution (a mixture of uniform
ranges); the draws follow a golden-ratio low-discrepancy sequence of quantiles, so even a few
hundred requests reproduce the distribution's percentiles closely and a test can compare the
harness's report with the truth within a few percent. ``stall`` makes the whole server stop
(its event loop blocked, as in a GC pause or a stop-the-world compaction) for a while, once:
requests that arrive meanwhile wait in the kernel, which is what coordinated omission hides.

Delays are timed on the server's own loop (millisecond timer granularity), so they run up to
about 1 ms long; distributions of tens of milliseconds keep that below 2 %.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import cast

import numpy as np

__all__ = ["DelayServer", "MixtureDelay"]

_GOLDEN = (5**0.5 - 1) / 2


class MixtureDelay:
    """Delays from a mixture of uniform ranges: ``[(weight, low_ms, high_ms), ...]``."""

    def __init__(self, parts: Sequence[tuple[float, float, float]]) -> None:
        w = np.asarray([p[0] for p in parts], dtype=np.float64)
        self.weights = w / w.sum()
        self.bounds = [(p[1], p[2]) for p in parts]
        self.cum = np.cumsum(self.weights)

    def quantile(self, q: float) -> float:
        """Inverse CDF in ms (components must not overlap and be listed in ascending order)."""
        k = min(int(np.searchsorted(self.cum, q, side="left")), len(self.bounds) - 1)
        before = self.cum[k - 1] if k else 0.0
        inner = (q - before) / self.weights[k]
        low, high = self.bounds[k]
        return float(low + min(max(inner, 0.0), 1.0) * (high - low))

    def percentiles_ms(self, qs: Sequence[float]) -> list[float]:
        return [self.quantile(q) for q in qs]


class _Handler(asyncio.Protocol):
    def __init__(self, server: DelayServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            pos = head.find(b"\r\ncontent-length:")
            length = 0
            if pos >= 0:
                stop = head.find(b"\r\n", pos + 2)
                length = int(head[pos + 17 : stop if stop >= 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            self.server.read_ns.append(time.monotonic_ns())
            delay_s = self.server.next_delay_ms() / 1e3
            asyncio.get_running_loop().call_later(delay_s, self.respond)

    def respond(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
            )


class DelayServer:
    """The server on its own thread and (plain asyncio) loop; ``with DelayServer(...) as s``.

    ``stall_after_s`` counts from the first request; the stall lasts ``stall_s``."""

    def __init__(
        self,
        delay: MixtureDelay,
        *,
        stall_after_s: float | None = None,
        stall_s: float = 0.0,
    ) -> None:
        self.delay = delay
        self.stall_after_s = stall_after_s
        self.stall_s = stall_s
        self.port = 0
        self.requests = 0
        self.stalled_at_ns: int | None = None
        self.stall_ended_ns: int | None = None
        self.read_ns: list[int] = []  # when each request was read
        self._loop = asyncio.new_event_loop()
        self._ready: Future[int] = Future()
        self._thread = threading.Thread(target=self._run, name="carrara-delay-server", daemon=True)
        self._server: asyncio.Server | None = None
        self.connections: set[_Handler] = set()

    def next_delay_ms(self) -> float:
        q = (self.requests * _GOLDEN + 0.5 * _GOLDEN) % 1.0
        self.requests += 1
        if self.requests == 1 and self.stall_after_s is not None:
            self._loop.call_later(self.stall_after_s, self._stall)
        return self.delay.quantile(q)

    def _stall(self) -> None:
        self.stalled_at_ns = time.monotonic_ns()
        time.sleep(self.stall_s)  # blocks the loop: nothing is read or answered meanwhile
        self.stall_ended_ns = time.monotonic_ns()  # a busy machine may add to the nominal stall

    @property
    def stall_ms(self) -> float | None:
        """How long the stall really lasted (the thread may wake late on a busy machine)."""
        if self.stalled_at_ns is None or self.stall_ended_ns is None:
            return None
        return (self.stall_ended_ns - self.stalled_at_ns) / 1e6

    def backlog_ms(self, queued: int) -> float:
        """How long after the stall the server took to read the ``queued`` requests that piled
        up during it: real server-side delay that the ideal model of a stall leaves out (and
        that a correct client must see too)."""
        if self.stall_ended_ns is None or queued < 1:
            return 0.0
        after = sorted(t for t in self.read_ns if t >= self.stall_ended_ns)
        if not after:
            return 0.0
        return (after[min(queued, len(after)) - 1] - self.stall_ended_ns) / 1e6

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> int:
            # A deep accept backlog: during a stall the open-loop client opens a connection
            # per outstanding request, and the kernel must queue them rather than drop SYNs.
            self._server = await self._loop.create_server(
                lambda: _Handler(self), "127.0.0.1", 0, backlog=4096
            )
            port: int = self._server.sockets[0].getsockname()[1]
            return port

        try:
            self._ready.set_result(self._loop.run_until_complete(start()))
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._loop.run_forever()

    def __enter__(self) -> DelayServer:
        self._thread.start()
        self.port = self._ready.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for handler in list(self.connections):
                if handler.transport is not None:
                    handler.transport.close()
            await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
