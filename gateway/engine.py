"""The serving engine: the Python face of the native engine (``carrara._native.Engine``).

Per request, everything runs in C++ with no Python: admission, routing, the feature cache
(with negative entries), the online-store MGET (native Redis client, or a Python store called
once per request), assembly, dynamic batching and execution (an in-process model gets one GIL
acquisition per batch; Triton is called over native gRPC), breakers and fallbacks, and the
prediction log queue (bounded in bytes). The native gRPC front calls the same engine; the HTTP
front and ``Embedded`` call ``predict`` here. Python configures deployments and drains the log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara import _native
from carrara.core import AssemblerSpec, FeatureCache, RoutingPolicy
from carrara.errors import InvalidArgumentError, NotFoundError, error_for_code
from carrara.gateway.backends import Backend
from carrara.types import PredictionRecord

log = logging.getLogger(__name__)

__all__ = [
    "ModelDeployment",
    "Overrides",
    "OnlineReader",
    "PredictionBatch",
    "PredictionResult",
    "PredictionSink",
    "ServingEngine",
    "VariantSpec",
]

#: A native online store (``carrara._native.RedisStore``: read with no Python per request).
NativeStore = _native.FeatureStore

#: Request feature overrides: column name -> one value, or one value per entity.
Overrides = Mapping[str, float | Sequence[float] | NDArray[np.float32]]


class OnlineReader(Protocol):
    """The online store as the gateway needs it: values of raw keys in one round trip."""

    def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...


class PredictionBatch(msgspec.Struct, frozen=True, kw_only=True):
    """One variant's share of a request, as arrays; expanded into records off the hot path."""

    model: str
    request_id: str
    variant: str
    version: int
    column_names: list[str]
    entity_ids: list[str]
    rows: NDArray[np.intp]  # row of each entity in the request
    features: NDArray[np.float32]  # [m, d]
    missing: NDArray[np.bool_]  # [m, d]
    outputs: NDArray[np.float32]  # [m, k]
    degraded: list[bool]
    latency_us: int
    timestamp_ms: int
    shadow: bool = False

    def records(self) -> list[PredictionRecord]:
        names = self.column_names
        return [
            PredictionRecord(
                request_id=f"{self.request_id}:{int(self.rows[j])}",
                model=self.model,
                version=self.version,
                variant=self.variant,
                entity_id=entity,
                features=dict(zip(names, self.features[j].tolist(), strict=True)),
                missing=[names[c] for c in np.flatnonzero(self.missing[j])],
                prediction=self.outputs[j].tolist(),
                latency_us=self.latency_us,
                timestamp_ms=self.timestamp_ms,
                degraded=self.degraded[j],
                shadow=self.shadow,
            )
            for j, entity in enumerate(self.entity_ids)
        ]


class PredictionSink(Protocol):
    """Where predictions go. The engine's one log thread calls ``write`` with every batch it
    drained from the native queue (it may block and retry: the native queue, bounded in bytes,
    absorbs the wait)."""

    def write(self, batches: Sequence[PredictionBatch]) -> None: ...


class VariantSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One servable model version inside a deployment."""

    name: str
    version: int
    features: AssemblerSpec
    timeout_s: float = 1.0
    failure_threshold: int = 5
    reset_after_s: float = 5.0
    #: Dynamic batching of an in-process model, like Triton's dynamic batcher: at most this
    #: many rows per model call, and how long a queued request may wait for a batch to fill.
    max_batch_size: int = 64
    max_queue_delay_us: int = 0


class ModelDeployment(msgspec.Struct, frozen=True, kw_only=True):
    """A model's live traffic split: routed variants, shadows and fallback (by name)."""

    model: str
    policy: RoutingPolicy
    variants: tuple[VariantSpec, ...]
    #: Requests of this model admitted at once (0: only the engine's overall bound).
    max_in_flight: int = 0


class PredictionResult(msgspec.Struct, frozen=True, kw_only=True):
    """Predictions for a batch, one row per entity, in request order."""

    model: str
    request_id: str
    entity_ids: list[str]
    outputs: NDArray[np.float32]  # [n, k]
    variants: list[str]
    versions: list[int]
    degraded: list[bool]
    latency_us: int


_RETIRE_AFTER_S = 30.0


class _NativeVariant(msgspec.Struct, frozen=True):
    """What the native engine reads from a variant (attribute access from C++)."""

    name: str
    version: int
    features: AssemblerSpec
    timeout_s: float
    failure_threshold: int
    reset_after_s: float
    executor: Any


