"""The load generator: open-loop (fixed arrival rate) and closed-loop (fixed concurrency) runs,
in one process or fanned out over several, and the step/ramp search for the highest rate that
still meets an SLO.

Open loop, the mode that answers "at R req/s, is p99 under X": the send times are fixed before
the run (Poisson or evenly spaced), a pacer thread sleeps precisely (``time.sleep`` is a
nanosleep; the event loop's timers are only millisecond-accurate) and hands each due request to
the I/O loop, and every latency is measured from its *intended* send time. A server that stalls
therefore cannot make the client send less and hide the stall (coordinated omission): each
request that should have gone out during the stall counts the whole wait. How late the client
itself sent (``send_lag``) is reported too, so a saturated generator is visible rather than
silently mistaken for a slow server.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Literal

import msgspec
import numpy as np

from carrara.loadgen.distributions import Arrivals, EntitySampler, arrival_offsets
from carrara.loadgen.histogram import HistogramData, LatencyHistogram, LatencySummary
from carrara.loadgen.sla import SLO, Verdict, evaluate
from carrara.loadgen.targets import Target, TargetSpec, build_target

__all__ = [
    "LoadTestResult",
    "StagePlan",
    "StageResult",
    "WorkerOutput",
    "ramp_rates",
    "run_ramp",
    "run_stage",
]

SHED_CODES = frozenset({"RESOURCE_EXHAUSTED", "HTTP_429"})


class StagePlan(msgspec.Struct, frozen=True, kw_only=True):
    """One measured run: ``warmup_s`` unrecorded, then ``duration_s`` recorded."""

    mode: Literal["open", "closed"] = "open"
    rate: float = 100.0  # open loop: offered requests/s (all processes together)
    arrivals: Arrivals = "poisson"
    concurrency: int = 1  # closed loop: requests in flight (all processes together)
    duration_s: float = 10.0
    warmup_s: float = 1.0
    processes: int = 1
    seed: int = 0
    max_in_flight: int = 20_000  # per process; past it a request is counted CLIENT_BACKLOG
    drain_s: float | None = None  # wait for stragglers after the last send; None: timeout


class WorkerOutput(msgspec.Struct, kw_only=True):
    """What one generator process measured (histograms merge by addition)."""

    latency: HistogramData
    send_lag: HistogramData
    scheduled: int
    sent: int
    ok: int
    errors: dict[str, int]
    cpu_s: float
    wall_s: float


class StageResult(msgspec.Struct, kw_only=True):
    """One stage's measurements; latencies are of successful responses."""

    mode: str
    offered_rate: float | None
    concurrency: int | None
    duration_s: float
    warmup_s: float
    processes: int
    requests: int  # measured requests (sent or due to be sent in the window)
    ok: int
    errors: dict[str, int]
    shed: int
    achieved_rate: float  # successful responses / duration
    latency: LatencySummary
    send_lag: LatencySummary
    generator_cpu_s: float
    generator_cpu_us_per_request: float
    generator_saturated: bool
    histogram: HistogramData
    verdict: Verdict | None = None


class LoadTestResult(msgspec.Struct, kw_only=True):
    """A whole ``carrara loadtest`` run: the target, the SLO, each stage and the answer."""

    target: str
    slo: SLO | None
    stages: list[StageResult]
    passed: bool | None  # every stage meets the SLO (None: no SLO given)
    max_passing_rate: float | None = None  # ramp: highest offered rate that met the SLO
    first_failing_rate: float | None = None
    started_at: str = ""
    machine: str = ""
    label: str = ""


class _Recorder:
    """Per-process bookkeeping on the loop thread (single-threaded: no locks)."""

    def __init__(self, measure_from: int, measure_to: int) -> None:
        self.measure_from = measure_from
        self.measure_to = measure_to
        self.intended: dict[int, int] = {}
        self.latencies: list[int] = []
        self.lags: list[int] = []
        self.scheduled = 0
        self.sent = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    def measured(self, intended: int) -> bool:
        return self.measure_from <= intended < self.measure_to

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def done(self, token: int, t: int, code: str) -> None:
        intended = self.intended.pop(token, None)
        if intended is None:  # already given up on (timeout)
            return
        if self.measured(intended):
            if code == "OK":
                self.ok += 1
                self.latencies.append(t - intended)
            else:
                self.error(code)
        if not self.intended:
            self.idle.set()


