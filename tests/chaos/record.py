"""The chaos suite's figures: one JSON record per case in ``build/chaos/<case>.json``.

Every case of ``tests/chaos`` (and any fault test that wants a row in RELIABILITY.md, e.g. the
PostgreSQL session-kill / server-restart cases and the registry hot swap through a deploy)
fills one :class:`CaseRecord` and saves it; ``python -m tests.chaos.report`` renders
RELIABILITY.md from whatever records are there. A record describes itself (title, what the
test asserts, how it was run), so a new case needs no change to the report: add its id to
:data:`EXPECTED` so that a missing record shows up as "not run".

Inside ``tests/chaos`` the ``chaos_record`` fixture (conftest.py) makes the record and saves it
after the test with its outcome; elsewhere::

    rec = CaseRecord("postgres_session_kill", title=..., asserted=...)
    ...  # fill the figures
    rec.save(outcome="passed")

Standard library only: the report runs without the platform installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EXPECTED",
    "FULL",
    "OUT_DIR",
    "ROOT",
    "CaseRecord",
    "load_records",
    "machine",
    "p99_ms",
    "rss_mb",
]

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = Path(os.environ.get("CARRARA_CHAOS_OUT", ROOT / "build" / "chaos"))
#: ``make chaos`` sets CARRARA_CHAOS_FULL=1: longer loads, more faults, more fuzz inputs.
FULL = os.environ.get("CARRARA_CHAOS_FULL", "") not in ("", "0")

#: Case ids RELIABILITY.md lists even when their record is missing (rendered "not run"), in
#: table order. Owners of other fault cases add theirs here.
EXPECTED: tuple[str, ...] = (
    "redis_kill",
    "redis_hang",
    "gateway_sigterm_log_redis",
    "gateway_sigterm_log_sqlite",
    "gateway_sigkill_log_redis",
    "gateway_sigkill_log_sqlite",
    "overload_2x",
    "hot_swap_deploy",
    "grpc_fuzz",
    "http_fuzz",
    "http_fuzz_postgresql",
    # Owned elsewhere (PostgreSQL faults, registry deploy path); listed so RELIABILITY.md shows
    # them as "not run" until their tests write a record:
    "postgres_session_kill",
    "postgres_restart",
    "registry_hot_swap",
)


@dataclass
class CaseRecord:
    """One case's figures. ``None`` = not applicable to this case (rendered as "-")."""

    case: str  # file stem under build/chaos, [a-z0-9_]
    title: str = ""
    asserted: str = ""  # what the test asserts, one paragraph (rendered in RELIABILITY.md)
    sent: int = 0
    answered: int = 0
    refused: int | None = None  # turned away by design (RESOURCE_EXHAUSTED, a stopping gateway)
    failed: int = 0  # neither answered nor refused by design
    degraded: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    p99_ms: float | None = None
    recovery_s: float | None = None
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    notes: list[str] = field(default_factory=list)  # measured facts worth a sentence
    extra: dict[str, Any] = field(default_factory=dict)  # case-specific figures
    outcome: str = "not saved"  # passed / failed / skipped, set by save()
    mode: str = field(default_factory=lambda: "full" if FULL else "short")
    command: str = ""  # how this record was produced
    date: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def save(self, outcome: str, directory: Path | None = None) -> Path:
        """Write ``<directory>/<case>.json`` (default ``build/chaos``)."""
        self.outcome = outcome
        self.date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.machine = machine()
        if not self.command:
            self.command = "make chaos" if FULL else "pytest tests/chaos (short run, make test)"
        out = directory or OUT_DIR
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.case}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True, default=_jsonable))
        tmp.replace(path)
        return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, set | frozenset | tuple):
        return sorted(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def load_records(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every record under ``directory`` (default ``build/chaos``), by case id."""
    out = directory or OUT_DIR
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "case" in data:
            records[str(data["case"])] = data
    return records


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of process ``pid`` (this one by default), MB (MiB)."""
    with open(f"/proc/{pid or 'self'}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def p99_ms(latencies_s: list[float]) -> float | None:
    """The 99th percentile (nearest rank) of latencies in seconds, in milliseconds."""
    if not latencies_s:
        return None
    ordered = sorted(latencies_s)
    k = max(0, math.ceil(0.99 * len(ordered)) - 1)
    return round(ordered[k] * 1e3, 2)


def machine() -> dict[str, Any]:
    """Cores, memory and CPU of this machine."""
    mem_gb = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": cores,
        "memory_gb": mem_gb,
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
