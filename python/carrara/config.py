"""One typed configuration object: defaults < TOML file < ``CARRARA_*`` environment variables.

Every part receives a ``Settings`` (or the piece of it it needs) from its caller; nothing deep in
the code reads the environment.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from carrara.errors import ConfigError

__all__ = ["ENV_PREFIX", "Settings", "load_settings", "read_config_file"]

ENV_PREFIX = "CARRARA_"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where Carrara keeps its state and which backends it talks to.

    URLs select the backend: ``sqlite:///path`` or ``postgresql://...`` for the registry and
    catalog; ``memory://`` or ``redis://host:port/db`` for the online store; ``local:///path``
    (SQLite-backed durable log) or ``redis://...`` (Redis Streams) for the event log; and
    ``offline_engine`` the engine over the offline store's Parquet files (``duckdb``). Any
    other backend is a plug-in named by class path, ``package.module:ClassName``, in place of
    the URL scheme or as the engine (see :mod:`carrara.plugins`).
    """

    home: str = ".carrara"
    registry_url: str = ""  # "" = sqlite:///{home}/registry.db
    online_store_url: str = "memory://"
    offline_store_path: str = ""  # "" = {home}/offline
    offline_engine: str = "duckdb"  # or "package.module:ClassName" of an OfflineStore
    # The Spark engine's master (offline_engine = "spark"): local[N] or a cluster URL.
    spark_master: str = "local[2]"
    event_log_url: str = ""  # "" = local:///{home}/events.db
    artifact_path: str = ""  # "" = {home}/artifacts
    cache_capacity: int = 10_000
    cache_ttl_seconds: float = 30.0
    api_token: str = ""
    log_level: str = "INFO"
    training_gpus_per_node: int = 0  # GPUs of the largest training node (submit-time check)
    # `carrara train worker`'s --preemption-notice / --preemption-poll-s when not given: a
    # spot notice file or http(s) metadata URL ("" = none; SIGTERM always counts) and the
    # seconds between its polls.
    training_preemption_notice: str = ""
    training_preemption_poll_s: float = 1.0
    # Auth on the gateway's predict fronts (`carrara up`'s gateway; clients send the token).
    # Off when empty: the gateway listens on loopback and checks nothing.
    gateway_token: str = ""  # bearer token every gRPC call / HTTP predict must carry
    gateway_tls_cert: str = ""  # PEM certificate chain: both fronts speak TLS only
    gateway_tls_key: str = ""  # PEM private key of gateway_tls_cert
    # The gateway's HTTP front whose /metrics the web console shows live (carrara up sets it).
    gateway_url: str = ""
    # Every gateway replica's HTTP front, comma-separated, for the console to scrape and sum
    # ("" = gateway_url alone); "dns+http://NAME:PORT" scrapes every address NAME resolves to
    # at each scrape (a Kubernetes headless Service).
    gateway_metrics_urls: str = ""
    # Folders training jobs may read label files from (os.pathsep-separated, like PATH);
    # "" = {home} and the offline store. Checked at submission and again by the worker.
    data_roots: str = ""

    def __post_init__(self) -> None:
        if self.cache_capacity <= 0:
            raise ConfigError(f"cache_capacity must be > 0, got {self.cache_capacity}")
        if self.cache_ttl_seconds <= 0:
            raise ConfigError(f"cache_ttl_seconds must be > 0, got {self.cache_ttl_seconds}")
        if bool(self.gateway_tls_cert) != bool(self.gateway_tls_key):
            raise ConfigError("gateway_tls_cert and gateway_tls_key go together")
        if not self.offline_engine.strip():
            raise ConfigError("offline_engine must name an engine (duckdb) or a class path")
        if self.training_gpus_per_node < 0:
            raise ConfigError(
                f"training_gpus_per_node must be >= 0, got {self.training_gpus_per_node}"
            )
        if not self.training_preemption_poll_s > 0:
            raise ConfigError(
                f"training_preemption_poll_s must be > 0, got {self.training_preemption_poll_s}"
            )

    @property
    def resolved_registry_url(self) -> str:
        return self.registry_url or f"sqlite:///{Path(self.home) / 'registry.db'}"

    @property
    def resolved_offline_store_path(self) -> str:
        return self.offline_store_path or str(Path(self.home) / "offline")

    @property
    def resolved_event_log_url(self) -> str:
        return self.event_log_url or f"local:///{Path(self.home) / 'events.db'}"

    @property
    def resolved_data_roots(self) -> list[str]:
        """The folders label sources must lie under (``data_roots``, else home and the
        offline store)."""
        roots = [r.strip() for r in self.data_roots.split(os.pathsep) if r.strip()]
        if roots:
            return roots
        offline = self.resolved_offline_store_path
        return [self.home] + ([] if "://" in offline else [offline])  # local folders only

    @property
    def resolved_artifact_path(self) -> str:
        return self.artifact_path or str(Path(self.home) / "artifacts")


_FIELDS: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Settings)}


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            known = ", ".join(ENV_PREFIX + f.upper() for f in sorted(_FIELDS))
            raise ConfigError(f"unknown setting {key}; known: {known}")
        out[name] = value
    return out


def read_config_file(file: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML settings file as a dict; a missing or malformed file is a ConfigError that
    names it."""
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {file} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc


def load_settings(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Build ``Settings`` from a TOML file (``path`` or ``$CARRARA_CONFIG``), the environment
    and keyword overrides, later sources winning. Values are type-checked and converted."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = path if path is not None else env.get(f"{ENV_PREFIX}CONFIG")
    if file:
        doc = read_config_file(file)
        values.update(doc.get("carrara", doc))
    values.update(_from_env(env))
    values.update(overrides)
    try:
        # str_values: environment strings like "42" convert to the field's type.
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
