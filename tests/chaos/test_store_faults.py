"""Online-store faults mid-load: the gateway (``carrara serve``, reading a private Redis
natively) keeps answering every request while Redis is SIGKILLed and restarted on the same
port, or hung with SIGSTOP; answers are correct or degraded to the defaults, never failed."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from carrara.gateway.grpc_client import predict_stub
from carrara.v1 import predict_pb2
from tests.chaos.load import ClosedLoop, Outcome, codes
from tests.chaos.models import DEFAULT_VALUE, MODEL, NAMESPACE, gateway_config, seed_redis, value
from tests.chaos.procs import GatewayProcess, PrivateRedis, grpc_healthy
from tests.chaos.record import FULL, CaseRecord, p99_ms

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.timeout(900 if FULL else 120),
]

LOAD_ENTITIES = 2_000  # the load draws from e0..e1999
PROBE_START = LOAD_ENTITIES  # recovery probes: e2000.., each asked once (never cached)
SEEDED = LOAD_ENTITIES + 2_000
BASELINE_S, FAULT_S, AFTER_S = (4.0, 8.0, 4.0) if FULL else (1.0, 2.0, 1.0)
CYCLES = 3 if FULL else 1
WORKERS = 16 if FULL else 8
RECOVERY_BOUND_S = 15.0


@pytest.fixture
def redis_store(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path / "redis", persistent=True)
    r.dir.mkdir()
    r.start()
    seed_redis(r.port, SEEDED)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def gateway(tmp_path: Path, redis_store: PrivateRedis) -> Iterator[GatewayProcess]:
    config = gateway_config(
        tmp_path,
        online_store_url=f"{redis_store.url}?namespace={NAMESPACE}",
        cache_capacity=64,  # most requests read the store
        cache_ttl_seconds=0.5,
        store_deadline_s=0.1,
        max_in_flight=256,
    )
    g = GatewayProcess(tmp_path, config=config).start()
    try:
        yield g
    finally:
        g.close()


class Probe:
    """Asks for entities never asked before (a store read each) until one is answered from the
    store again; every probe is counted like a load request."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
        self.ids = itertools.count(PROBE_START)
        self.outcomes: list[Outcome] = []

    def recovery_s(self, since: float, limit_s: float = 30.0) -> float | None:
        while time.monotonic() - since < limit_s:
            i = next(self.ids)
            assert i < SEEDED, "ran out of probe entities"
            start = time.monotonic()
            try:
                r = self.call(
                    predict_pb2.PredictRequest(model=MODEL, entity_ids=[f"e{i}"]), timeout=10
                )
            except grpc.RpcError as exc:
                self.outcomes.append(Outcome(-1, start, time.monotonic(), exc.code().name))
                continue
            p = r.predictions[0]
            self.outcomes.append(
                Outcome(-1, start, time.monotonic(), "OK", (i, p.degraded, p.values[0]))
            )
            if not p.degraded:
                return time.monotonic() - since
            time.sleep(0.02)
        return None


def _run_faults(
    gateway: GatewayProcess,
    rec: CaseRecord,
    inject: Callable[[], None],
    heal: Callable[[], None],
) -> None:
    rec.rss_before_mb = gateway.rss_mb()
    recoveries: list[float | None] = []
    with grpc.insecure_channel(gateway.target) as channel:
        call = predict_stub(channel)

        def one(seq: int) -> tuple[int, bool, float]:
            i = (seq * 7919) % LOAD_ENTITIES
            r = call(predict_pb2.PredictRequest(model=MODEL, entity_ids=[f"e{i}"]), timeout=10)
            return i, r.predictions[0].degraded, r.predictions[0].values[0]

        probe = Probe(call)
        load = ClosedLoop(one, workers=WORKERS).start()
        try:
            time.sleep(BASELINE_S)
            for _ in range(CYCLES):
                inject()
                time.sleep(FAULT_S)
                heal()
                recoveries.append(probe.recovery_s(time.monotonic()))
                time.sleep(AFTER_S)
        finally:
            outcomes = load.stop() + probe.outcomes
        rec.rss_after_mb = gateway.rss_mb()
        healthy = grpc_healthy(gateway.target)
    answers = [o for o in outcomes if o.code == "OK"]
    wrong = [
        o.answer
        for o in answers
        if o.answer[2] != pytest.approx(value(o.answer[0]))
        and not (o.answer[1] and o.answer[2] == pytest.approx(DEFAULT_VALUE))
    ]
    rec.sent = len(outcomes)
    rec.answered = len(answers)
    rec.failed = rec.sent - rec.answered
    rec.degraded = sum(1 for o in answers if o.answer[1])
    rec.p99_ms = p99_ms([o.end - o.start for o in outcomes])
    known = [r for r in recoveries if r is not None]
    rec.recovery_s = round(max(known), 3) if len(known) == len(recoveries) else None
    rec.extra.update(
        codes=codes(outcomes),
        wrong_answers=len(wrong),
        cycles=CYCLES,
        fault_s=FAULT_S,
        recovery_s_each=[None if r is None else round(r, 3) for r in recoveries],
        workers=WORKERS,
        max_latency_ms=round(max(o.end - o.start for o in outcomes) * 1e3, 1),
    )
    rec.note(
        f"{CYCLES} fault(s) of {FAULT_S:g} s under {WORKERS} closed-loop gRPC clients; "
        f"{rec.degraded} of {rec.answered} answers degraded (defaults), none failed."
    )
    assert gateway.alive(), gateway.log()
    assert healthy
    assert rec.failed == 0, rec.extra["codes"]
    assert wrong == [], wrong[:5]
    assert rec.degraded > 0  # the fault was felt (the store was read during it)
    assert all(r is not None and r < RECOVERY_BOUND_S for r in recoveries), recoveries


def test_redis_killed_and_restarted_mid_load(
    gateway: GatewayProcess, redis_store: PrivateRedis, chaos_record: Callable[..., CaseRecord]
) -> None:
    rec = chaos_record(
        "redis_kill",
        title="Redis SIGKILLed mid-load, restarted on the same port",
        asserted=(
            "Closed-loop gRPC Predict load against `carrara serve` reading a private Redis "
            "(small feature cache, so most requests read the store). Redis is SIGKILLed, left "
            "down, then restarted on the same port (append-only file: the data comes back). "
            "Asserted: every request is answered (0 failed), every answer is the model's value "
            "for the entity's stored features or, flagged degraded, its value on the default "
            "features; the gateway reads the store again (a never-cached entity answered "
            f"undegraded) within {RECOVERY_BOUND_S:g} s of the restart (recovery); the gateway "
            "stays SERVING."
        ),
    )
    _run_faults(gateway, rec, inject=redis_store.kill, heal=redis_store.start)


def test_redis_hung_mid_load(
    gateway: GatewayProcess, redis_store: PrivateRedis, chaos_record: Callable[..., CaseRecord]
) -> None:
    rec = chaos_record(
        "redis_hang",
        title="Redis hung (SIGSTOP) mid-load, then resumed (SIGCONT)",
        asserted=(
            "Same load and gateway; Redis is SIGSTOPped (connections open, nothing answered) "
            "and later SIGCONTed. Asserted: 0 failed requests (each store read is cut at the "
            "store deadline and answered degraded), every answer correct or degraded to the "
            "defaults, the store is read again within "
            f"{RECOVERY_BOUND_S:g} s of SIGCONT, the gateway stays SERVING."
        ),
    )
    _run_faults(gateway, rec, inject=redis_store.hang, heal=redis_store.resume)
