"""PredictionLogger: batches off the response path, retries, flushes on close, bounded memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from carrara.gateway.engine import PredictionBatch
from carrara.gateway.prediction_log import PredictionLogger
from carrara.types import decode_prediction


class FlakyLog:
    def __init__(self, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.payloads: list[bytes] = []
        self.calls = 0
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def append_many(self, topic: str, payloads: Sequence[bytes]) -> list[str]:
        assert topic == "predictions"
        time.sleep(self.delay_s)
        with self.lock:
            self.calls += 1
            if self.calls <= self.fail_first:
                raise ConnectionError("log unavailable")
            self.payloads.extend(payloads)
            return [str(len(self.payloads) - len(payloads) + i) for i in range(len(payloads))]


def batch(request: str, n: int) -> PredictionBatch:
    return PredictionBatch(
        model="m",
        request_id=request,
        variant="v1",
        version=3,
        column_names=["a", "b"],
        entity_ids=[f"e{i}" for i in range(n)],
        rows=np.arange(n),
        features=np.arange(2 * n, dtype=np.float32).reshape(n, 2),
        missing=np.zeros((n, 2), bool),
        outputs=np.ones((n, 1), np.float32),
        degraded=[False] * n,
        latency_us=10,
        timestamp_ms=1,
    )


def test_everything_submitted_is_written_once_on_close() -> None:
    log = FlakyLog()
    logger = PredictionLogger(log, max_records_per_append=7)
    for r in range(20):
        logger.submit(batch(f"r{r}", 5))
    logger.close()
    records = [decode_prediction(p) for p in log.payloads]
    assert sorted(rec.request_id for rec in records) == sorted(
        f"r{r}:{i}" for r in range(20) for i in range(5)
    )
    assert logger.written == 100 and logger.dropped == 0
    assert records[0].features == {"a": 0.0, "b": 1.0} and records[0].version == 3


def test_failed_appends_are_retried() -> None:
    log = FlakyLog(fail_first=2)
    logger = PredictionLogger(log, retry_after_s=0.01)
    logger.submit(batch("r", 3))
    logger.close()
    assert len(log.payloads) == 3
    assert logger.failures == 2


def test_submit_never_blocks_and_memory_is_bounded() -> None:
    log = FlakyLog(delay_s=0.2)
    logger = PredictionLogger(log, max_pending=5)
    start = time.perf_counter()
    for r in range(50):
        logger.submit(batch(f"r{r}", 1))
    assert time.perf_counter() - start < 0.1
    logger.close()
    assert logger.dropped > 0
    assert logger.written + logger.dropped == 50


def test_embedded_logs_to_the_real_event_log_and_flushes_on_close(tmp_path: Path) -> None:
    """Embedded -> PredictionLogger -> local durable event log; a consumer group reads every
    prediction back after close() (the flush on graceful shutdown)."""
    from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, RoutingPolicy, Variant
    from carrara.eventlog import open_event_log
    from carrara.feature_cache.online_store import EmbeddedOnlineStore
    from carrara.gateway import Embedded, ModelDeployment, VariantSpec
    from carrara.gateway.backends import OnnxBackend
    from carrara.gateway.onnx_models import write_linear_model

    url = f"local:///{tmp_path / 'events.db'}"
    log = open_event_log(url)
    spec = AssemblerSpec(
        groups=(GroupSchema("g", 1, ("x",)),), features=(FeatureRef("g", "x", 3.0),)
    )
    emb = Embedded(EmbeddedOnlineStore(), event_log=log)
    emb.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(VariantSpec(name="v1", version=4, features=spec),),
        ),
        {"v1": OnnxBackend(write_linear_model(tmp_path / "m.onnx", [2.0], 1.0))},
    )
    for i in range(30):
        emb.predict("m", [f"e{i}", f"f{i}"], request_id=f"q{i}")
    emb.close()
    log.close()
    reader = open_event_log(url)
    records = [
        decode_prediction(e.payload)
        for e in reader.read("predictions", "monitor", "c1", count=1_000)
    ]
    reader.close()
    assert len(records) == 60
    assert {r.request_id for r in records} == {f"q{i}:{j}" for i in range(30) for j in range(2)}
    assert all(r.prediction == [7.0] and r.version == 4 and r.missing == ["x"] for r in records)
