"""Judge a ``bench.kserve_compare`` JSON against the gateway's targets; exit 1 naming each
failed line. Not run in CI (the figures need a quiet machine); ``make bench-check``.

``python -m bench.check_ratios [PATH] [--protocol grpc] [--scenario hit]``

Checks (Carrara rows of ``--scenario`` over ``--protocol``, perf_analyzer figures):

- c=1: p50 <= 150 µs and p99 <= 400 µs;
- c=16: >= 10,000 infer/s, and >= 3x Triton's infer/s at c=16 over the same protocol;
- cache miss: infer/s >= 0.7x the cache-hit infer/s, at every concurrency both were run at.

A row that is missing, or that perf_analyzer could not measure, fails its check. Standard
library only, so it runs without the project installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent / "results" / "python_front.json"

C1_P50_US = 150.0
C1_P99_US = 400.0
C16_INFER_PER_S = 10_000.0
C16_VS_TRITON = 3.0
MISS_VS_HIT = 0.7


@dataclass
class Result:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


Row = dict[str, Any]


def _find(rows: Sequence[Row], target: str, scenario: str | None, protocol: str, c: int) -> Row:
    for r in rows:
        if (
            r.get("target") == target
            and (scenario is None or r.get("scenario") == scenario)
            and r.get("protocol") == protocol
            and r.get("concurrency") == c
            and r.get("request_rate") is None
        ):
            return r
    return {}


def _label(target: str, scenario: str | None, protocol: str, c: int) -> str:
    return " ".join(p for p in (target, scenario, protocol, f"c={c}") if p)


def _value(row: Row, key: str, label: str) -> tuple[float | None, str]:
    if not row:
        return None, f"no {label} row in the results"
    value = row.get(key)
    if value is None:
        return None, f"{label} has no {key}: {row.get('error') or 'not measured'}"
    return float(value), ""


def at_most(name: str, row: Row, key: str, limit: float, label: str, unit: str) -> Result:
    value, why = _value(row, key, label)
    if value is None:
        return Result(name, False, why)
    return Result(name, value <= limit, f"{label} {key} = {value:,.0f} {unit} (limit {limit:,.0f})")


def at_least(name: str, row: Row, key: str, limit: float, label: str, unit: str) -> Result:
    value, why = _value(row, key, label)
    if value is None:
        return Result(name, False, why)
    return Result(name, value >= limit, f"{label} {key} = {value:,.0f} {unit} (floor {limit:,.0f})")


def ratio_at_least(
    name: str, row: Row, peer: Row, key: str, floor: float, label: str, peer_label: str
) -> Result:
    a, why = _value(row, key, label)
    if a is None:
        return Result(name, False, why)
    b, why = _value(peer, key, peer_label)
    if b is None:
        return Result(name, False, why)
    if b <= 0:
        return Result(name, False, f"{peer_label} {key} is {b}")
    ratio = a / b
    return Result(
        name,
        ratio >= floor,
        f"{label} / {peer_label} {key} = {a:,.0f} / {b:,.0f} = {ratio:.2f}x (floor {floor:g}x)",
    )


def check(report: dict[str, Any], *, protocol: str = "grpc", scenario: str = "hit") -> list[Result]:
    rows: list[Row] = list(report.get("rows", []))
    out: list[Result] = []
    c1_label = _label("carrara", scenario, protocol, 1)
    c1 = _find(rows, "carrara", scenario, protocol, 1)
    out.append(at_most(f"c=1 p50 <= {C1_P50_US:g} us", c1, "p50_us", C1_P50_US, c1_label, "us"))
    out.append(at_most(f"c=1 p99 <= {C1_P99_US:g} us", c1, "p99_us", C1_P99_US, c1_label, "us"))
    c16_label = _label("carrara", scenario, protocol, 16)
    c16 = _find(rows, "carrara", scenario, protocol, 16)
    out.append(
        at_least(
            f"c=16 >= {C16_INFER_PER_S:,.0f} infer/s",
            c16,
            "infer_per_s",
            C16_INFER_PER_S,
            c16_label,
            "infer/s",
        )
    )
    # Triton measured beside the same scenario (older results: any Triton row at c=16).
    t16 = _find(rows, "triton", scenario, protocol, 16) or _find(rows, "triton", None, protocol, 16)
    out.append(
        ratio_at_least(
            f"c=16 >= {C16_VS_TRITON:g}x Triton",
            c16,
            t16,
            "infer_per_s",
            C16_VS_TRITON,
            c16_label,
            _label("triton", scenario, protocol, 16),
        )
    )
    levels = sorted(
        {
            int(r["concurrency"])
            for r in rows
            if r.get("target") == "carrara"
            and r.get("protocol") == protocol
            and r.get("scenario") in (scenario, "miss")
            and r.get("concurrency") is not None
            and r.get("request_rate") is None
        }
    )
    if not levels:
        out.append(Result(f"miss >= {MISS_VS_HIT:g}x hit", False, "no carrara rows"))
    for c in levels:
        out.append(
            ratio_at_least(
                f"miss >= {MISS_VS_HIT:g}x hit infer/s at c={c}",
                _find(rows, "carrara", "miss", protocol, c),
                _find(rows, "carrara", scenario, protocol, c),
                "infer_per_s",
                MISS_VS_HIT,
                _label("carrara", "miss", protocol, c),
                _label("carrara", scenario, protocol, c),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.check_ratios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    p.add_argument("--protocol", default="grpc", help="rows to judge (default: %(default)s)")
    p.add_argument("--scenario", default="hit", help="the cache-hit scenario's name")
    args = p.parse_args(argv)
    try:
        report = json.loads(args.path.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.path}: {exc}", file=sys.stderr)
        return 2
    results = check(report, protocol=args.protocol, scenario=args.scenario)
    machine = report.get("machine", {})
    print(
        f"{args.path}: {report.get('carrara_front', '?')}, measured {report.get('started_at', '?')}"
        f" on {machine.get('nproc', '?')} CPUs ({machine.get('cpu_model', '?')})"
    )
    for r in results:
        print(r.line())
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
