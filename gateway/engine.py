"""The serving engine: route -> cache/online store -> assemble -> infer, for one deployment set.

``ServingEngine`` is the one handler path; the gRPC and HTTP fronts and ``Embedded`` all call
``predict``. Per request Python does a constant amount of work per variant: the core routes,
looks up the cache, decodes and assembles in C++, and the online store is read in one MGET.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.core import Assembler, AssemblerSpec, FeatureCache, Router, RoutingPolicy
from carrara.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from carrara.gateway.backends import Backend
from carrara.gateway.breaker import CircuitBreaker
from carrara.types import PredictionRecord

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
    """Where predictions go (the batching event-log writer); must return at once."""

    def submit(self, batch: PredictionBatch) -> None: ...


class VariantSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One servable model version inside a deployment."""

    name: str
    version: int
    features: AssemblerSpec
    timeout_s: float = 1.0
    failure_threshold: int = 5
    reset_after_s: float = 5.0


class ModelDeployment(msgspec.Struct, frozen=True, kw_only=True):
    """A model's live traffic split: routed variants, shadows and fallback (by name)."""

    model: str
    policy: RoutingPolicy
    variants: tuple[VariantSpec, ...]


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


# Request ids: a random per-process prefix and a counter (uuid4 per request costs ~8 us).
_ID_PREFIX = f"{uuid.uuid4().hex[:12]}-"
_ids = itertools.count(1)
_ARANGE = np.arange(4_096)
_ARANGE.setflags(write=False)


class _NeedsStore(Exception):
    """Raised inside ``try_cached`` when a feature is not cached (the store would be needed)."""


class _Variant:
    def __init__(self, spec: VariantSpec, backend: Backend) -> None:
        self.spec = spec
        self.assembler = Assembler(spec.features)
        self.backend = backend
        if backend.info.input_dim != self.assembler.dim:
            raise InvalidArgumentError(
                f"variant {spec.name!r}: model input has {backend.info.input_dim} columns but "
                f"its feature spec selects {self.assembler.dim}"
            )
        self.breaker = CircuitBreaker(spec.failure_threshold, spec.reset_after_s)
        self.inline = bool(getattr(backend, "runs_in_process", False))


class _Live:
    """An immutable snapshot of one model's deployment; swapped whole on redeploy."""

    def __init__(self, deployment: ModelDeployment, variants: dict[str, _Variant]) -> None:
        self.deployment = deployment
        self.router = Router(deployment.policy)
        self.routed = [variants[name] for name in self.router.variant_names]
        self.shadows = [variants[name] for name in deployment.policy.shadows]
        fb = self.router.fallback_index
        self.fallback = self.routed[fb] if fb is not None else None
        self.all = variants


