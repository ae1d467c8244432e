"""Deployments from the model registry: initial load, and live reload on ``deployments`` events.

A registry ``Deployment`` lists its variants, each with its artifact (sha256-verified when read
from the artifact store) and its serving spec: the ``AssemblerSpec`` (features the model reads,
in input order) registered with the version as ``serving_spec=serving_spec(spec)``. The watcher
follows the event log with a consumer group of its own, so every gateway replica sees every
deployment change.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from carrara.core import AssemblerSpec, RoutingPolicy, Variant
from carrara.errors import CarraraError, FailedPreconditionError
from carrara.eventlog import Event
from carrara.gateway.backends import Backend, OnnxBackend
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.registry.registry import DEPLOYMENTS_TOPIC, ModelRegistry
from carrara.registry.types import Deployment

__all__ = [
    "Batching",
    "DeploymentWatcher",
    "build_deployment",
    "load_active",
    "serving_spec",
]

log = logging.getLogger(__name__)

_deployment_decoder = msgspec.json.Decoder(Deployment)


class Batching(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dynamic batching of an in-process model (Triton's ``dynamic_batching``)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0


def serving_spec(
    spec: AssemblerSpec, *, max_batch_size: int = 64, max_queue_delay_us: int = 0
) -> dict[str, Any]:
    """What to register as a version's ``serving_spec``: the features it reads, in order, and
    how the gateway batches its calls."""
    out: dict[str, Any] = msgspec.to_builtins(spec)
    out["batching"] = msgspec.to_builtins(Batching(max_batch_size, max_queue_delay_us))
    return out


def build_deployment(
    registry: ModelRegistry,
    deployment: Deployment,
    *,
    timeout_s: float = 1.0,
    providers: tuple[str, ...] = ("cpu",),
) -> tuple[ModelDeployment, dict[str, Backend]]:
    """Turn a registry deployment into the engine's form, loading every variant's model."""
    specs: list[VariantSpec] = []
    backends: dict[str, Backend] = {}
    try:
        for v in deployment.variants:
            if not v.serving_spec:
                raise FailedPreconditionError(
                    f"model {deployment.model!r} version {v.version} has no serving spec; "
                    "register it with serving_spec=carrara.gateway.registry_source"
                    ".serving_spec(AssemblerSpec(...))"
                )
            try:
                raw = dict(v.serving_spec)
                batching = msgspec.convert(raw.pop("batching", {}), Batching)
                features = msgspec.convert(raw, AssemblerSpec)
            except msgspec.ValidationError as exc:
                raise FailedPreconditionError(
                    f"model {deployment.model!r} version {v.version} has a bad feature spec: {exc}"
                ) from exc
            data = registry.artifacts.load(
                v.artifact_path, v.artifact_sha256, what="serving artifact"
            )
            backends[v.name] = OnnxBackend(
                data, providers=providers, name=f"{deployment.model} v{v.version}"
            )
            specs.append(
                VariantSpec(
                    name=v.name,
                    version=v.version,
                    features=features,
                    timeout_s=timeout_s,
                    max_batch_size=batching.max_batch_size,
                    max_queue_delay_us=batching.max_queue_delay_us,
                )
            )
    except BaseException:
        for b in backends.values():
            b.close()
        raise
    split = deployment.traffic_split
    routed = [Variant(s.name, s.weight_bp, s.canary) for s in split.variants]
    fallback = split.fallback.name if split.fallback is not None else None
    if fallback is not None and fallback not in {r.name for r in routed}:
        routed.append(Variant(fallback, 0))  # answers only when a routed variant fails
    policy = RoutingPolicy(
        variants=tuple(routed),
        salt=split.salt or deployment.model,
        shadows=tuple(s.name for s in split.shadows),
        fallback=fallback,
    )
    return ModelDeployment(model=deployment.model, policy=policy, variants=tuple(specs)), backends


def load_active(registry: ModelRegistry, engine: ServingEngine, models: Iterable[str]) -> list[str]:
    """Deploy the active deployment of each named model; returns those that have one."""
    loaded = []
    for name in models:
        active = registry.active_deployment(name)
        if active is None:
            continue
        engine.deploy(*build_deployment(registry, active))
        loaded.append(name)
    return loaded


class EventSource(Protocol):
    """The part of ``carrara.eventlog.EventLog`` the watcher needs."""

    def read(
        self, topic: str, group: str, consumer: str, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]: ...

    def ack(self, topic: str, group: str, ids: Iterable[str]) -> None: ...


class DeploymentWatcher:
    """Follows ``deployments`` events and hot-swaps the engine's models (load, then switch).

    ``models`` limits which models this gateway serves (None = every model deployed)."""

    def __init__(
        self,
        registry: ModelRegistry,
        engine: ServingEngine,
        events: EventSource,
        *,
        models: Iterable[str] | None = None,
        group: str | None = None,
        poll_ms: int = 200,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.events = events
        self.models = set(models) if models is not None else None
        self.group = group or f"gateway-{uuid.uuid4().hex[:12]}"
        self.poll_ms = poll_ms
        self.on_change = on_change
        self.applied = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carrara-deployments", daemon=True)

    def start(self) -> DeploymentWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        events = self.events
        while not self._stop.is_set():
            try:
                batch = events.read(
                    DEPLOYMENTS_TOPIC, self.group, "watcher", count=50, block_ms=self.poll_ms
                )
            except Exception:
                log.warning("reading deployment events failed; retrying", exc_info=True)
                self._stop.wait(1.0)
                continue
            done = []
            for event in batch:
                self._apply(event.payload)
                done.append(event.id)
            if done:
                events.ack(DEPLOYMENTS_TOPIC, self.group, done)

    def _apply(self, payload: bytes) -> None:
        try:
            deployment = _deployment_decoder.decode(payload)
        except msgspec.DecodeError:
            log.error("ignoring a malformed deployment event")
            self.failed += 1
            return
        if self.models is not None and deployment.model not in self.models:
            return
        try:
            # Re-read: an older event may arrive after a newer deployment became active.
            active = self.registry.active_deployment(deployment.model)
            if active is None:
                self.engine.undeploy(deployment.model)
            else:
                self.engine.deploy(*build_deployment(self.registry, active))
        except CarraraError:
            # A broken deployment never replaces a working one; the old one keeps serving.
            log.exception("deployment of %s failed; keeping the current one", deployment.model)
            self.failed += 1
            return
        self.applied += 1
        if self.on_change is not None:
            self.on_change(deployment.model, deployment.deployment_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