def _hist(values: list[int]) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record(np.asarray(values, dtype=np.int64))
    return h


async def _drive_open(
    target: Target,
    plan: StagePlan,
    spec: TargetSpec,
    share: float,
    index: int,
    start_ns: int,
    timeout_s: float,
) -> _Recorder:
    rng = np.random.default_rng([plan.seed, index])
    total_s = plan.warmup_s + plan.duration_s
    phase = index / plan.processes if plan.arrivals == "constant" else 0.0
    offsets = arrival_offsets(share, total_s, plan.arrivals, rng, phase=phase)
    when = (offsets + start_ns).tolist()
    n = len(when)
    sampler = EntitySampler(spec.entities, seed=plan.seed * 1_000 + index + 1)
    ranks = sampler.ranks(max(n, 1) * spec.batch).reshape(-1, spec.batch).tolist()
    names = sampler.names
    rec = _Recorder(start_ns + int(plan.warmup_s * 1e9), start_ns + int(total_s * 1e9))
    rec.scheduled = sum(1 for w in when if rec.measured(w))
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    stop = threading.Event()

    def fire(lo: int, hi: int) -> None:
        now = time.monotonic_ns()
        for i in range(lo, hi):
            w = when[i]
            measured = rec.measured(w)
            if len(rec.intended) >= plan.max_in_flight:
                if measured:
                    rec.error("CLIENT_BACKLOG")
                continue
            rec.intended[i] = w
            rec.idle.clear()
            if measured:
                rec.sent += 1
                rec.lags.append(now - w)
            target.send(i, [names[k] for k in ranks[i]], rec.done)

    def pace() -> None:
        # Sleep to each due time, then hand every request that is due to the loop at once:
        # one wake-up per batch keeps the cost flat when the rate outruns the sleep accuracy.
        i = 0
        try:
            while i < n and not stop.is_set():
                delay = when[i] - time.monotonic_ns()
                if delay > 0:
                    time.sleep(delay / 1e9)
                now = time.monotonic_ns()
                j = i + 1
                while j < n and when[j] <= now:
                    j += 1
                loop.call_soon_threadsafe(fire, i, j)
                i = j
        finally:
            loop.call_soon_threadsafe(finished.set)

    pacer = threading.Thread(target=pace, name="carrara-loadgen-pacer", daemon=True)
    pacer.start()
    try:
        await finished.wait()
        await asyncio.sleep(0)  # let the last fire() run
        drain = timeout_s if plan.drain_s is None else plan.drain_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rec.idle.wait(), drain + 0.5)
    finally:
        stop.set()
        pacer.join()
    for _token, w in list(rec.intended.items()):
        if rec.measured(w):
            rec.error("TIMEOUT")
    rec.intended.clear()
    return rec


async def _drive_closed(
    target: Target,
    plan: StagePlan,
    spec: TargetSpec,
    users: int,
    index: int,
    start_ns: int,
    timeout_s: float,
) -> _Recorder:
    total_ns = int((plan.warmup_s + plan.duration_s) * 1e9)
    rec = _Recorder(start_ns + int(plan.warmup_s * 1e9), start_ns + total_ns)
    sampler = EntitySampler(spec.entities, seed=plan.seed * 1_000 + index + 1)
    loop = asyncio.get_running_loop()
    counter = iter(range(1 << 62))
    all_done = asyncio.Event()
    active = users

    def issue() -> None:
        nonlocal active
        now = time.monotonic_ns()
        if now >= rec.measure_to:
            active -= 1
            if active == 0:
                all_done.set()
            return
        token = next(counter)
        rec.intended[token] = now
        if rec.measured(now):
            rec.sent += 1
            rec.scheduled += 1
        target.send(token, sampler.ids(spec.batch), on_done)

    def on_done(token: int, t: int, code: str) -> None:
        rec.done(token, t, code)
        loop.call_soon(issue)  # never recurse: a callable target completes inside send()

    if users == 0:
        return rec
    delay = (start_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    for _ in range(users):
        issue()
    drain = timeout_s if plan.drain_s is None else plan.drain_s
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_done.wait(), plan.warmup_s + plan.duration_s + drain + 1.0)
    for _token, w in list(rec.intended.items()):
        if rec.measured(w):
            rec.error("TIMEOUT")
    return rec