class ServingEngine:
    """Holds live deployments, the feature cache and the online store client."""

    def __init__(
        self,
        store: OnlineReader,
        *,
        cache: FeatureCache | None = None,
        sink: PredictionSink | None = None,
        max_in_flight: int = 256,
        max_batch: int = 1_000,
        workers: int = 4,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.cache = cache if cache is not None else FeatureCache()
        self.sink = sink
        self.max_batch = max_batch
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        # A counter under a lock: threading.BoundedSemaphore is pure Python and costs several
        # microseconds per request on this path.
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="carrara-infer")
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carrara-shadow")
        self._clock = clock
        self.store_errors = 0
        self.shed = 0

    # -- deployments ----------------------------------------------------------------------

    def deploy(self, deployment: ModelDeployment, backends: Mapping[str, Backend]) -> None:
        """Make ``deployment`` live: build everything first, then switch in one assignment,
        so requests in flight finish on the old snapshot and new ones see the new one."""
        names = [v.name for v in deployment.variants]
        missing = [n for n in names if n not in backends]
        if missing:
            raise InvalidArgumentError(f"no backend loaded for variant(s) {missing}")
        variants = {v.name: _Variant(v, backends[v.name]) for v in deployment.variants}
        wanted = [v.name for v in deployment.policy.variants] + list(deployment.policy.shadows)
        unknown = [n for n in wanted if n not in variants]
        if unknown:
            raise InvalidArgumentError(
                f"routing policy names variant(s) {unknown} that the deployment does not define; "
                f"defined: {names}"
            )
        live = _Live(deployment, variants)
        for v in variants.values():
            # Warm up before switching: the first run of a session allocates and plans, and
            # must not land on a live request. A model that cannot run fails the deploy here.
            out = v.backend.infer(np.zeros((1, v.assembler.dim), np.float32))
            if out.shape[0] != 1:
                raise InvalidArgumentError(
                    f"variant {v.spec.name!r} returned {out.shape[0]} rows for 1 input row"
                )
        with self._lock:
            old = self._live.get(deployment.model)
            self._live[deployment.model] = live
        if old is not None:
            for name, v in old.all.items():
                if v.backend is not live.all.get(name, v).backend or name not in live.all:
                    self._retire(v.backend)

    def _retire(self, backend: Backend) -> None:
        # Requests that picked the old snapshot may still be running: close after they drain.
        timer = threading.Timer(30.0, backend.close)
        timer.daemon = True
        timer.start()

    def undeploy(self, model: str) -> None:
        with self._lock:
            self._live.pop(model, None)

    def runs_inline(self, model: str) -> bool:
        """Whether every variant of ``model`` computes in-process (no remote call to wait on)."""
        live = self._live.get(model)
        return live is not None and all(v.inline for v in live.all.values())

    def models(self) -> list[str]:
        return sorted(self._live)

    def deployment(self, model: str) -> ModelDeployment:
        return self._get(model).deployment

    def _get(self, model: str) -> _Live:
        live = self._live.get(model)
        if live is None:
            known = ", ".join(sorted(self._live)) or "none"
            raise NotFoundError(f"model {model!r} is not deployed; deployed: {known}")
        return live

    # -- the hot path ---------------------------------------------------------------------

    def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
    ) -> PredictionResult:
        self._admit()
        try:
            result = self._predict(model, entity_ids, overrides, request_id, cached_only=False)
        finally:
            self._done()
        assert result is not None
        return result

    def try_cached(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
    ) -> PredictionResult | None:
        """``predict`` if every feature is in the cache and every variant runs in-process;
        ``None`` (having done no I/O and logged nothing) when the online store would be needed.
        Lets an event loop answer hot requests without a thread hop."""
        if not self.runs_inline(model):
            return None
        self._admit()
        try:
            return self._predict(model, entity_ids, overrides, request_id, cached_only=True)
        except _NeedsStore:
            return None
        finally:
            self._done()

    def _admit(self) -> None:
        with self._in_flight_lock:
            if self._in_flight >= self._max_in_flight:
                self.shed += 1
                raise ResourceExhaustedError(
                    "gateway is at its in-flight limit; retry with backoff"
                )
            self._in_flight += 1

    def _done(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    def _predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None,
        request_id: str | None,
        *,
        cached_only: bool,
    ) -> PredictionResult:
        start = self._clock()
        live = self._get(model)
        n = len(entity_ids)
        if n == 0:
            raise InvalidArgumentError("entity_ids is empty")
        if n > self.max_batch:
            raise InvalidArgumentError(
                f"batch of {n} entities is over the limit of {self.max_batch}"
            )
        request_id = request_id or f"{_ID_PREFIX}{next(_ids):x}"
        routed = live.router.route_many(entity_ids)
        first = int(routed[0])
        single = n == 1 or bool((routed == first).all())
        groups = [first] if single else np.unique(routed).tolist()
        outputs: NDArray[np.float32] | None = None
        variants: list[str] = [""] * n
        versions: list[int] = [0] * n
        degraded: list[bool] = [False] * n
        features_for_log: dict[int, tuple[_Variant, NDArray[np.float32], NDArray[np.bool_]]] = {}
        shadow_jobs: list[tuple[Sequence[str], Overrides | None, NDArray[np.intp]]] = []
        for vi in groups:
            variant = live.routed[vi]
            if single:
                rows = _ARANGE[:n] if n <= len(_ARANGE) else np.arange(n)
                ids: Sequence[str] = entity_ids
                sub_overrides = overrides
            else:
                rows = np.flatnonzero(routed == vi)
                ids = [entity_ids[int(i)] for i in rows]
                sub_overrides = _slice_overrides(overrides, rows, n)
            used, out, x, mask, was_degraded = self._run_variant(
                live, variant, ids, sub_overrides, cached_only
            )
            if outputs is None:
                outputs = out if single else np.empty((n, out.shape[1]), np.float32)
            if single:
                variants = [used.spec.name] * n
                versions = [used.spec.version] * n
                degraded = [was_degraded] * n
            else:
                outputs[rows] = out
                for i in rows.tolist():
                    variants[i] = used.spec.name
                    versions[i] = used.spec.version
                    degraded[i] = was_degraded
            features_for_log[vi] = (used, x, mask)
            if live.shadows:
                shadow_jobs.append((ids, sub_overrides, rows))
        assert outputs is not None
        for ids, sub_overrides, rows in shadow_jobs:  # only once the request cannot fail over
            self._shadow(live, ids, sub_overrides, request_id, rows)
        result = PredictionResult(
            model=model,
            request_id=request_id,
            entity_ids=list(entity_ids),
            outputs=outputs,
            variants=variants,
            versions=versions,
            degraded=degraded,
            latency_us=int((self._clock() - start) * 1e6),
        )
        if self.sink is not None:
            self._log(result, routed, features_for_log)
        return result

    def _features(
        self,
        variant: _Variant,
        ids: Sequence[str],
        overrides: Overrides | None,
        cached_only: bool = False,
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_], bool]:
        plan = variant.assembler.plan(self.cache, ids)
        degraded = False
        misses = plan.missing_keys
        if misses and cached_only:
            raise _NeedsStore
        if misses:
            try:
                values = self.store.mget(misses)
            except Exception:
                # Store down: serve what the cache had, defaults for the rest, and say so.
                self.store_errors += 1
                values = [None] * len(misses)
                degraded = True
            variant.assembler.fill(plan, values, self.cache)
        x, mask = variant.assembler.assemble_plan(plan, overrides)
        return x, mask, degraded

    def _infer(self, variant: _Variant, x: NDArray[np.float32]) -> NDArray[np.float32]:
        if not variant.breaker.allow():
            raise UnavailableError(f"variant {variant.spec.name!r} circuit breaker is open")
        if variant.inline:
            # In-process ONNX Runtime: a thread hop would cost more than small models take,
            # and a native call cannot be abandoned anyway. Failures still feed the breaker.
            try:
                result = variant.backend.infer(x)
            except InvalidArgumentError:
                raise
            except Exception:
                variant.breaker.record_failure()
                raise
            variant.breaker.record_success()
            return result
        future = self._pool.submit(variant.backend.infer, x)
        try:
            out: NDArray[np.float32] = future.result(timeout=variant.spec.timeout_s)
        except FutureTimeout:
            variant.breaker.record_failure()
            raise DeadlineExceededError(
                f"variant {variant.spec.name!r} did not answer within {variant.spec.timeout_s}s"
            ) from None
        except InvalidArgumentError:
            raise  # the request's fault, not the backend's
        except Exception:
            variant.breaker.record_failure()
            raise
        variant.breaker.record_success()
        return out

    def _run_variant(
        self,
        live: _Live,
        variant: _Variant,
        ids: Sequence[str],
        overrides: Overrides | None,
        cached_only: bool = False,
    ) -> tuple[_Variant, NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_], bool]:
        x, mask, degraded = self._features(variant, ids, overrides, cached_only)
        try:
            return variant, self._infer(variant, x), x, mask, degraded
        except InvalidArgumentError:
            raise
        except Exception:
            fb = live.fallback
            if fb is None or fb is variant:
                raise
            fx, fmask, _ = self._features(fb, ids, overrides, cached_only)
            return fb, self._infer(fb, fx), fx, fmask, True

    def _shadow(
        self,
        live: _Live,
        ids: Sequence[str],
        overrides: Overrides | None,
        request_id: str,
        rows: NDArray[np.intp],
    ) -> None:
        def run() -> None:
            for shadow in live.shadows:
                try:
                    x, mask, degraded = self._features(shadow, ids, overrides)
                    out = self._infer(shadow, x)
                except Exception:
                    continue  # a shadow never affects callers; its failures show in its breaker
                if self.sink is not None:
                    self.sink.submit(
                        _batch(
                            live.deployment.model,
                            request_id,
                            shadow,
                            ids,
                            rows,
                            x,
                            mask,
                            out,
                            [degraded] * len(ids),
                            0,
                            shadow=True,
                        )
                    )

        self._shadow_pool.submit(run)

    def _log(
        self,
        result: PredictionResult,
        routed: NDArray[np.uint32],
        used: Mapping[int, tuple[_Variant, NDArray[np.float32], NDArray[np.bool_]]],
    ) -> None:
        assert self.sink is not None
        for vi, (variant, x, mask) in used.items():
            rows = np.flatnonzero(routed == vi)
            ids = [result.entity_ids[int(i)] for i in rows]
            self.sink.submit(
                _batch(
                    result.model,
                    result.request_id,
                    variant,
                    ids,
                    rows,
                    x,
                    mask,
                    result.outputs[rows],
                    [result.degraded[i] for i in rows],
                    result.latency_us,
                    shadow=False,
                )
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._shadow_pool.shutdown(wait=True)


def _slice_overrides(
    overrides: Overrides | None, rows: NDArray[np.intp], n: int
) -> Overrides | None:
    if not overrides:
        return None
    out: dict[str, float | NDArray[np.float32]] = {}
    for name, value in overrides.items():
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim == 0 or arr.size == 1:
            out[name] = float(arr.reshape(-1)[0])
        elif arr.ndim == 1 and arr.shape[0] == n:
            out[name] = arr[rows]
        else:
            raise InvalidArgumentError(
                f"override {name!r} has {arr.size} values; expected 1 or one per entity ({n})"
            )
    return out


def _batch(
    model: str,
    request_id: str,
    variant: _Variant,
    ids: Sequence[str],
    rows: NDArray[np.intp],
    x: NDArray[np.float32],
    mask: NDArray[np.bool_],
    out: NDArray[np.float32],
    degraded: Sequence[bool],
    latency_us: int,
    *,
    shadow: bool,
) -> PredictionBatch:
    return PredictionBatch(
        model=model,
        request_id=request_id,
        variant=variant.spec.name,
        version=variant.spec.version,
        column_names=variant.assembler.column_names,
        entity_ids=list(ids),
        rows=rows,
        features=x,
        missing=mask,
        outputs=out,
        degraded=list(degraded),
        latency_us=latency_us,
        timestamp_ms=int(time.time() * 1000),
        shadow=shadow,
    )
