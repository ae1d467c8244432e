"""``carrara up`` on the real PostgreSQL and Redis: the gateway SIGKILLed, restarted on the
same ports while the API keeps answering, the restart counted and logged."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from carrara.up import Services

from ..servers import up_config_on_real_stores

pytestmark = pytest.mark.integration


def test_a_sigkilled_gateway_is_restarted_and_the_api_keeps_answering(
    tmp_path: Path, postgres_url: str, redis_url: str, redis_namespace: str
) -> None:
    settings, up = up_config_on_real_stores(
        tmp_path,
        postgres_url,
        redis_url,
        redis_namespace,
        "e2e-token",
        workers=0,
        monitor=False,
        materializer=False,
        triggers=False,
    )
    out = io.StringIO()
    with Services(settings, up, out=out) as svc, httpx.Client(timeout=5.0) as http:
        gateway = next(c for c in svc.children if c.name == "gateway")
        api = next(c for c in svc.children if c.name == "api")
        old_pid, api_pid = gateway.process.pid, api.process.pid
        gateway_url = svc.gateway_url  # chosen once (port 0): the restart keeps it

        api_answers: list[int] = []
        stop = threading.Event()

        def probe_api() -> None:
            with httpx.Client(timeout=5.0) as probe:
                while not stop.wait(0.05):
                    try:
                        api_answers.append(probe.get(f"{svc.api_url}/healthz").status_code)
                    except httpx.HTTPError:
                        api_answers.append(0)

        prober = threading.Thread(target=probe_api)
        prober.start()
        try:
            os.kill(old_pid, signal.SIGKILL)
            deadline = time.monotonic() + 90
            while True:
                assert time.monotonic() < deadline, out.getvalue() + svc.log_tail("gateway")
                if svc.restarts["gateway"] and gateway.process.pid != old_pid:
                    try:
                        if http.get(f"{gateway_url}/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                time.sleep(0.1)
        finally:
            stop.set()
            prober.join()

        assert svc.gateway_url == gateway_url
        assert api.process.pid == api_pid and api.process.poll() is None
        assert len(api_answers) > 5 and set(api_answers) == {200}, api_answers
        assert svc.restarts == {"api": 0, "gateway": 1}
        [event] = svc.events
        assert (event.child, event.exit_code, event.attempt) == ("gateway", -signal.SIGKILL, 1)
        said = out.getvalue()
        assert f"gateway (pid {old_pid}) exited with code -9" in said
        assert "restarting it in 0.5 s (attempt 1, 1 in all)" in said
        assert "gateway" in (tmp_path / "run" / "logs" / "up.log").read_text()
        svc.check()  # a restarted child is no error
    codes = {c.name: c.process.returncode for c in svc.children}
    assert set(codes.values()) <= {0, -signal.SIGTERM}, codes
