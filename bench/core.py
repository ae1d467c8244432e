"""Native microbenchmarks of the serving core (targets in BENCHMARKS.md), via Google Benchmark.

Run ``python -m bench.core [--quick] [--repetitions N] [--json PATH]`` from the repository root.
It configures and builds ``carrara_core_bench`` in Release under ``build/bench`` (reusing that
build: an up-to-date tree only costs a no-op ``cmake --build``), runs it with
``--benchmark_repetitions=N`` and prints, per case, the median and the p99 of the per-operation
wall-clock time over the N repetitions (each repetition's time is its mean over many
iterations; p99 is the nearest-rank 99th percentile of those N values, so the maximum for
N < 100), next to the §5 target where there is one. ``--json PATH`` writes
``[{"name", "median_ns", "p99_ns"}, ...]``; the table also shows the median CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "bench"
BINARY = BUILD_DIR / "bench" / "native" / "carrara_core_bench"

# Targets (as in BENCHMARKS.md), nanoseconds per operation.
TARGETS_NS: dict[str, float] = {
    "BM_CacheHit": 100.0,
    "BM_Decode32": 200.0,
    "BM_AssembleCached96": 1_000.0,
    "BM_Route": 50.0,
}

_NS_PER_UNIT = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


class Result(TypedDict):
    name: str
    median_ns: float
    p99_ns: float


class Summary(TypedDict):
    """A Result plus the median CPU time, which shows how much of the wall time was waiting
    for a core on a shared machine."""

    name: str
    median_ns: float
    p99_ns: float
    cpu_median_ns: float


def _ninja() -> str:
    venv_ninja = ROOT / ".venv" / "bin" / "ninja"
    if venv_ninja.exists():
        return str(venv_ninja)
    found = shutil.which("ninja")
    if found is None:
        raise SystemExit("ninja not found: run `make install` first")
    return found


def build() -> Path:
    """Configure (once) and build the Release benchmark binary; returns its path."""
    if not (BUILD_DIR / "build.ninja").exists():
        subprocess.run(
            [
                "cmake",
                "-S",
                str(ROOT),
                "-B",
                str(BUILD_DIR),
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DCARRARA_BENCH=ON",
                f"-DCMAKE_MAKE_PROGRAM={_ninja()}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    subprocess.run(
        ["cmake", "--build", str(BUILD_DIR), "-j2", "--target", "carrara_core_bench"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return BINARY


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(report: dict[str, Any]) -> list[Summary]:
    """Median and p99 of each case's per-repetition times, from Google Benchmark's JSON."""
    per_case: dict[str, list[float]] = defaultdict(list)
    cpu_per_case: dict[str, list[float]] = defaultdict(list)
    for row in report["benchmarks"]:
        if row.get("run_type", "iteration") != "iteration":
            continue  # aggregates: recomputed here from the repetitions
        if row.get("error_occurred"):
            raise RuntimeError(f"{row['name']}: {row.get('error_message', 'error')}")
        scale = _NS_PER_UNIT[row.get("time_unit", "ns")]
        name = row.get("run_name", row["name"])
        per_case[name].append(float(row["real_time"]) * scale)
        cpu_per_case[name].append(float(row.get("cpu_time", row["real_time"])) * scale)
    return [
        Summary(
            name=name,
            median_ns=statistics.median(times),
            p99_ns=percentile(times, 99),
            cpu_median_ns=statistics.median(cpu_per_case[name]),
        )
        for name, times in per_case.items()
    ]


def run(
    repetitions: int = 10, min_time_s: float = 0.2, benchmark_filter: str | None = None
) -> list[Summary]:
    """Builds if needed, runs the benchmarks and returns one result per case."""
    binary = build()
    cmd = [
        str(binary),
        f"--benchmark_repetitions={repetitions}",
        f"--benchmark_min_time={min_time_s}",
        "--benchmark_format=json",
    ]
    if benchmark_filter:
        cmd.append(f"--benchmark_filter={benchmark_filter}")
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return summarize(json.loads(proc.stdout))


def format_table(results: Sequence[Summary]) -> str:
    header = (
        f"{'name':<34} {'median_ns':>11} {'p99_ns':>11} {'target_ns':>10}  meets"
        f" {'cpu_median_ns':>14}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        target = TARGETS_NS.get(r["name"])
        target_s = f"{target:>10.0f}" if target is not None else f"{'-':>10}"
        meets = "-" if target is None else ("yes" if r["median_ns"] <= target else "NO")
        lines.append(
            f"{r['name']:<34} {r['median_ns']:>11.1f} {r['p99_ns']:>11.1f} {target_s}"
            f"  {meets:<5} {r['cpu_median_ns']:>14.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 short repetitions")
    parser.add_argument("--repetitions", type=int, default=None, help="default 10 (3 if --quick)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per repetition")
    parser.add_argument("--filter", default=None, help="Google Benchmark regex of cases")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    repetitions = args.repetitions or (3 if args.quick else 10)
    min_time = args.min_time or (0.02 if args.quick else 0.2)
    if repetitions < 1:
        parser.error("--repetitions must be >= 1")
    results = run(repetitions, min_time, args.filter)
    print(format_table(results))
    print(f"({repetitions} repetitions; p99 over the repetitions' per-op wall-clock times)")
    if args.json is not None:
        plain = [
            Result(name=r["name"], median_ns=r["median_ns"], p99_ns=r["p99_ns"]) for r in results
        ]
        args.json.write_text(json.dumps(plain, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