def executor_for(
    backend: Backend,
    spec: VariantSpec,
    *,
    remote_workers: int = 8,
) -> Any:
    """The native executor of one loaded model: its own (native Triton client) when it has
    one, else a dynamic batcher over ``backend.infer``."""
    native = getattr(backend, "native_executor", None)
    if callable(native):
        return native()
    info = backend.info
    in_process = bool(getattr(backend, "runs_in_process", False))
    if spec.max_batch_size < 1:
        raise InvalidArgumentError(f"variant {spec.name!r}: max_batch_size must be >= 1")
    if spec.max_queue_delay_us < 0:
        raise InvalidArgumentError(f"variant {spec.name!r}: max_queue_delay_us must be >= 0")
    return _native.PythonExecutor(
        backend,
        info.input_dim,
        info.output_dim,
        # A remote model in Python is called one request at a time on its own thread (each
        # may wait on the network); an in-process one gets batches on one thread.
        max_batch_size=spec.max_batch_size if in_process else 1,
        max_queue_delay_us=float(spec.max_queue_delay_us if in_process else 0),
        workers=1 if in_process else remote_workers,
        in_process=in_process,
        label=f"variant {spec.name!r}",
    )


def _result(model: str, entity_ids: Sequence[str], raw: tuple[Any, ...]) -> PredictionResult:
    outputs, variants, versions, degraded, latency_us, request_id = raw
    return PredictionResult(
        model=model,
        request_id=request_id,
        entity_ids=list(entity_ids),
        outputs=outputs,
        variants=variants,
        versions=versions,
        degraded=degraded,
        latency_us=latency_us,
    )


