"""The registry's PostgreSQL under faults, with a gateway following the registry: sessions
killed (``pg_terminate_backend``) and the server stopped and restarted (a private cluster the
test starts), then hot swaps through registry deploys under load.

Serving must not notice any of it (0 failed predictions: the gateway never reads the database);
the control plane answers ``UnavailableError`` (503) while the database is away — quickly,
never a hang — and recovers by itself once it is back.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, encode_feature_vector, serving_spec
from carrara.errors import UnavailableError
from carrara.eventlog import open_event_log
from carrara.gateway.engine import ServingEngine
from carrara.gateway.grpc_client import predict_stub
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.registry_source import DeploymentFollower
from carrara.gateway.server import GatewayServer, ServerThread
from carrara.gateway.service import Gateway
from carrara.registry.artifacts import ArtifactStore
from carrara.registry.auth import Principal
from carrara.registry.registry import ModelRegistry
from carrara.v1 import predict_pb2
from tests.chaos.load import ClosedLoop, Outcome, codes
from tests.chaos.record import FULL, CaseRecord, p99_ms, rss_mb
from tests.servers import free_port

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SPEC = AssemblerSpec(groups=(GroupSchema("u", 1, ("x",)),), features=(FeatureRef("u", "x"),))
ACTOR = Principal("ci", frozenset({"publisher", "deployer"}))
ENTITIES = 100
WORKERS = 8 if FULL else 4


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb, trust auth, fsync off) this test may stop."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.fail("PostgreSQL server binaries are missing (make test installs postgresql)")
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="carrara-chaos-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D", str(self.data))

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w",
                  "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def terminate_sessions(self) -> int:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class DictStore:
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [
            encode_feature_vector(k.rsplit(":", 1)[-1], "u", 1, [float(k.rsplit("e", 1)[-1])])
            for k in keys
        ]


def expected(version: int, i: int) -> float:
    return float(np.float32(i) * np.float32(version))


@dataclass
class ControlLoad:
    """A control-plane client: reads the active deployment every 20 ms; every call's outcome
    and latency is kept (OK / UNAVAILABLE / any other exception's name)."""

    registry: ModelRegistry
    calls: list[tuple[float, float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ControlLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.registry.active_deployment("m")
                outcome = "OK"
            except UnavailableError:
                outcome = "UNAVAILABLE"
            except Exception as exc:
                outcome = type(exc).__name__
            self.calls.append((start, time.monotonic(), outcome))
            self._stop.wait(0.02)

    def stop(self) -> list[tuple[float, float, str]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        assert not self._thread.is_alive(), "a control-plane call hung"
        return self.calls

    def first_ok_after(self, t: float, timeout_s: float = 30.0) -> float:
        """When the first call started at or after ``t`` answered OK (waits for one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = next((e for s, e, o in list(self.calls) if o == "OK" and s >= t), None)
            if found is not None:
                return found
            assert time.monotonic() < deadline, "the control plane did not answer OK again"
            time.sleep(0.02)


@dataclass
class Stack:
    pg: PrivatePostgres
    registry: ModelRegistry
    follower: DeploymentFollower
    server: GatewayServer
    artifacts: Path
    versions: dict[int, int] = field(default_factory=dict)  # weight -> registry version

    def register(self, weight: int) -> int:
        path = write_linear_model(self.artifacts.parent / f"w{weight}.onnx", [float(weight)])
        v = self.registry.register(
            "m",
            actor=ACTOR,
            serving_artifact=path.read_bytes(),
            framework="onnx",
            serving_spec=serving_spec(SPEC),
        ).version
        self.versions[v] = weight
        return v

    def wait_serving(self, version: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.follower.status().models.get("m")
            if s is not None and s.versions == [version]:
                return
            assert time.monotonic() < deadline, f"version {version} not served: {s}"
            time.sleep(0.02)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    pg = PrivatePostgres()
    pg.start()
    events = open_event_log(f"local:///{tmp_path / 'events.db'}")
    registry = ModelRegistry.open(pg.url, tmp_path / "artifacts", events=events)
    engine = ServingEngine(DictStore())
    follower = DeploymentFollower(
        engine,
        open_event_log(f"local:///{tmp_path / 'events.db'}"),
        ArtifactStore(tmp_path / "artifacts"),
        state_dir=tmp_path / "state",
        poll_ms=50,
    )
    gateway = Gateway(engine, follower=follower)
    thread = ServerThread(lambda: GatewayServer(gateway))
    server = thread.start()
    s = Stack(pg, registry, follower, server, tmp_path / "artifacts")
    follower.start()
    try:
        v = s.register(1)
        registry.deploy("m", v, actor=ACTOR)
        s.wait_serving(v)
        yield s
    finally:
        thread.stop()
        follower.stop()
        gateway.close()
        registry.close()
        events.close()
        pg.close()


def _serving_load(stack: Stack, channel: grpc.Channel) -> ClosedLoop:
    call = predict_stub(channel)

    def one(seq: int) -> tuple[int, int, float, bool]:
        i = seq % ENTITIES
        r = call(predict_pb2.PredictRequest(model="m", entity_ids=[f"e{i}"]), timeout=10)
        p = r.predictions[0]
        return i, p.model_version, p.values[0], p.degraded

    return ClosedLoop(one, workers=WORKERS)


def _check_answers(stack: Stack, rec: CaseRecord, outcomes: list[Outcome]) -> None:
    answers = [o for o in outcomes if o.code == "OK"]
    wrong = [
        o.answer
        for o in answers
        if o.answer[1] not in stack.versions
        or o.answer[2] != pytest.approx(expected(stack.versions[o.answer[1]], o.answer[0]))
    ]
    rec.sent = len(outcomes)
    rec.answered = len(answers)
    rec.failed = rec.sent - rec.answered
    rec.degraded = sum(1 for o in answers if o.answer[3])
    rec.p99_ms = p99_ms([o.end - o.start for o in outcomes])
    rec.extra["codes"] = codes(outcomes)
    rec.extra["wrong_values"] = len(wrong)
    assert rec.failed == 0, rec.extra["codes"]
    assert rec.degraded == 0
    assert wrong == [], wrong[:5]


def _control_figures(rec: CaseRecord, calls: list[tuple[float, float, str]]) -> None:
    outcomes: dict[str, int] = {}
    for _, _, o in calls:
        outcomes[o] = outcomes.get(o, 0) + 1
    rec.extra["control_plane_calls"] = outcomes
    rec.extra["control_plane_max_ms"] = round(max(e - s for s, e, _ in calls) * 1e3, 1)
    # Only the retryable 503 while the database is away; never another error, never a hang.
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes


def test_postgres_sessions_killed(stack: Stack, chaos_record: Callable[..., CaseRecord]) -> None:
    kills = 10 if FULL else 3
    rec = chaos_record(
        "postgres_session_kill",
        title="PostgreSQL sessions killed (pg_terminate_backend)",
        asserted=(
            f"A gateway following the registry serves {WORKERS} closed-loop gRPC clients while "
            f"every client session of the registry's PostgreSQL (a private cluster) is "
            f"terminated {kills} times, 0.5 s apart, with a control-plane client reading the "
            "active deployment every 20 ms. Asserted: 0 failed and 0 degraded predictions, "
            "every answer the exact value of its version; control-plane calls answer OK or "
            "UNAVAILABLE (503) only, none hangs; a deploy right after the last kill succeeds "
            "and the gateway serves it (recovery time: last kill to the new version served)."
        ),
    )
    rec.rss_before_mb = rss_mb()
    v2 = stack.register(2)
    killed = 0
    with grpc.insecure_channel(f"127.0.0.1:{stack.server.grpc_port}") as channel:
        load = _serving_load(stack, channel).start()
        control = ControlLoad(stack.registry).start()
        try:
            time.sleep(0.5)
            for _ in range(kills):
                killed += stack.pg.terminate_sessions()
                time.sleep(0.5)
            last_kill = time.monotonic()
            stack.registry.deploy("m", v2, actor=ACTOR)
            stack.wait_serving(v2)
            rec.recovery_s = round(time.monotonic() - last_kill, 3)
            control.first_ok_after(last_kill)
        finally:
            outcomes = load.stop()
            calls = control.stop()
    rec.rss_after_mb = rss_mb()
    rec.extra["sessions_terminated"] = killed
    # The registry's pooled sessions really were killed (a round may find none to kill when
    # the pool has not reconnected since the previous one).
    assert killed >= 1
    _check_answers(stack, rec, outcomes)
    _control_figures(rec, calls)
    assert stack.follower.alive and stack.follower.status().connected


def test_postgres_restart(stack: Stack, chaos_record: Callable[..., CaseRecord]) -> None:
    down_s = 5.0 if FULL else 2.0
    rec = chaos_record(
        "postgres_restart",
        title="PostgreSQL server stopped and restarted",
        asserted=(
            f"The registry's PostgreSQL (a private cluster) is stopped for {down_s:g} s and "
            f"started again while a registry-following gateway serves {WORKERS} closed-loop "
            "gRPC clients and a control-plane client reads every 20 ms. Asserted: 0 failed and "
            "0 degraded predictions; control-plane calls answer OK or UNAVAILABLE (503), none "
            "hangs (max call time recorded); after the restart the control plane answers again "
            "(recovery time: server up to the first OK read) and a deploy reaches the gateway."
        ),
    )
    rec.rss_before_mb = rss_mb()
    v2 = stack.register(3)
    with grpc.insecure_channel(f"127.0.0.1:{stack.server.grpc_port}") as channel:
        load = _serving_load(stack, channel).start()
        control = ControlLoad(stack.registry).start()
        try:
            time.sleep(0.5)
            stack.pg.stop()
            time.sleep(down_s)
            stack.pg.start()
            up = time.monotonic()
            first_ok = control.first_ok_after(up)
            rec.recovery_s = round(max(0.0, first_ok - up), 3)
            stack.registry.deploy("m", v2, actor=ACTOR)
            stack.wait_serving(v2)
            time.sleep(0.3)
        finally:
            outcomes = load.stop()
            calls = control.stop()
    rec.rss_after_mb = rss_mb()
    _check_answers(stack, rec, outcomes)
    _control_figures(rec, calls)
    unavailable = rec.extra["control_plane_calls"].get("UNAVAILABLE", 0)
    # A call waits for a connection at most the pool's 5 s, then answers 503.
    assert rec.extra["control_plane_max_ms"] < 7_000
    rec.note(
        f"While the database was down, control-plane calls waited for it up to the pool's 5 s "
        f"bound (slowest {rec.extra['control_plane_max_ms']} ms), then answered 503 "
        f"({unavailable} did); serving did not notice."
    )


def test_hot_swap_through_registry_deploys(
    stack: Stack, chaos_record: Callable[..., CaseRecord]
) -> None:
    swaps = 30 if FULL else 8
    rec = chaos_record(
        "registry_hot_swap",
        title="Hot swap through registry deploys under load",
        asserted=(
            f"{swaps} registry deploys (PostgreSQL registry, `deployments` events, the "
            f"gateway's follower loads each and swaps) while {WORKERS} closed-loop gRPC "
            "clients predict. Asserted: 0 failed and 0 degraded requests; every answer is the "
            "exact output of a registered version; the gateway ends on the last deployed "
            "version. Recovery time: the slowest deploy call to version served."
        ),
    )
    rec.rss_before_mb = rss_mb()
    versions = [stack.register(w) for w in range(4, 4 + swaps)]
    lags: list[float] = []
    with grpc.insecure_channel(f"127.0.0.1:{stack.server.grpc_port}") as channel:
        load = _serving_load(stack, channel).start()
        try:
            time.sleep(0.3)
            for v in versions:
                started = time.monotonic()
                stack.registry.deploy("m", v, actor=ACTOR)
                stack.wait_serving(v)
                lags.append(time.monotonic() - started)
                time.sleep(0.1)
        finally:
            outcomes = load.stop()
    rec.rss_after_mb = rss_mb()
    _check_answers(stack, rec, outcomes)
    served = {o.answer[1] for o in outcomes if o.code == "OK"}
    rec.extra["versions_answering"] = len(served)
    rec.extra["deploy_to_served_p50_ms"] = round(sorted(lags)[len(lags) // 2] * 1e3, 1)
    rec.recovery_s = round(max(lags), 3)
    assert len(served) > 1
    assert stack.follower.status().models["m"].versions == [versions[-1]]
