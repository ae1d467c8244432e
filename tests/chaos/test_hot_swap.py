"""Hot swap under load: ``ServingEngine.deploy`` of a new model version, again and again, while
gRPC clients keep predicting. No request fails, and every answer is the exact value of a version
that was live while the request ran (the old or the new one around a swap)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
)
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.gateway.grpc_client import predict_stub
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.server import GatewayServer
from carrara.v1 import predict_pb2
from tests.chaos.load import ClosedLoop, codes
from tests.chaos.record import FULL, CaseRecord, p99_ms, rss_mb
from tests.servers import DictStore, running_gateway

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.timeout(900 if FULL else 120),
]

SPEC = AssemblerSpec(
    groups=(GroupSchema("u", 1, ("x", "y")),),
    features=(FeatureRef("u", "x", -5.0), FeatureRef("u", "y", 0.0)),
)
ENTITIES = 200
SWAPS = 60 if FULL else 12
SWAP_EVERY_S = 0.2 if FULL else 0.15
WORKERS = 16 if FULL else 8


def weights(version: int) -> tuple[np.ndarray, float]:
    """Version k: y = k x + (k % 5 - 2) y + k / 4 — every version answers differently."""
    return np.array([[float(version)], [float(version % 5 - 2)]], np.float32), version / 4


def expected(version: int, i: int) -> float:
    w, b = weights(version)
    x = np.array([[float(i), float(i % 3)]], np.float32)
    return float((x @ w + np.float32(b))[0, 0])


def deploy(engine: ServingEngine, directory: Path, version: int) -> None:
    w, b = weights(version)
    path = write_linear_model(directory / f"m{version}.onnx", w, b)
    name = f"v{version}"
    engine.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(variants=(Variant(name, 10_000),)),
            variants=(VariantSpec(name=name, version=version, features=SPEC),),
        ),
        {name: OnnxBackend(path)},
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServingEngine, GatewayServer]]:
    store = DictStore("u", 1, {f"e{i}": (float(i), float(i % 3)) for i in range(ENTITIES)})
    engine = ServingEngine(
        store, cache=FeatureCache(capacity=1_000, ttl_seconds=60.0), max_in_flight=256
    )
    deploy(engine, tmp_path, 1)
    with running_gateway(engine) as server:
        yield engine, server


def test_deploy_under_load(
    served: tuple[ServingEngine, GatewayServer],
    tmp_path: Path,
    chaos_record: Callable[..., CaseRecord],
) -> None:
    rec = chaos_record(
        "hot_swap_deploy",
        title="Hot swap (ServingEngine.deploy) under load",
        asserted=(
            f"An in-process gateway (native gRPC front) under {WORKERS} closed-loop gRPC "
            f"Predict clients; {SWAPS} deploys of a new model version (a fresh ONNX file each, "
            "every version computing a different function) through `ServingEngine.deploy`, "
            f"one every {SWAP_EVERY_S:g} s. Asserted: 0 failed requests, 0 degraded; every "
            "answer names a version that was live at some point while the request ran (from "
            "its deploy call's start to the next deploy's return) and carries exactly that "
            "version's output for the entity; the last version answers after the swaps."
        ),
    )
    engine, server = served
    rec.rss_before_mb = rss_mb()
    # (version, deploy call started, deploy call returned); version 1 was live before the load.
    timeline: list[tuple[int, float, float]] = [(1, float("-inf"), float("-inf"))]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = predict_stub(channel)

        def one(seq: int) -> tuple[int, int, float, bool]:
            i = seq % ENTITIES
            r = call(predict_pb2.PredictRequest(model="m", entity_ids=[f"e{i}"]), timeout=10)
            p = r.predictions[0]
            return i, p.model_version, p.values[0], p.degraded

        load = ClosedLoop(one, workers=WORKERS).start()
        swap_error: list[BaseException] = []
        try:
            time.sleep(0.5)
            for version in range(2, SWAPS + 2):
                started = time.monotonic()
                try:
                    deploy(engine, tmp_path, version)
                except BaseException as exc:  # recorded; the load is stopped first
                    swap_error.append(exc)
                    break
                timeline.append((version, started, time.monotonic()))
                time.sleep(SWAP_EVERY_S)
        finally:
            outcomes = load.stop()
        last = timeline[-1][0]
        final = call(predict_pb2.PredictRequest(model="m", entity_ids=["e7"]), timeout=10)
    rec.rss_after_mb = rss_mb()
    assert not swap_error, swap_error

    live_from = {v: start for v, start, _ in timeline}
    live_until = {v: timeline[k + 1][2] for k, (v, _, _) in enumerate(timeline[:-1])}
    live_until[last] = float("inf")
    answers = [o for o in outcomes if o.code == "OK"]
    wrong_value = []
    not_live = []
    for o in answers:
        i, version, v, _ = o.answer
        if version not in live_from or v != pytest.approx(expected(version, i)):
            wrong_value.append(o.answer)
        elif not (live_from[version] <= o.end and o.start <= live_until[version]):
            not_live.append((o.answer, o.start, o.end))
    versions = Counter(o.answer[1] for o in answers)
    deploy_s = [end - start for _, start, end in timeline[1:]]
    rec.sent = len(outcomes)
    rec.answered = len(answers)
    rec.failed = rec.sent - rec.answered
    rec.degraded = sum(1 for o in answers if o.answer[3])
    rec.p99_ms = p99_ms([o.end - o.start for o in outcomes])
    rec.extra.update(
        codes=codes(outcomes),
        swaps=len(timeline) - 1,
        versions_answering=len(versions),
        wrong_values=len(wrong_value),
        answers_from_a_version_not_live=len(not_live),
        deploy_p99_ms=p99_ms(deploy_s),
        workers=WORKERS,
    )
    rec.note(
        f"{len(timeline) - 1} deploys under load; {len(versions)} versions answered; deploy "
        f"call p99 {rec.extra['deploy_p99_ms']} ms. The gateway runs in the test process, so "
        "its RSS includes pytest's."
    )
    assert rec.failed == 0, rec.extra["codes"]
    assert rec.degraded == 0
    assert wrong_value == [], wrong_value[:5]
    assert not_live == [], not_live[:5]
    assert final.predictions[0].model_version == last
    assert final.predictions[0].values[0] == pytest.approx(expected(last, 7))
    assert len(versions) > 1  # swaps happened while requests were answered
