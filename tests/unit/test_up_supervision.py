"""``carrara up`` supervises its children: one that exits after start-up is restarted alone,
with exponential backoff, logged, counted, and given up on only past ``max_restarts``.

The children here are stand-ins (a shell script as the "python" of ``Services``): the API and
the gateway are ``http.server`` processes answering ``/healthz``, the other children sleep,
and ``worker-1`` crashes with code 7 shortly after each start once the test has created
the ``go`` file (after ``start()``: an exit while starting stops everything). The real
services under a SIGKILL are in ``tests/e2e/test_up_supervision.py``.
"""

from __future__ import annotations

import io
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carrara.config import Settings
from carrara.errors import ConfigError
from carrara.up import ChildExitedError, Services, UpConfig

_FAKE = """#!/bin/sh
port_after() {{ echo "$*" | sed -E "s/.*$1 ([0-9]+).*/\\1/"; }}
case "$*" in
  *_api*) exec {py} -m http.server "$(port_after --port "$*")" --bind 127.0.0.1 --directory {www};;
  *_gateway*) exec {py} -m http.server "$(port_after --http-port "$*")" --bind 127.0.0.1 \
--directory {www};;
  *"train worker"*) while [ ! -e {go} ]; do sleep 0.05; done
    echo "worker: out of memory (pretend)"; sleep 0.3; exit 7;;
esac
exec sleep 60
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    www.mkdir()
    (www / "healthz").write_text("ok")
    script = tmp_path / "fake-python"
    script.write_text(
        _FAKE.format(
            py=shlex.quote(sys.executable),
            www=shlex.quote(str(www)),
            go=shlex.quote(str(tmp_path / "go")),
        )
    )
    script.chmod(0o755)
    return script


def _services(tmp_path: Path, python: Path, out: io.StringIO, **up: object) -> Services:
    settings = Settings(home=str(tmp_path / "home"), online_store_url="redis://127.0.0.1:1/0")
    config = UpConfig(
        api_port=0,
        gateway_http_port=0,
        gateway_grpc_port=0,
        workers=1,
        materializer=False,
        triggers=False,
        stop_timeout_s=5,
        **up,  # type: ignore[arg-type]
    )
    return Services(settings, config, python=str(python), out=out)


def _crash_workers(tmp_path: Path) -> None:
    (tmp_path / "go").touch()


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    yield io.StringIO()


def test_a_crashing_child_is_restarted_with_backoff_and_the_others_keep_running(
    tmp_path: Path, fake_python: Path, out: io.StringIO
) -> None:
    svc = _services(tmp_path, fake_python, out, restart_backoff_s=0.2, restart_backoff_max_s=0.4)
    with svc:
        _crash_workers(tmp_path)
        pids = {c.name: c.process.pid for c in svc.children}
        deadline = time.monotonic() + 20
        while svc.restarts["worker-1"] < 4:
            assert time.monotonic() < deadline, out.getvalue()
            assert httpx.get(f"{svc.api_url}/healthz").status_code == 200
            time.sleep(0.05)
        svc.check()  # restarting a child is not an error
        # Only the crashing child was touched: same processes for the others.
        assert {c.name: c.process.pid for c in svc.children if c.name != "worker-1"} == {
            n: p for n, p in pids.items() if n != "worker-1"
        }
        assert svc.restarts == {"api": 0, "gateway": 0, "worker-1": 4, "monitor": 0}
    worker = [e for e in svc.events if e.child == "worker-1"][:4]
    assert [(e.exit_code, e.attempt, e.delay_s) for e in worker] == [
        (7, 1, 0.2),
        (7, 2, 0.4),  # doubled
        (7, 3, 0.4),  # capped
        (7, 4, 0.4),
    ]
    said = out.getvalue()
    assert "worker-1 (pid" in said and "exited with code 7" in said
    assert "restarting it in 0.2 s (attempt 1, 1 in all)" in said
    assert "worker: out of memory (pretend)" in said  # the end of its log comes along
    logs = tmp_path / "home" / "run" / "logs"
    assert "worker-1" in (logs / "up.log").read_text()
    assert "--- carrara up: restart 1 of worker-1 ---" in (logs / "worker-1.log").read_text()
    # Stopped gracefully, as before: the long-running children by SIGTERM.
    codes = {c.name: c.process.returncode for c in svc.children}
    assert codes["api"] == codes["monitor"] == -signal.SIGTERM


def test_the_backoff_resets_after_a_healthy_run(
    tmp_path: Path, fake_python: Path, out: io.StringIO
) -> None:
    svc = _services(
        tmp_path,
        fake_python,
        out,
        restart_backoff_s=0.2,
        restart_backoff_max_s=5.0,
        restart_reset_s=0.25,  # the 0.3 s the fake worker lives counts as healthy
    )
    with svc:
        _crash_workers(tmp_path)
        deadline = time.monotonic() + 20
        while svc.restarts["worker-1"] < 3:
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.05)
    assert [e.attempt for e in svc.events[:3]] == [1, 1, 1]
    assert [e.delay_s for e in svc.events[:3]] == [0.2, 0.2, 0.2]


def test_up_gives_up_past_max_restarts(tmp_path: Path, fake_python: Path, out: io.StringIO) -> None:
    svc = _services(tmp_path, fake_python, out, restart_backoff_s=0.1, max_restarts=2)
    with svc:
        _crash_workers(tmp_path)
        deadline = time.monotonic() + 20
        while True:
            try:
                svc.check()
            except ChildExitedError as exc:
                assert "worker-1 exited with code 7 after 2 restarts in a row" in str(exc)
                assert "out of memory" in str(exc)
                break
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.05)
        time.sleep(0.5)  # given up: no third restart
        assert svc.restarts["worker-1"] == 2 and "giving up" in out.getvalue()


def test_without_restart_any_exit_is_an_error_as_before(
    tmp_path: Path, fake_python: Path, out: io.StringIO
) -> None:
    svc = _services(tmp_path, fake_python, out, restart=False)
    with svc:
        _crash_workers(tmp_path)
        deadline = time.monotonic() + 20
        with pytest.raises(ChildExitedError, match="worker-1 exited with code 7"):
            while time.monotonic() < deadline:
                svc.check()
                time.sleep(0.05)
        assert svc.restarts["worker-1"] == 0


def test_restart_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="restart_backoff_s"):
        UpConfig(restart_backoff_s=0)
    with pytest.raises(ConfigError, match="restart_backoff_s"):
        UpConfig(restart_backoff_s=5, restart_backoff_max_s=1)
    with pytest.raises(ConfigError, match="max_restarts"):
        UpConfig(max_restarts=-1)
