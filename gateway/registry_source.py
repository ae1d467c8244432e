"""Deployments from the model registry, followed through ``deployments`` events alone.

A registry ``Deployment`` (the event payload) lists its variants, each with its artifact path,
sha256 and serving spec: the ``AssemblerSpec`` (features the model reads, in input order)
registered with the version as ``serving_spec=serving_spec(spec)``. So a gateway needs the
event log and the artifact store, never the registry's database:

- ``DeploymentFollower`` reads the topic from its own offset (no consumer group: a gateway
  start leaves nothing behind in the log), applies the newest deployment of each model, and
  keeps the last good state on local disk — the deployments it serves, their artifacts
  (content-addressed by sha256) and the offset. A restart serves from that state at once, even
  with the event log and the artifact store down, then catches up.
- It never stops: a failed read is retried with backoff, and its staleness (seconds since the
  last successful read) is on ``/readyz`` and in the metrics.
- A deployment that fails to load never replaces a working one; a model with nothing working
  is reported unavailable, and the other models keep serving.

``load_active`` is the in-process path (``Platform``), which has the registry at hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import msgspec

from carrara.core import AssemblerSpec, Batching, RoutingPolicy, Variant
from carrara.errors import FailedPreconditionError
from carrara.eventlog import Event
from carrara.gateway.backends import Backend, OnnxBackend
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.registry.artifacts import ArtifactStore
from carrara.registry.registry import ModelRegistry
from carrara.registry.types import DeployedVariant, Deployment
from carrara.types import Topic

__all__ = [
    "ArtifactLoader",
    "DeploymentFollower",
    "build_deployment",
    "load_active",
    "registry_loader",
]

log = logging.getLogger(__name__)

_deployment_decoder = msgspec.json.Decoder(Deployment)


#: Reads a variant's serving artifact, checked against its sha256.
ArtifactLoader = Callable[[DeployedVariant], bytes]


def build_deployment(
    load: ArtifactLoader,
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
                    "register it with serving_spec=carrara.core"
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
            data = load(v)
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


def registry_loader(registry: ModelRegistry) -> ArtifactLoader:
    """Artifacts read through an open registry (the in-process path)."""

    def load(v: DeployedVariant) -> bytes:
        return registry.artifacts.load(v.artifact_path, v.artifact_sha256, what="serving artifact")

    return load


def load_active(registry: ModelRegistry, engine: ServingEngine, models: Iterable[str]) -> list[str]:
    """Deploy the active deployment of each named model; returns those that have one."""
    loaded = []
    for name in models:
        active = registry.active_deployment(name)
        if active is None:
            continue
        engine.deploy(*build_deployment(registry_loader(registry), active))
        loaded.append(name)
    return loaded


class EventSource(Protocol):
    """The part of ``carrara.eventlog.EventLog`` the follower needs."""

    def read_after(
        self, topic: str, after: str | None, *, count: int = 100, block_ms: int = 0
    ) -> list[Event]: ...


class _State(msgspec.Struct, kw_only=True):
    """What a gateway keeps on disk: the event offset and the deployment each model serves."""

    offset: str | None = None
    deployments: dict[str, Deployment] = {}


_state_decoder = msgspec.json.Decoder(_State)


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One model as the follower sees it (``/readyz`` lists these)."""

    state: str  # "serving" | "unavailable"
    deployment_id: int | None  # the deployment being served
    versions: list[int]
    failed_deployment_id: int | None = None  # the newest deployment that failed to load
    error: str | None = None


class FollowerStatus(msgspec.Struct, frozen=True, kw_only=True):
    connected: bool  # the last read of the event log succeeded
    stale_s: float  # seconds since the last successful read
    offset: str | None
    applied: int
    failed: int
    last_error: str | None
    models: dict[str, ModelStatus]


