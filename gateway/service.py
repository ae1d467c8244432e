"""What the HTTP front and the server process share: one ``Gateway`` per process.

Requests are answered by the native engine (the native gRPC front calls it directly; the HTTP
front through ``predict`` here, which awaits a future the engine completes — no thread pool).
Admission, metrics and KServe statistics are the engine's, counted in C++.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from carrara.errors import NotFoundError
from carrara.gateway.engine import Overrides, PredictionResult, ServingEngine
from carrara.gateway.kserve_types import ModelInfo, ModelStatistics
from carrara.gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    from carrara.gateway.registry_source import DeploymentFollower

__all__ = ["Gateway"]


class Gateway:
    """``follower``: the registry deployment follower, when models come from the registry;
    ``unavailable``: models named in the config that failed to load (model -> reason)."""

    def __init__(
        self,
        engine: ServingEngine,
        *,
        follower: DeploymentFollower | None = None,
        max_staleness_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.follower = follower
        self.max_staleness_s = max_staleness_s
        self.unavailable: dict[str, str] = {}
        self.metrics = GatewayMetrics(engine.native, engine.cache, follower=follower)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether to take traffic, and what ``/readyz`` says: the models served, those that
        failed to load, and how stale the deployment state is."""
        ready = self.ready
        body: dict[str, Any] = {
            "ready": ready,
            "models": self.engine.models(),
            "draining": self.draining,
        }
        unavailable = dict(self.unavailable)
        if self.follower is not None:
            import msgspec

            status = self.follower.status()
            unavailable.update(self.follower.unavailable())
            body["deployments"] = msgspec.to_builtins(status)
            if not self.follower.alive:
                ready = False
                body["deployments"]["error"] = "the deployment follower stopped"
            elif self.max_staleness_s is not None and status.stale_s > self.max_staleness_s:
                ready = False
                body["deployments"]["error"] = (
                    f"no deployment events read for {status.stale_s:.0f} s "
                    f"(max_staleness_s {self.max_staleness_s:g})"
                )
        body["unavailable"] = unavailable
        body["ready"] = ready
        return ready, body

    @property
    def ready(self) -> bool:
        return bool(self.engine.native.ready)

    @property
    def draining(self) -> bool:
        return bool(self.engine.native.draining)

    async def predict(
        self,
        model: str,
        entity_ids: Sequence[str],
        overrides: Overrides | None = None,
        request_id: str | None = None,
        version: str = "",
    ) -> PredictionResult:
        return await self.engine.predict_async(model, entity_ids, overrides, request_id, version)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Refuse new work (UNAVAILABLE / 503), wait for in-flight requests to finish."""
        self.engine.native.set_draining(True)
        await asyncio.to_thread(self.engine.native.wait_idle, timeout_s)

    def close(self) -> None:
        self.engine.close()

    # -- KServe v2 / Triton model metadata and statistics ----------------------------------

    def model_info(self, name: str) -> ModelInfo:
        """The KServe view of deployed model ``name``; ``NotFoundError`` when it is not deployed."""
        info = self.engine.native.model_info(name)
        if info is None:
            raise NotFoundError(f"model {name!r} is not deployed")
        return ModelInfo(
            name=name,
            versions=sorted(info["versions"], key=int),
            columns=list(info["columns"]),
            output_dim=int(info["output_dim"]),
        )

    def statistics(self, name: str | None = None) -> list[ModelStatistics]:
        """Request counters of model ``name`` (every deployed model when ``None``), each
        labelled with the model's highest deployed version; ``NotFoundError`` for a model
        that is not deployed."""
        names = [name] if name is not None else self.engine.models()
        out: list[ModelStatistics] = []
        for model in names:
            info = self.model_info(model)
            found = self.engine.native.statistics(model)
            s = found[0] if found else {}
            ok = int(s.get("success_count", 0))
            out.append(
                ModelStatistics(
                    name=model,
                    version=info.versions[-1] if info.versions else "",
                    last_inference_ms=int(s.get("last_inference_ms", 0)),
                    inference_count=int(s.get("entities", 0)),
                    execution_count=ok,
                    success_count=ok,
                    success_ns=int(s.get("success_ns", 0)),
                    fail_count=int(s.get("fail_count", 0)),
                    fail_ns=int(s.get("fail_ns", 0)),
                )
            )
        return out
