"""``carrara loadtest``: hold a serving endpoint to an SLA at a given rate, or find where it breaks.

    carrara loadtest grpc://127.0.0.1:8001 --model m --rate 2000 --slo p99=2ms
    carrara loadtest http://127.0.0.1:8000 --model m --ramp 500:5000:500 --slo p99=2ms
    carrara loadtest kserve://127.0.0.1:8001 --model m --closed 16 --duration 10

Exit status: 0 when the SLO holds (or none was given), 1 when it does not.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest",
        help="open/closed-loop load test of a gRPC, KServe v2 or HTTP endpoint against an SLO",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="grpc://HOST:PORT | kserve://HOST:PORT | http://HOST:PORT | null")
    p.add_argument("--model", default="default", help="model name (default: %(default)s)")
    p.add_argument("--path", default="/predict/{model}", help="HTTP path template")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: offered requests/s (default 100)")
    mode.add_argument("--closed", type=int, metavar="N", help="closed loop with N in flight")
    mode.add_argument(
        "--ramp",
        metavar="START:STOP:STEP",
        help="open-loop steps (STEP may be xFACTOR) until the SLO fails",
    )
    p.add_argument("--refine", type=int, default=0, help="ramp: bisection steps after a failure")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per stage")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    p.add_argument("--batch", type=int, default=1, help="entity ids per request")
    p.add_argument("--entities", type=int, default=1_000, help="distinct entity ids")
    p.add_argument(
        "--entity-dist", default="uniform", help="uniform | zipf[:S] (default exponent 1.1)"
    )
    p.add_argument("--entity-prefix", default="e", help="ids are PREFIX0, PREFIX1, ...")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    p.add_argument("--processes", type=int, default=1, help="generator processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="p99=2ms",
        help="p50/p90/p99/p99.9/max/mean=DURATION, errors=PCT; repeat or comma-separate",
    )
    p.add_argument("--json", dest="json_path", help="write the full result here")
    p.add_argument("--html", dest="html_path", help="write latency plots here")
    p.add_argument("--label", default="", help="a name for this run in the reports")
    p.set_defaults(func=_loadtest)


def _loadtest(args: argparse.Namespace) -> int:
    import datetime
    from pathlib import Path

    from carrara.errors import InvalidArgumentError
    from carrara.loadgen.distributions import EntitySpec
    from carrara.loadgen.report import format_table, write_html, write_json
    from carrara.loadgen.runner import (
        LoadTestResult,
        StagePlan,
        StageResult,
        machine_description,
        ramp_rates,
        run_ramp,
        run_stage,
    )
    from carrara.loadgen.sla import parse_slo
    from carrara.loadgen.targets import TargetSpec, parse_target

    kind, address = parse_target(args.target)
    dist, _, s = args.entity_dist.partition(":")
    if dist not in ("uniform", "zipf"):
        raise InvalidArgumentError(f"--entity-dist {args.entity_dist!r}: use uniform or zipf[:S]")
    entities = EntitySpec(
        distribution=dist,
        count=args.entities,
        zipf_s=float(s) if s else 1.1,
        prefix=args.entity_prefix,
    )
    spec = TargetSpec(
        kind=kind,
        address=address,
        model=args.model,
        http_path=args.path,
        batch=args.batch,
        entities=entities,
        timeout_s=args.timeout,
    )
    slo = parse_slo(args.slo) if args.slo else None
    plan = StagePlan(
        mode="closed" if args.closed else "open",
        rate=args.rate if args.rate is not None else 100.0,
        arrivals=args.arrivals,
        concurrency=args.closed or 1,
        duration_s=args.duration,
        warmup_s=args.warmup,
        processes=args.processes,
        seed=args.seed,
    )
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    def progress(stage: StageResult) -> None:
        lat = stage.latency
        verdict = stage.verdict.describe() if stage.verdict is not None else ""
        print(
            f"  {stage.offered_rate or 0:>8.0f}/s offered: {stage.achieved_rate:>8.1f}/s ok, "
            f"p50 {lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms  {verdict}",
            flush=True,
        )

    best = worst = None
    if args.ramp:
        if slo is None:
            raise InvalidArgumentError("--ramp needs an --slo to know where the target breaks")
        stages, best, worst = run_ramp(
            spec, plan, ramp_rates(args.ramp), slo, refine=args.refine, progress=progress
        )
    else:
        stages = [run_stage(spec, plan, slo=slo)]
    passed = None
    if slo is not None:
        passed = (
            (best is not None)
            if args.ramp
            else all(s.verdict is not None and s.verdict.passed for s in stages)
        )
    result = LoadTestResult(
        target=spec.describe(),
        slo=slo,
        stages=stages,
        passed=passed,
        max_passing_rate=best,
        first_failing_rate=worst,
        started_at=started,
        machine=machine_description(),
        label=args.label,
    )
    print(format_table(result))
    if args.json_path:
        write_json(result, Path(args.json_path))
    if args.html_path:
        write_html(result, Path(args.html_path))
    return 0 if passed in (None, True) else 1
