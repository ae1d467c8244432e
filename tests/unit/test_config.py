"""Settings: defaults < TOML file < CARRARA_* environment < keyword overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from carrara.config import Settings, load_settings
from carrara.errors import ConfigError


def test_defaults_resolve_under_home() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.resolved_registry_url == "sqlite:///.carrara/registry.db"
    assert s.resolved_event_log_url == "local:///.carrara/events.db"
    assert s.resolved_offline_store_path == ".carrara/offline"
    assert s.cache_capacity == 10_000
    assert s.cache_ttl_seconds == 30.0


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "carrara.toml"
    cfg.write_text(
        '[carrara]\nhome = "/srv/c"\ncache_capacity = 5\nonline_store_url = "redis://x"\n'
    )
    env = {"CARRARA_CONFIG": str(cfg), "CARRARA_CACHE_CAPACITY": "7", "OTHER": "ignored"}
    s = load_settings(env=env)
    assert (s.home, s.cache_capacity, s.online_store_url) == ("/srv/c", 7, "redis://x")
    assert s.resolved_artifact_path == "/srv/c/artifacts"
    assert load_settings(env=env, cache_capacity=9).cache_capacity == 9


def test_env_strings_are_converted() -> None:
    s = load_settings(env={"CARRARA_CACHE_TTL_SECONDS": "2.5"})
    assert s.cache_ttl_seconds == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CARRARA_CACHE_CAPACITY": "many"}, "cache_capacity"),
        ({"CARRARA_CACHE_CAPACITY": "0"}, "cache_capacity must be > 0"),
        ({"CARRARA_CACHE_TTL_SECONDS": "-1"}, "cache_ttl_seconds must be > 0"),
        (
            {"CARRARA_TRAINING_PREEMPTION_POLL_S": "0"},
            "training_preemption_poll_s must be > 0",
        ),
        ({"CARRARA_REGISTRY": "x"}, "unknown setting CARRARA_REGISTRY; known:"),
        ({"CARRARA_CONFIG": "/nonexistent/carrara.toml"}, "does not exist"),
    ],
)
def test_bad_settings_raise_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_bad_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("home = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, env={})


def test_preemption_settings_from_env_and_file(tmp_path: Path) -> None:
    s = load_settings(env={})
    assert (s.training_preemption_notice, s.training_preemption_poll_s) == ("", 1.0)
    s = load_settings(
        env={
            "CARRARA_TRAINING_PREEMPTION_NOTICE": "/var/run/spot-notice",
            "CARRARA_TRAINING_PREEMPTION_POLL_S": "0.25",
        }
    )
    assert (s.training_preemption_notice, s.training_preemption_poll_s) == (
        "/var/run/spot-notice",
        0.25,
    )
    cfg = tmp_path / "carrara.toml"
    cfg.write_text('[carrara]\ntraining_preemption_notice = "http://169.254.169.254/x"\n')
    assert load_settings(cfg, env={}).training_preemption_notice == "http://169.254.169.254/x"


def test_train_worker_preemption_flags_default_to_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``carrara train worker`` without --preemption-notice / --preemption-poll-s takes the
    settings'; the flags win when given."""
    import carrara.training.worker as worker_module
    from carrara.cli import main

    seen: list[dict[str, Any]] = []

    class FakeWorker:
        def __init__(self, queue: object, **kw: Any) -> None:
            seen.append(kw)

        def preempt(self, notice: str) -> None:
            pass

        def run(self, **kw: Any) -> list[object]:
            return []

    monkeypatch.setattr(worker_module, "Worker", FakeWorker)
    for key in list(os.environ):
        if key.startswith("CARRARA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    assert main(["train", "worker", "--until-idle"]) == 0
    assert (seen[-1]["preemption_notice"], seen[-1]["preemption_poll_s"]) == (None, 1.0)
    notice = str(tmp_path / "spot-notice")
    monkeypatch.setenv("CARRARA_TRAINING_PREEMPTION_NOTICE", notice)
    monkeypatch.setenv("CARRARA_TRAINING_PREEMPTION_POLL_S", "0.25")
    assert main(["train", "worker", "--until-idle"]) == 0
    assert (seen[-1]["preemption_notice"], seen[-1]["preemption_poll_s"]) == (notice, 0.25)
    argv = ["--preemption-notice", "/other", "--preemption-poll-s", "2"]
    assert main(["train", "worker", "--until-idle", *argv]) == 0
    assert (seen[-1]["preemption_notice"], seen[-1]["preemption_poll_s"]) == ("/other", 2.0)
    assert main(["train", "worker", "--until-idle", "--preemption-poll-s", "0"]) == 2
