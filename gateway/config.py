"""Gateway configuration in a file (YAML/JSON): which models to serve, how, and from where.

The same structs describe a deployment whether it comes from this file or from the registry;
``build_backends`` turns them into loaded ``Backend`` objects (sha256-checked ONNX files or
Triton models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec
import yaml

from carrara.core import AssemblerSpec, RoutingPolicy
from carrara.errors import ConfigError
from carrara.gateway.backends import Backend, OnnxBackend
from carrara.gateway.engine import ModelDeployment, VariantSpec

__all__ = [
    "GatewayConfig",
    "ModelConfig",
    "RegistryConfig",
    "VariantConfig",
    "build_backends",
    "load_gateway_config",
]


class VariantConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model version: its features, its artifact and where it runs."""

    name: str
    version: int
    features: AssemblerSpec
    backend: Literal["onnx", "triton"] = "onnx"
    artifact: str | None = None  # ONNX file (backend "onnx")
    sha256: str | None = None  # checked before loading when given
    providers: tuple[str, ...] = ("cpu",)  # ONNX Runtime execution providers, in preference
    triton_url: str | None = None  # host:port (backend "triton")
    triton_model: str | None = None
    timeout_s: float = 1.0
    failure_threshold: int = 5
    reset_after_s: float = 5.0
    # Dynamic batching of an in-process model (Triton's dynamic_batching).
    max_batch_size: int = 64
    max_queue_delay_us: int = 0

    def spec(self) -> VariantSpec:
        return VariantSpec(
            name=self.name,
            version=self.version,
            features=self.features,
            timeout_s=self.timeout_s,
            failure_threshold=self.failure_threshold,
            reset_after_s=self.reset_after_s,
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
        )


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    policy: RoutingPolicy
    variants: tuple[VariantConfig, ...]
    max_in_flight: int = 0  # this model's share of the gateway's bound; 0 = no own bound

    def deployment(self) -> ModelDeployment:
        return ModelDeployment(
            model=self.name,
            policy=self.policy,
            variants=tuple(v.spec() for v in self.variants),
            max_in_flight=self.max_in_flight,
        )


class RegistryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Serve what the model registry says is deployed, and follow its deployment events."""

    url: str  # sqlite:///path or postgresql://...
    artifact_path: str
    event_log_url: str  # where the registry publishes `deployments` events
    models: tuple[str, ...]  # the models this gateway serves


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    models: tuple[ModelConfig, ...] = ()  # served from files, fixed until restart
    registry: RegistryConfig | None = None
    online_store_url: str = "memory://"
    event_log_url: str | None = None  # prediction logs; None = not logged
    cache_capacity: int = 10_000
    cache_ttl_seconds: float = 30.0
    max_in_flight: int = 256  # requests admitted at once (all models); past it RESOURCE_EXHAUSTED
    max_batch: int = 1_000  # entities per request
    store_deadline_s: float = 0.05  # online-store read budget; past it: cache/defaults, degraded


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read and validate a YAML (or JSON) gateway config; relative artifact paths are taken
    relative to the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"gateway config {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"gateway config {path} is not valid YAML: {exc}") from exc
    try:
        config = msgspec.convert(raw or {}, GatewayConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid gateway config {path}: {exc}") from exc
    models = []
    for m in config.models:
        variants = []
        for v in m.variants:
            if v.artifact and not Path(v.artifact).is_absolute():
                v = msgspec.structs.replace(v, artifact=str(path.parent / v.artifact))
            variants.append(v)
        models.append(msgspec.structs.replace(m, variants=tuple(variants)))
    return msgspec.structs.replace(config, models=tuple(models))


def build_backends(model: ModelConfig) -> dict[str, Backend]:
    """Load every variant's model; fails before anything is swapped in."""
    backends: dict[str, Backend] = {}
    try:
        for v in model.variants:
            if v.backend == "onnx":
                if not v.artifact:
                    raise ConfigError(f"model {model.name!r} variant {v.name!r} needs an artifact")
                backends[v.name] = OnnxBackend(v.artifact, sha256=v.sha256, providers=v.providers)
            else:
                if not v.triton_url or not v.triton_model:
                    raise ConfigError(
                        f"model {model.name!r} variant {v.name!r} needs triton_url and triton_model"
                    )
                from carrara.gateway.triton_backend import TritonBackend

                backends[v.name] = TritonBackend(
                    v.triton_url, v.triton_model, timeout_s=v.timeout_s
                )
    except BaseException:
        for b in backends.values():
            b.close()
        raise
    return backends