async def _run_worker(
    target: Target,
    spec: TargetSpec,
    plan: StagePlan,
    index: int,
    start_ns: int,
) -> WorkerOutput:
    cpu0, wall0 = time.process_time(), time.monotonic()
    if plan.mode == "open":
        rec = await _drive_open(
            target, plan, spec, plan.rate / plan.processes, index, start_ns, spec.timeout_s
        )
    else:
        base, extra = divmod(plan.concurrency, plan.processes)
        users = base + (1 if index < extra else 0)
        rec = await _drive_closed(target, plan, spec, users, index, start_ns, spec.timeout_s)
    return WorkerOutput(
        latency=_hist(rec.latencies).to_data(),
        send_lag=_hist(rec.lags).to_data(),
        scheduled=rec.scheduled,
        sent=rec.sent,
        ok=rec.ok,
        errors=rec.errors,
        cpu_s=time.process_time() - cpu0,
        wall_s=time.monotonic() - wall0,
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a platform dependency
        return asyncio.new_event_loop()


def _run_in_process(
    spec: TargetSpec, plan: StagePlan, make_target: Callable[[], Target] | None
) -> WorkerOutput:
    async def main() -> WorkerOutput:
        target = make_target() if make_target is not None else build_target(spec)
        await target.open()
        try:
            start_ns = time.monotonic_ns() + 20_000_000
            return await _run_worker(target, spec, plan, 0, start_ns)
        finally:
            await target.close()

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(main())


def _child(spec_b: bytes, plan_b: bytes, index: int, conn: Connection) -> None:
    """Worker process: connect, report ready, wait for the common start time, run, report."""
    spec = msgspec.msgpack.decode(spec_b, type=TargetSpec)
    plan = msgspec.msgpack.decode(plan_b, type=StagePlan)

    async def main() -> WorkerOutput:
        target = build_target(spec)
        await target.open()
        try:
            conn.send_bytes(b"ready")
            loop = asyncio.get_running_loop()
            start_ns = int(await loop.run_in_executor(None, conn.recv))
            return await _run_worker(target, spec, plan, index, start_ns)
        finally:
            await target.close()

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        out = runner.run(main())
    conn.send_bytes(msgspec.msgpack.encode(out))


def _run_processes(spec: TargetSpec, plan: StagePlan) -> list[WorkerOutput]:
    ctx = multiprocessing.get_context("spawn")  # never fork a process with gRPC threads
    pipes: list[Connection] = []
    procs: list[Any] = []
    spec_b, plan_b = msgspec.msgpack.encode(spec), msgspec.msgpack.encode(plan)
    try:
        for i in range(plan.processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_child, args=(spec_b, plan_b, i, child), name=f"carrara-loadgen-{i}"
            )
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        for c in pipes:
            if not c.poll(60.0):
                raise TimeoutError("a load generator process did not start within 60 s")
            c.recv_bytes()
        start_ns = time.monotonic_ns() + 50_000_000  # CLOCK_MONOTONIC is system-wide
        for c in pipes:
            c.send(start_ns)
        limit = plan.warmup_s + plan.duration_s + spec.timeout_s + 30.0
        outputs = []
        for c in pipes:
            if not c.poll(limit):
                raise TimeoutError("a load generator process did not report back")
            outputs.append(msgspec.msgpack.decode(c.recv_bytes(), type=WorkerOutput))
        return outputs
    finally:
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.terminate()
                p.join(5.0)


def run_stage(
    spec: TargetSpec,
    plan: StagePlan,
    *,
    slo: SLO | None = None,
    make_target: Callable[[], Target] | None = None,
) -> StageResult:
    """Run one stage. ``make_target`` (in-process only) overrides ``spec``'s network client,
    e.g. with a ``CallableTarget`` around the embedded gateway."""
    if plan.processes < 1:
        raise ValueError("processes must be at least 1")
    if make_target is not None and plan.processes != 1:
        raise ValueError("an in-process target runs in one process")
    if plan.processes == 1:
        outputs = [_run_in_process(spec, plan, make_target)]
    else:
        outputs = _run_processes(spec, plan)
    latency = LatencyHistogram.merged(LatencyHistogram.from_data(o.latency) for o in outputs)
    lag = LatencyHistogram.merged(LatencyHistogram.from_data(o.send_lag) for o in outputs)
    errors: dict[str, int] = {}
    for o in outputs:
        for code, count in o.errors.items():
            errors[code] = errors.get(code, 0) + count
    ok = sum(o.ok for o in outputs)
    requests = sum(o.scheduled for o in outputs)
    cpu = sum(o.cpu_s for o in outputs)
    sent = sum(o.sent for o in outputs)
    achieved = ok / plan.duration_s
    lag_summary = lag.summary()
    # The generator is behind when its own send lag is a visible share of the latencies it
    # reports: then part of what it measures is itself (still never an under-estimate).
    saturated = plan.mode == "open" and lag_summary.p99_ms > max(
        1.0, 0.25 * latency.summary().p99_ms
    )
    offered = plan.rate if plan.mode == "open" else None
    # CPU covers warm-up and measurement; ``sent`` only the measured part.
    share = plan.duration_s / (plan.duration_s + plan.warmup_s)
    cpu_per_request_us = cpu * share / sent * 1e6 if sent else 0.0
    result = StageResult(
        mode=plan.mode,
        offered_rate=offered,
        concurrency=plan.concurrency if plan.mode == "closed" else None,
        duration_s=plan.duration_s,
        warmup_s=plan.warmup_s,
        processes=plan.processes,
        requests=requests,
        ok=ok,
        errors=errors,
        shed=sum(v for k, v in errors.items() if k in SHED_CODES),
        achieved_rate=achieved,
        latency=latency.summary(),
        send_lag=lag_summary,
        generator_cpu_s=cpu,
        generator_cpu_us_per_request=cpu_per_request_us,
        generator_saturated=saturated,
        histogram=latency.to_data(),
    )
    if slo is not None:
        result.verdict = evaluate(
            slo,
            result.latency,
            requests=requests,
            failed=requests - ok,
            # Against the arrivals actually drawn (a short Poisson stage deviates from its
            # nominal rate by chance, which is no fault of the server).
            offered_rate=requests / plan.duration_s if offered else None,
            achieved_rate=achieved,
        )
    return result


def ramp_rates(spec: str) -> list[float]:
    """``START:STOP:STEP`` (linear) or ``START:STOP:xFACTOR`` (geometric) -> offered rates."""
    try:
        start_s, stop_s, step_s = spec.split(":")
        start, stop = float(start_s), float(stop_s)
        rates: list[float] = []
        if step_s.startswith("x"):
            factor = float(step_s[1:])
            if factor <= 1:
                raise ValueError
            r = start
            while r <= stop * (1 + 1e-9):
                rates.append(round(r, 3))
                r *= factor
        else:
            step = float(step_s)
            if step <= 0:
                raise ValueError
            rates = [round(float(r), 3) for r in np.arange(start, stop + step / 2, step)]
    except ValueError:
        from carrara.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"ramp {spec!r} is not START:STOP:STEP or START:STOP:xFACTOR (e.g. 500:5000:500)"
        ) from None
    return rates


