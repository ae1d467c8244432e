"""Load for the chaos cases: a closed-loop gRPC client (threads, each one request at a time,
every request and its outcome kept) and an open-loop ModelInfer client — the native
``kserve_load`` (bench/native) when it is built, else processes of ``tests/chaos/openloop.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.chaos.record import ROOT

__all__ = ["ClosedLoop", "Outcome", "kserve_load_binary", "open_loop"]

#: Where ``python -m bench.overload`` builds the native load generator (Release).
KSERVE_LOAD = ROOT / "build" / "bench-native" / "bench" / "native" / "kserve_load"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: when it was sent and answered (``time.monotonic``), its status code name,
    and what the request function returned for an answer (``None`` for a failure)."""

    seq: int
    start: float
    end: float
    code: str
    answer: Any = None
    details: str = ""


@dataclass
class ClosedLoop:
    """``workers`` threads calling ``fn(seq)`` back to back until ``stop``. ``fn`` returns
    what it wants kept of an answer, or raises ``grpc.RpcError`` (kept as its code)."""

    fn: Callable[[int], Any]
    workers: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _seq: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ClosedLoop:
        import itertools

        self._seq = itertools.count()
        for i in range(self.workers):
            t = threading.Thread(target=self._run, name=f"chaos-load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self) -> None:
        local: list[Outcome] = []
        while not self._stop.is_set():
            with self._lock:
                seq = next(self._seq)
            start = time.monotonic()
            try:
                answer = self.fn(seq)
            except grpc.RpcError as exc:
                code = exc.code()
                local.append(
                    Outcome(
                        seq,
                        start,
                        time.monotonic(),
                        code.name if code is not None else "UNKNOWN",
                        None,
                        str(exc.details() or "")[:200],
                    )
                )
                if code == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.01)  # the server is gone: do not spin
                continue
            local.append(Outcome(seq, start, time.monotonic(), "OK", answer))
        with self._lock:
            self.outcomes.extend(local)

    def stop(self, timeout_s: float = 60.0) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
            assert not t.is_alive(), "a load thread did not finish"
        self.outcomes.sort(key=lambda o: o.seq)
        return self.outcomes

    def __enter__(self) -> ClosedLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


def codes(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return dict(Counter(o.code for o in outcomes))


def kserve_load_binary() -> Path | None:
    """The native open-loop client when it is built (``make chaos`` builds it)."""
    path = Path(os.environ.get("CARRARA_KSERVE_LOAD", KSERVE_LOAD))
    return path if path.exists() and os.access(path, os.X_OK) else None


def open_loop(
    target: str,
    model: str,
    entity: str,
    *,
    rate: float,
    duration_s: float,
    warmup_s: float = 0.5,
    processes: int = 2,
    deadline_s: float = 30.0,
) -> dict[str, Any]:
    """Open-loop ModelInfer at ``rate``/s for ``duration_s`` (after ``warmup_s``), latency
    from each request's intended send time. Returns ``{"client", "sent", "answered",
    "codes": {CODE: {"count", "p50_us", "p99_us", "max_us"}}}``."""
    binary = kserve_load_binary()
    if binary is not None:
        out = subprocess.run(
            [str(binary), "--target", target, "--model", model, "--entity", entity,
             "--rate", str(rate), "--duration", str(duration_s), "--warmup", str(warmup_s),
             "--channels", "4"],
            check=True, capture_output=True, text=True, timeout=duration_s + warmup_s + 90,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        result["client"] = f"kserve_load (native, {binary.relative_to(ROOT)})"
        return result
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "tests.chaos.openloop", "--target", target, "--model", model,
            "--entity", entity, "--rate", str(rate / processes), "--duration", str(duration_s),
            "--warmup", str(warmup_s), "--deadline", str(deadline_s)]  # fmt: skip
    procs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        for _ in range(processes)
    ]
    parts: list[dict[str, Any]] = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=duration_s + warmup_s + deadline_s + 60)
        if p.returncode != 0:
            raise RuntimeError(f"open-loop client failed ({p.returncode}): {stderr[-2000:]}")
        parts.append(json.loads(stdout))
    latencies: dict[str, list[float]] = {}
    for part in parts:
        for code, values in part["latency_us"].items():
            latencies.setdefault(code, []).extend(values)
    merged: dict[str, Any] = {
        "client": f"tests/chaos/openloop.py x{processes} (grpc.aio; kserve_load not built)",
        "offered_rate": rate,
        "sent": sum(int(p["sent"]) for p in parts),
        "answered": sum(len(v) for v in latencies.values()),
        "client_backlog": sum(int(p["client_backlog"]) for p in parts),
        "codes": {},
    }
    for code, values in latencies.items():
        values.sort()
        merged["codes"][code] = {
            "count": len(values),
            "p50_us": values[int(0.50 * (len(values) - 1))],
            "p99_us": values[int(0.99 * (len(values) - 1))],
            "max_us": values[-1],
        }
    return merged
