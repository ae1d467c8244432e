"""Gateway configuration in a file (YAML/JSON): which models to serve, how, and from where.

The same structs describe a deployment whether it comes from this file or from the registry;
``build_backends`` turns them into loaded ``Backend`` objects (sha256-checked ONNX files or
Triton models).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from carrara.core import AssemblerSpec, RoutingPolicy
from carrara.errors import ConfigError
from carrara.gateway.auth import FrontAuth
from carrara.gateway.backends import Backend, OnnxBackend
from carrara.gateway.engine import ModelDeployment, VariantSpec

__all__ = [
    "GatewayAuth",
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
    """Serve what the model registry deploys, from its ``deployments`` events alone: the gateway
    needs the event log and the artifact store, never the registry's database."""

    event_log_url: str  # where the registry publishes `deployments` events
    artifact_path: str  # the registry's artifact store (read once per artifact, then cached)
    models: tuple[str, ...] | None = None  # the models this gateway serves (None: all)
    state_dir: str = ".carrara-gateway"  # last good state (relative to the config file)
    max_staleness_s: float | None = None  # /readyz 503 past this many seconds without events
    url: str | None = None  # no longer read; refused with a message saying so

    def __post_init__(self) -> None:
        if self.url is not None:
            raise ValueError(
                "registry.url is no longer used: the gateway reads deployments (serving spec, "
                "artifact and sha256) from the event log and keeps no database credentials; "
                "remove it"
            )


class GatewayAuth(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional auth on both predict fronts (``carrara.gateway.auth``); without an ``auth:``
    block the gateway checks nothing and speaks plaintext (meant for loopback). Paths are
    relative to the config file. Tokens are read at start-up; they never sit in this file."""

    tokens_file: str | None = None  # bearer tokens, one a line ('#' comments)
    token_env: str | None = None  # name of an environment variable holding one bearer token
    tls_cert: str | None = None  # PEM certificate chain: both fronts speak TLS only
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: clients need a certificate it signed

    def __post_init__(self) -> None:
        if not (self.tokens_file or self.token_env or self.tls_cert or self.tls_key):
            raise ValueError("auth needs tokens_file, token_env and/or tls_cert + tls_key")

    def resolve(self, env: Mapping[str, str]) -> FrontAuth:
        """The tokens and files both fronts use; ConfigError when ``token_env`` is unset or
        empty (auth was asked for: never fall back to none)."""
        tokens: list[str] = []
        if self.token_env:
            token = env.get(self.token_env, "").strip()
            if not token:
                raise ConfigError(
                    f"gateway auth.token_env names {self.token_env}, which is unset or empty"
                )
            tokens.append(token)
        return FrontAuth.build(
            tokens=tokens,
            tokens_file=self.tokens_file,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_client_ca=self.tls_client_ca,
        )


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
    auth: GatewayAuth | None = None  # bearer tokens / TLS on both fronts; None = off


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
    config = msgspec.structs.replace(config, models=tuple(models))
    if config.auth is not None:
        files = {
            name: str(path.parent / value)
            for name in ("tokens_file", "tls_cert", "tls_key", "tls_client_ca")
            if (value := getattr(config.auth, name)) and not Path(value).is_absolute()
        }
        config = msgspec.structs.replace(config, auth=msgspec.structs.replace(config.auth, **files))
    if config.registry is not None and not Path(config.registry.state_dir).is_absolute():
        registry = msgspec.structs.replace(
            config.registry, state_dir=str(path.parent / config.registry.state_dir)
        )
        config = msgspec.structs.replace(config, registry=registry)
    return config


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
