"""Overload at 2x saturation against the native front, with a load generator that keeps going
past refusals (``bench/native/kserve_load.cpp``; perf_analyzer stops at the first one).

``python -m bench.overload [--saturation INFER_PER_S] [--factor 2] [--duration 5] [--out PATH]``

The gateway of ``bench.kserve_compare`` (the ``linear`` model, cache hits, in-flight bound 64)
runs in this process; ``kserve_load`` sends ModelInfer open loop (fixed intervals, latency from
the intended send time) first at 10% of saturation (the unloaded reference), then at
``factor`` x saturation. Reported: accepted and refused counts with their p50/p99, the ratio of
accepted p99 loaded / unloaded (target <= 2), refusal p99 (target <= 1 ms) and the process RSS
before and after (bounded memory). Saturation defaults to the best cache-hit gRPC infer/s in
``bench/results/native_front.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import kserve_compare as kc

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench-native"  # Release build of the native benchmarks
LOAD = BUILD / "bench" / "native" / "kserve_load"


def build_load() -> Path:
    """Configure and build ``kserve_load`` (Release) once."""
    if not LOAD.exists():
        subprocess.run(
            ["cmake", "-S", str(REPO), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
             "-DCARRARA_BENCH=ON", "-DCARRARA_SERVER=ON"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(BUILD), "--target", "kserve_load", "-j2"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return LOAD


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saturation_from(path: Path) -> float:
    data = json.loads(path.read_text())
    best = [
        r["infer_per_s"]
        for r in data["rows"]
        if r.get("target") == "carrara"
        and r.get("scenario") == "hit"
        and r.get("protocol") == "grpc"
        and r.get("infer_per_s")
    ]
    if not best:
        raise SystemExit(f"{path} has no cache-hit gRPC row for Carrara; pass --saturation")
    return float(max(best))


def load(binary: Path, grpc: str, rate: float, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        [str(binary), "--target", grpc, "--model", kc.MODEL, "--entity", kc.hot_ids()[0],
         "--rate", str(rate), "--duration", str(duration), "--warmup", "1", "--channels", "4"],
        check=True, capture_output=True, text=True, timeout=duration + 90,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run(saturation: float, factor: float, duration: float) -> dict[str, Any]:
    binary = build_load()
    with tempfile.TemporaryDirectory() as tmp:
        from carrara.gateway.onnx_models import write_linear_model

        model_path = write_linear_model(Path(tmp) / "linear.onnx", kc.WEIGHTS, kc.BIAS)
        setup = kc.CarraraSetup(model_path=model_path, cache="hit", store_ids=tuple(kc.hot_ids()))
        with kc.start_python_front(setup) as endpoint:
            rss_before = rss_mib()
            unloaded = load(binary, endpoint.grpc, 0.1 * saturation, duration)
            loaded = load(binary, endpoint.grpc, factor * saturation, duration)
            rss_after = rss_mib()
    ok0 = unloaded["codes"].get("OK", {})
    ok = loaded["codes"].get("OK", {})
    refused = loaded["codes"].get("RESOURCE_EXHAUSTED", {})
    report = {
        "machine": kc.machine_info(),
        "front": kc._front_description(),
        "saturation_infer_per_s": saturation,
        "factor": factor,
        "unloaded": unloaded,
        "loaded": loaded,
        "accepted_p99_ratio": (ok.get("p99_us", 0) / ok0["p99_us"]) if ok0.get("p99_us") else None,
        "refusal_p99_us": refused.get("p99_us"),
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_after": round(rss_after, 1),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    p.add_argument("--saturation", type=float, help="gateway saturation, infer/s")
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--from-json", type=Path, default=REPO / "bench/results/native_front.json")
    p.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "overload.json")
    args = p.parse_args(argv)
    saturation = args.saturation or saturation_from(args.from_json)
    report = run(saturation, args.factor, args.duration)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