def run_ramp(
    spec: TargetSpec,
    plan: StagePlan,
    rates: Sequence[float],
    slo: SLO,
    *,
    refine: int = 0,
    make_target: Callable[[], Target] | None = None,
    progress: Callable[[StageResult], None] | None = None,
) -> tuple[list[StageResult], float | None, float | None]:
    """Step the offered rate up until a stage misses the SLO, then bisect ``refine`` times
    between the last passing and the first failing rate. Returns (stages, highest passing
    rate, lowest failing rate)."""
    stages: list[StageResult] = []
    best: float | None = None
    worst: float | None = None

    def stage(rate: float) -> bool:
        result = run_stage(
            spec, msgspec.structs.replace(plan, rate=rate), slo=slo, make_target=make_target
        )
        stages.append(result)
        if progress is not None:
            progress(result)
        return result.verdict is not None and result.verdict.passed

    for rate in rates:
        if stage(rate):
            best = rate
        else:
            worst = rate
            break
    lo = best if best is not None else 0.0
    for _ in range(refine if worst is not None else 0):
        mid = round((lo + worst) / 2, 1) if worst is not None else lo
        if worst is None or mid <= lo or mid >= worst:
            break
        if stage(mid):
            best = lo = mid
        else:
            worst = mid
    return stages, best, worst


def machine_description() -> str:
    import platform

    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}"