class DeploymentFollower:
    """Follows ``deployments`` events and hot-swaps the engine's models (load, then switch),
    keeping the last good state under ``state_dir``.

    ``artifacts`` is the registry's artifact store (artifacts are read once, checked against
    their sha256 and cached under ``state_dir``); ``models`` limits which models this gateway
    serves (None: every model deployed).
    """

    def __init__(
        self,
        engine: ServingEngine,
        events: EventSource,
        artifacts: ArtifactStore | None,
        *,
        state_dir: str | Path,
        models: Iterable[str] | None = None,
        poll_ms: int = 200,
        timeout_s: float = 1.0,
        backoff_s: tuple[float, float] = (0.2, 10.0),
        retry_s: float = 5.0,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self.artifacts = artifacts
        self.state_dir = Path(state_dir)
        self.models = set(models) if models is not None else None
        self.poll_ms = poll_ms
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.retry_s = retry_s
        self.on_change = on_change
        self.applied = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._status: dict[str, ModelStatus] = {}
        self._connected = False
        self._last_read = time.monotonic()
        self._last_error: str | None = None
        self._state = _State()
        self._retry: dict[str, Deployment] = {}  # unavailable models' newest deployment
        self._next_retry = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carrara-deployments", daemon=True)
        (self.state_dir / "artifacts").mkdir(parents=True, exist_ok=True)

    # -- local state ---------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "deployments.json"

    def _cached(self, sha256: str) -> Path:
        return self.state_dir / "artifacts" / f"{sha256}.onnx"

    def _load_artifact(self, v: DeployedVariant) -> bytes:
        """The variant's artifact: the local copy when it checks out, else the artifact store
        (then kept locally, so a restart needs no store)."""
        cached = self._cached(v.artifact_sha256)
        try:
            data = cached.read_bytes()
        except FileNotFoundError:
            pass
        else:
            if hashlib.sha256(data).hexdigest() == v.artifact_sha256:
                return data
            log.warning("local copy %s fails its sha256 check; reading the store again", cached)
        if self.artifacts is None:
            raise FailedPreconditionError(
                f"artifact {v.artifact_path} of version {v.version} is not in the gateway's "
                "local state and no artifact store is configured"
            )
        data = self.artifacts.load(v.artifact_path, v.artifact_sha256, what="serving artifact")
        _write_atomic(cached, data)
        return data

    def _save(self) -> None:
        _write_atomic(self._state_file, msgspec.json.encode(self._state))
        keep = {
            f"{v.artifact_sha256}.onnx"
            for d in self._state.deployments.values()
            for v in d.variants
        }
        for f in (self.state_dir / "artifacts").iterdir():
            if f.name not in keep and not f.name.startswith("."):
                f.unlink(missing_ok=True)

    def restore(self) -> list[str]:
        """Serve what the local state says, before any event is read; returns the models
        loaded. A model whose state cannot be loaded is reported unavailable."""
        try:
            raw = self._state_file.read_bytes()
        except FileNotFoundError:
            return []
        try:
            self._state = _state_decoder.decode(raw)
        except msgspec.DecodeError:
            log.error("gateway state %s is unreadable; following from the start", self._state_file)
            self._state = _State()
            return []
        loaded = []
        for model, deployment in list(self._state.deployments.items()):
            if self.models is not None and model not in self.models:
                del self._state.deployments[model]
                continue
            if self._deploy(deployment):
                loaded.append(model)
        return loaded

    # -- following ---------------------------------------------------------------------

    def start(self) -> DeploymentFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = self.backoff_s[0]
        while not self._stop.is_set():
            try:
                batch = self.events.read_after(
                    Topic.DEPLOYMENTS, self._state.offset, count=100, block_ms=self.poll_ms
                )
            except Exception as exc:  # any failure: report, back off, try again
                with self._lock:
                    self._connected = False
                    self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "reading deployment events failed (%s); retrying in %.1f s", exc, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_s[1])
                continue
            backoff = self.backoff_s[0]
            with self._lock:
                self._connected = True
                self._last_read = time.monotonic()
            try:
                if batch:
                    self._apply_batch(batch)
                if self._retry and time.monotonic() >= self._next_retry:
                    self._next_retry = time.monotonic() + self.retry_s
                    for d in list(self._retry.values()):
                        if self._deploy(d):
                            self._state.deployments[d.model] = d
                            self._save()
            except Exception:  # never let one bad event end the follower
                log.exception("applying deployment events failed; skipping them")

    def _apply_batch(self, batch: list[Event]) -> None:
        newest: dict[str, Deployment] = {}
        for event in batch:
            try:
                d = _deployment_decoder.decode(event.payload)
            except msgspec.DecodeError:
                log.error("ignoring a malformed deployment event %s", event.id)
                self.failed += 1
                continue
            if self.models is not None and d.model not in self.models:
                continue
            current = newest.get(d.model) or self._state.deployments.get(d.model)
            seen = self._status.get(d.model)
            known = max(
                current.deployment_id if current else 0,
                (seen.failed_deployment_id or 0) if seen else 0,
            )
            if d.deployment_id > known:  # an older event (a replay) never undoes a newer one
                newest[d.model] = d
        for d in newest.values():
            if self._deploy(d):
                self._state.deployments[d.model] = d
                self.applied += 1
                if self.on_change is not None:
                    self.on_change(d.model, d.deployment_id)
        self._state.offset = batch[-1].id
        self._save()

    def _deploy(self, d: Deployment) -> bool:
        try:
            self.engine.deploy(*build_deployment(self._load_artifact, d, timeout_s=self.timeout_s))
        except Exception as exc:  # a bad artifact, a bad model file, a store outage
            # A broken deployment never replaces a working one; the old one keeps serving.
            log.error("deployment %d of %s failed: %s", d.deployment_id, d.model, exc)
            self.failed += 1
            with self._lock:
                serving = self._state.deployments.get(d.model)
                if serving is not None and serving.deployment_id == d.deployment_id:
                    serving = None  # restoring this very deployment failed
                if serving is None:
                    # Nothing serves the model: try again later (the store may come back).
                    self._retry[d.model] = d
                self._status[d.model] = ModelStatus(
                    state="serving" if serving is not None else "unavailable",
                    deployment_id=serving.deployment_id if serving else None,
                    versions=sorted({v.version for v in serving.variants}) if serving else [],
                    failed_deployment_id=d.deployment_id,
                    error=str(exc),
                )
            return False
        with self._lock:
            self._retry.pop(d.model, None)
            self._status[d.model] = ModelStatus(
                state="serving",
                deployment_id=d.deployment_id,
                versions=sorted({v.version for v in d.variants}),
            )
        return True

    # -- reporting ---------------------------------------------------------------------

    def status(self) -> FollowerStatus:
        with self._lock:
            return FollowerStatus(
                connected=self._connected,
                stale_s=round(time.monotonic() - self._last_read, 3),
                offset=self._state.offset,
                applied=self.applied,
                failed=self.failed,
                last_error=self._last_error,
                models=dict(self._status),
            )

    def unavailable(self) -> dict[str, str]:
        """Models this gateway should serve but cannot, with the reason."""
        with self._lock:
            return {
                m: s.error or "failed to load"
                for m, s in self._status.items()
                if s.state == "unavailable"
            }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