class ServingEngine:
    """Holds live deployments over one native engine, its feature cache and online store."""

    def __init__(
        self,
        store: OnlineReader | NativeStore | None,
        *,
        cache: FeatureCache | None = None,
        sink: PredictionSink | None = None,
        max_in_flight: int = 256,
        max_batch: int = 1_000,
        workers: int = 8,
        store_deadline_s: float = 0.05,
        negative_ttl_s: float = 5.0,
        log_max_bytes: int = 64 << 20,
    ) -> None:
        """``store`` is a native store (``carrara._native.RedisStore``: read with no Python) or
        a Python object with ``mget(keys)``; ``workers`` threads serve each Python backend
        that is not in-process (one call each); ``store_deadline_s`` bounds each store read
        (past it the request is served from cache/defaults, flagged degraded)."""
        if max_in_flight < 1:
            raise InvalidArgumentError("max_in_flight must be >= 1")
        self.store = store
        self.cache = cache if cache is not None else FeatureCache()
        self.sink = sink
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._workers = workers
        native_store: Any
        if store is None or isinstance(store, _native.FeatureStore):
            native_store = store
        else:
            native_store = _native.PythonStore(store)
        self.native = _native.Engine(
            self.cache,
            native_store,
            max_in_flight=max_in_flight,
            max_batch=max_batch,
            store_deadline_s=store_deadline_s,
            negative_ttl_s=negative_ttl_s,
            log_max_bytes=log_max_bytes,
            log_predictions=sink is not None,
        )
        self._deployments: dict[str, ModelDeployment] = {}
        # id(backend) -> (backend, executor, spec key): a redeploy of the same loaded model
        # keeps its executor (and its queue); models no longer deployed are retired.
        self._executors: dict[int, tuple[Backend, Any, tuple[int, int]]] = {}
        self._bound: dict[tuple[str, str], Backend] = {}  # (model, variant) -> backend
        self._lock = threading.Lock()
        self._closed = False
        self._log_thread: threading.Thread | None = None
        self._delivered = 0  # records handed to the sink
        if sink is not None:
            self._log_thread = threading.Thread(
                target=self._drain_log, name="carrara-prediction-log", daemon=True
            )
            self._log_thread.start()

    # -- deployments ----------------------------------------------------------------------

    def deploy(self, deployment: ModelDeployment, backends: Mapping[str, Backend]) -> None:
        """Make ``deployment`` live: the native engine builds and warms every variant up first,
        then switches in one step, so requests in flight finish on the old snapshot."""
        names = [v.name for v in deployment.variants]
        missing = [n for n in names if n not in backends]
        if missing:
            raise InvalidArgumentError(f"no backend loaded for variant(s) {missing}")
        with self._lock:
            variants = []
            created: list[int] = []
            for spec in deployment.variants:
                backend = backends[spec.name]
                batching = (spec.max_batch_size, spec.max_queue_delay_us)
                held = self._executors.get(id(backend))
                if held is not None and held[0] is backend and held[2] == batching:
                    executor = held[1]
                else:
                    if backend.info.input_dim < 1:
                        raise InvalidArgumentError(f"variant {spec.name!r} has no inputs")
                    executor = executor_for(backend, spec, remote_workers=self._workers)
                    self._executors[id(backend)] = (backend, executor, batching)
                    created.append(id(backend))
                variants.append(
                    _NativeVariant(
                        name=spec.name,
                        version=spec.version,
                        features=spec.features,
                        timeout_s=spec.timeout_s,
                        failure_threshold=spec.failure_threshold,
                        reset_after_s=spec.reset_after_s,
                        executor=executor,
                    )
                )
            try:
                self.native.deploy(
                    deployment.model,
                    deployment.policy,
                    variants,
                    max_in_flight=deployment.max_in_flight,
                )
            except BaseException:
                for key_id in created:
                    _backend, executor, _ = self._executors.pop(key_id)
                    executor.close()
                raise
            self._deployments[deployment.model] = deployment
            for bound in [k for k in self._bound if k[0] == deployment.model]:
                del self._bound[bound]
            for spec in deployment.variants:
                self._bound[(deployment.model, spec.name)] = backends[spec.name]
            self._retire_unused()

    def _retire_unused(self) -> None:
        live = {id(b) for b in self._bound.values()}
        for key_id in [k for k in self._executors if k not in live]:
            backend, executor, _ = self._executors.pop(key_id)
            # Requests that picked the old snapshot may still be running: close after they
            # drain (the native snapshot keeps the executor alive until then).
            timer = threading.Timer(_RETIRE_AFTER_S, _close_both, args=(executor, backend))
            timer.daemon = True
            timer.start()

    def undeploy(self, model: str) -> None:
        with self._lock:
            self.native.undeploy(model)
            self._deployments.pop(model, None)
            for bound in [k for k in self._bound if k[0] == model]:
                del self._bound[bound]
            self._retire_unused()

    def models(self) -> list[str]:
        return list(self.native.models())

    def deployment(self, model: str) -> ModelDeployment:
        dep = self._deployments.get(model)
        if dep is None or model not in self.native.models():
            raise NotFoundError(self._not_deployed(model))
        return dep

    def _not_deployed(self, model: str) -> str:
        known = ", ".join(self.models()) or "none"
        return f"model {model!r} is not deployed; deployed: {known}"

    def model_info(self, model: str) -> dict[str, Any]:
        """Versions, variants, output width and feature columns of a deployed model."""
        info = self.native.model_info(model)
        if info is None:
            raise NotFoundError(self._not_deployed(model))
        return dict(info)

    # -- the hot path ---------------------------------------------------------------------

    def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
        version: str = "",
    ) -> PredictionResult:
        """Predictions for ``entity_ids`` (blocks this thread; the GIL is released)."""
        raw = self.native.predict(model, entity_ids, _overrides(overrides), request_id, version)
        return _result(model, entity_ids, raw)

    async def predict_async(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
        version: str = "",
    ) -> PredictionResult:
        """``predict`` for an event loop: the native engine completes a future, no thread
        of the loop waits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, ...]] = loop.create_future()

        def done(code: int, message: str, raw: tuple[Any, ...] | None) -> None:
            loop.call_soon_threadsafe(_settle, future, code, message, raw)

        ids = list(entity_ids)
        self.native.predict_async(model, ids, _overrides(overrides), request_id, version, done)
        return _result(model, ids, await future)

    @property
    def store_errors(self) -> int:
        return int(self.native.metrics()["store_errors"])

    @property
    def shed(self) -> int:
        return int(self.native.metrics()["shed"])

    # -- prediction log -------------------------------------------------------------------

    def _drain_log(self) -> None:
        assert self.sink is not None
        while True:
            raw = self.native.drain_log(500, 0.05)
            if raw is None:
                break
            if not raw:
                continue
            batches = [_log_batch(r) for r in raw]
            try:
                self.sink.write(batches)
            except Exception:
                log.exception("prediction sink failed; %d batches lost", len(batches))
            self._delivered += sum(len(b.entity_ids) for b in batches)

    def flush_log(self, timeout_s: float = 5.0) -> bool:
        """Wait until every prediction queued so far reached the sink; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._delivered >= int(self.native.metrics()["log_records"]):
                return True
            time.sleep(0.002)
        return False

    def close(self, grace_s: float = 10.0) -> None:
        """Refuse new requests, let those in flight finish, stop the executors, flush the log."""
        if self._closed:
            return
        self._closed = True
        self.native.set_draining(True)
        self.native.wait_idle(grace_s)
        self.native.close()
        if self._log_thread is not None:
            self._log_thread.join(grace_s + 1.0)
        for _backend, executor, _ in list(self._executors.values()):
            executor.close()


def _close_both(executor: Any, backend: Backend) -> None:
    executor.close()
    backend.close()


def _settle(
    future: asyncio.Future[tuple[Any, ...]], code: int, message: str, raw: tuple[Any, ...] | None
) -> None:
    if future.done():
        return
    if code == 0 and raw is not None:
        future.set_result(raw)
    else:
        future.set_exception(error_for_code(code)(message))


def _overrides(overrides: Overrides | None) -> dict[str, Any] | None:
    if not overrides:
        return None
    return dict(overrides)


def _log_batch(raw: tuple[Any, ...]) -> PredictionBatch:
    (
        model,
        request_id,
        variant,
        version,
        columns,
        entity_ids,
        rows,
        features,
        missing,
        outputs,
        degraded,
        latency_us,
        timestamp_ms,
        shadow,
    ) = raw
    return PredictionBatch(
        model=model,
        request_id=request_id,
        variant=variant,
        version=version,
        column_names=columns,
        entity_ids=entity_ids,
        rows=rows,
        features=features,
        missing=missing,
        outputs=outputs,
        degraded=degraded,
        latency_us=latency_us,
        timestamp_ms=timestamp_ms,
        shadow=shadow,
    )
