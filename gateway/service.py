"""The handler path shared by the gRPC and HTTP fronts: one ``Gateway`` per process.

It runs ``ServingEngine.predict`` on a small thread pool (the engine releases the GIL in the
native core and in ONNX Runtime), records metrics, and tracks readiness and draining.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from carrara.errors import CarraraError, ResourceExhaustedError, UnavailableError
from carrara.gateway.engine import Overrides, PredictionResult, ServingEngine
from carrara.gateway.metrics import GatewayMetrics

__all__ = ["Gateway"]


class Gateway:
    def __init__(
        self,
        engine: ServingEngine,
        *,
        threads: int = 8,
        inline_max_batch: int = 16,
        max_in_flight: int = 64,
    ) -> None:
        """``max_in_flight`` bounds requests admitted by the fronts (running or queued for the
        pool); past it they are refused at once, so accepted ones keep their latency."""
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.inline_max_batch = inline_max_batch
        self.metrics = GatewayMetrics(engine.cache)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="carrara-predict")
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self.engine.models())

    async def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
    ) -> PredictionResult:
        if self.draining:
            raise UnavailableError("gateway is shutting down; retry on another replica")
        if self._active >= self.max_in_flight:
            self.metrics.shed.inc()
            self.metrics.errors.labels(model, "RESOURCE_EXHAUSTED").inc()
            raise ResourceExhaustedError(
                f"gateway has {self._active} requests in flight (limit {self.max_in_flight}); "
                "retry with backoff"
            )
        self._active += 1
        self._idle.clear()
        try:
            # Cache hits through an in-process model take tens of microseconds of native
            # work: cheaper on the loop than two thread hops. Anything needing the online
            # store (or a remote backend) goes to the pool, so the loop never waits on I/O.
            cached = (
                self.engine.try_cached(model, entity_ids, overrides, request_id)
                if len(entity_ids) <= self.inline_max_batch
                else None
            )
            if cached is not None:
                result = cached
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self._pool, self.engine.predict, model, entity_ids, overrides, request_id
                )
        except CarraraError as exc:
            if isinstance(exc, ResourceExhaustedError):
                self.metrics.shed.inc()
            self.metrics.errors.labels(model, exc.grpc_code).inc()
            raise
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        self._record(result)
        return result

    def _record(self, result: PredictionResult) -> None:
        seconds = result.latency_us / 1e6
        seen: dict[tuple[str, int], int] = {}
        for variant, version in zip(result.variants, result.versions, strict=True):
            seen[(variant, version)] = seen.get((variant, version), 0) + 1
        for (variant, version), count in seen.items():
            self.metrics.latency.labels(result.model, str(version), variant).observe(seconds)
            self.metrics.predictions.labels(result.model, str(version), variant).inc(count)
        degraded = sum(result.degraded)
        if degraded:
            self.metrics.degraded.labels(result.model).inc(degraded)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, wait for in-flight requests to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.close()
