"""ServingEngine: predictions equal the ONNX model on the assembled features, splits, fallback,
degraded serving, shedding and hot swaps."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from carrara.core import (
    AssemblerSpec,
    FeatureCache,
    FeatureRef,
    GroupSchema,
    RoutingPolicy,
    Variant,
    encode_feature_vector,
)
from carrara.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from carrara.gateway.backends import BackendInfo, OnnxBackend, file_sha256
from carrara.gateway.engine import ModelDeployment, PredictionBatch, ServingEngine, VariantSpec
from carrara.gateway.onnx_models import write_linear_model

GROUP = GroupSchema("user", 1, ("a", "b", "c"))
SPEC = AssemblerSpec(
    groups=(GROUP,), features=(FeatureRef("user", "a", 0.5), FeatureRef("user", "c", -1.0))
)
W1 = np.array([[1.0], [2.0]], np.float32)
W2 = np.array([[-3.0], [0.25]], np.float32)


class DictStore:
    """An online store in a dict, with a switch to make it fail like a dead Redis."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False
        self.calls = 0

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        if self.down:
            raise ConnectionError("store is down")
        return [self.data.get(k) for k in keys]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[PredictionBatch] = []

    def write(self, batches: Sequence[PredictionBatch]) -> None:
        self.batches.extend(batches)


class SlowBackend:
    """Wraps a backend and can be told to hang or fail; behaves like a remote backend."""

    runs_in_process = False

    def __init__(self, inner: OnnxBackend) -> None:
        self.inner = inner
        self.hang = threading.Event()
        self.fail = False

    @property
    def info(self) -> BackendInfo:
        return self.inner.info

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        if self.fail:
            raise RuntimeError("backend exploded")
        if self.hang.is_set():
            time.sleep(1.0)
        return self.inner.infer(x)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_linear_model(tmp_path / "v1.onnx", W1, 0.1),
        write_linear_model(tmp_path / "v2.onnx", W2, -0.2),
    )


@pytest.fixture
def store() -> DictStore:
    s = DictStore()
    rng = np.random.default_rng(0)
    for i in range(2_000):
        if i % 7 == 0:
            continue  # entity with no row: defaults apply
        s.data[f"user:1:u{i}"] = encode_feature_vector(
            f"u{i}", "user", 1, rng.normal(size=3).astype(np.float32), rng.random(3) < 0.1
        )
    return s


@pytest.fixture
def engine(store: DictStore) -> Iterator[ServingEngine]:
    e = ServingEngine(store, cache=FeatureCache(capacity=50_000), sink=Recorder())
    yield e
    e.close()


def deployment(
    weights: tuple[int, int] = (9_000, 1_000), fallback: str | None = None
) -> ModelDeployment:
    return ModelDeployment(
        model="ranker",
        policy=RoutingPolicy(
            variants=(Variant("v1", weights[0]), Variant("v2", weights[1])),
            salt="exp",
            fallback=fallback,
        ),
        variants=(
            VariantSpec(name="v1", version=1, features=SPEC),
            VariantSpec(name="v2", version=2, features=SPEC),
        ),
    )


def expected(store: DictStore, entity: str, w: NDArray[np.float32], b: float) -> float:
    """Independent reference: decode with the Python protobuf runtime, apply defaults, x @ w + b."""
    from carrara.v1 import feature_vector_pb2 as pb

    x = np.array([0.5, -1.0], np.float32)
    raw = store.data.get(f"user:1:{entity}")
    if raw is not None:
        msg = pb.FeatureVector.FromString(raw)
        missing = np.unpackbits(np.frombuffer(msg.missing, np.uint8), bitorder="little").astype(
            bool
        )
        missing = np.pad(missing, (0, max(0, 3 - len(missing))))
        for col, src in ((0, 0), (1, 2)):
            if not missing[src]:
                x[col] = msg.values[src]
    return float(x @ w[:, 0] + np.float32(b))


def test_predictions_match_the_model_on_reference_features(
    engine: ServingEngine, store: DictStore, models: tuple[Path, Path]
) -> None:
    engine.deploy(deployment(), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])})
    ids = [f"u{i}" for i in range(300)]
    result = engine.predict("ranker", ids)
    assert result.outputs.shape == (300, 1)
    for i, entity in enumerate(ids):
        w, b, version = (W1, 0.1, 1) if result.variants[i] == "v1" else (W2, -0.2, 2)
        assert result.versions[i] == version
        assert result.outputs[i, 0] == pytest.approx(
            expected(store, entity, w, b), rel=1e-5, abs=1e-5
        )
    assert set(result.variants) == {"v1", "v2"}
    # Entities without a row are served from defaults, and say so.
    assert result.degraded == [i % 7 == 0 for i in range(300)]
    # Second call: all features from the cache, absent entities included (negative entries):
    # no store read at all.
    calls = store.calls
    again = engine.predict("ranker", ids)
    np.testing.assert_array_equal(again.outputs, result.outputs)
    assert again.degraded == result.degraded
    assert store.calls == calls


def test_split_is_sticky_and_weighted(engine: ServingEngine, models: tuple[Path, Path]) -> None:
    engine.deploy(deployment(), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])})
    ids = [f"u{i}" for i in range(1_000)]
    first = engine.predict("ranker", ids).variants
    assert engine.predict("ranker", ids[::-1]).variants == first[::-1]
    share = first.count("v2") / len(first)
    assert 0.07 < share < 0.13


def test_overrides(engine: ServingEngine, models: tuple[Path, Path]) -> None:
    engine.deploy(
        deployment((10_000, 0)), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])}
    )
    r = engine.predict("ranker", ["u1", "u2"], overrides={"a": 1.0, "c": [2.0, 3.0]})
    np.testing.assert_allclose(r.outputs[:, 0], [1 + 4 + 0.1, 1 + 6 + 0.1], rtol=1e-6)


def test_store_down_serves_cache_and_defaults_flagged_degraded(
    engine: ServingEngine, store: DictStore, models: tuple[Path, Path]
) -> None:
    engine.deploy(
        deployment((10_000, 0)), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])}
    )
    warm = engine.predict("ranker", ["u1"])
    store.down = True
    cached = engine.predict("ranker", ["u1"])  # cache hit: no store call, not degraded
    assert cached.outputs[0, 0] == warm.outputs[0, 0] and not cached.degraded[0]
    cold = engine.predict("ranker", ["u2"])
    assert cold.degraded == [True]
    assert cold.outputs[0, 0] == pytest.approx(0.5 * 1 + -1.0 * 2 + 0.1, rel=1e-6)  # defaults
    store.down = False
    recovered = engine.predict("ranker", ["u3"])
    assert recovered.degraded == [False]
    assert engine.store_errors == 1


def test_failing_backend_opens_breaker_and_fallback_answers(
    engine: ServingEngine, models: tuple[Path, Path]
) -> None:
    primary = SlowBackend(OnnxBackend(models[1]))
    dep = ModelDeployment(
        model="ranker",
        policy=RoutingPolicy(variants=(Variant("v2", 10_000), Variant("v1", 0)), fallback="v1"),
        variants=(
            VariantSpec(name="v1", version=1, features=SPEC),
            VariantSpec(name="v2", version=2, features=SPEC, timeout_s=0.2, failure_threshold=2),
        ),
    )
    engine.deploy(dep, {"v1": OnnxBackend(models[0]), "v2": primary})
    assert engine.predict("ranker", ["u1"]).variants == ["v2"]
    primary.hang.set()
    start = time.perf_counter()
    r = engine.predict("ranker", ["u1"])
    assert time.perf_counter() - start < 0.9  # answered after the 0.2 s timeout, not the 1 s hang
    assert (r.variants, r.versions, r.degraded) == (["v1"], [1], [True])
    engine.predict("ranker", ["u2"])  # second timeout: breaker opens
    start = time.perf_counter()
    r = engine.predict("ranker", ["u3"])
    assert time.perf_counter() - start < 0.1  # open breaker: straight to the fallback
    assert r.variants == ["v1"]


def _variant_counts(engine: ServingEngine) -> dict[str, tuple[int, int, int]]:
    """variant -> (entities, errors, degraded) from the engine's metrics."""
    return {
        row[1]: (int(row[4]), int(row[7]), int(row[8]))
        for row in engine.native.metrics()["variants"]
        if row[0] == "ranker"
    }


def test_errors_and_degraded_are_counted_per_variant(
    engine: ServingEngine, models: tuple[Path, Path]
) -> None:
    """Each variant counts the entities it answered degraded and the times it failed to answer
    (a fallback answering for it or not); caller errors are not a variant's."""
    canary = SlowBackend(OnnxBackend(models[1]))
    dep = ModelDeployment(
        model="ranker",
        policy=RoutingPolicy(
            variants=(Variant("v1", 5_000), Variant("v2", 5_000)), salt="exp", fallback="v1"
        ),
        variants=(
            VariantSpec(name="v1", version=1, features=SPEC),
            VariantSpec(name="v2", version=2, features=SPEC, failure_threshold=1_000),
        ),
    )
    engine.deploy(dep, {"v1": OnnxBackend(models[0]), "v2": canary})
    ids = [f"u{i}" for i in range(300)]
    r = engine.predict("ranker", ids)
    expected_degraded = {
        v: sum(1 for i, u in enumerate(r.variants) if u == v and i % 7 == 0) for v in ("v1", "v2")
    }
    assert all(expected_degraded.values())  # both variants drew entities without a row
    counts = _variant_counts(engine)
    assert counts == {v: (r.variants.count(v), 0, expected_degraded[v]) for v in ("v1", "v2")}, (
        counts
    )
    with pytest.raises(InvalidArgumentError):
        engine.predict("ranker", ids, overrides={"zz": 1.0})  # the caller's fault
    assert _variant_counts(engine) == counts

    canary.fail = True  # the canary's backend fails; the fallback answers its entities
    again = engine.predict("ranker", ids)
    assert set(again.variants) == {"v1"}
    moved = r.variants.count("v2")
    after = _variant_counts(engine)
    assert after["v2"] == (moved, 1, expected_degraded["v2"])  # one failure, nothing answered
    assert after["v1"] == (300 + r.variants.count("v1"), 0, expected_degraded["v1"] * 2 + moved)


def test_bad_requests(engine: ServingEngine, models: tuple[Path, Path]) -> None:
    engine.deploy(deployment(), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])})
    with pytest.raises(NotFoundError, match="'nope' is not deployed; deployed: ranker"):
        engine.predict("nope", ["u1"])
    with pytest.raises(InvalidArgumentError, match="empty"):
        engine.predict("ranker", [])
    with pytest.raises(InvalidArgumentError, match="over the limit of 1000"):
        engine.predict("ranker", ["u"] * 1_001)
    # A huge id would spend the store deadline other requests share.
    with pytest.raises(InvalidArgumentError, match="2000 bytes is over the limit of 1024"):
        engine.predict("ranker", ["u1", "x" * 2_000])
    assert engine.predict("ranker", ["y" * 1_024]).outputs.shape[0] == 1
    with pytest.raises(InvalidArgumentError, match="unknown feature 'zz'"):
        engine.predict("ranker", ["u1"], overrides={"zz": 1.0})
    with pytest.raises(InvalidArgumentError, match="2 values; expected 1 or"):
        engine.predict("ranker", ["u1", "u2", "u3"], overrides={"a": [1.0, 2.0]})


def test_shedding_beyond_in_flight_limit(store: DictStore, models: tuple[Path, Path]) -> None:
    slow = SlowBackend(OnnxBackend(models[0]))
    slow.hang.set()
    engine = ServingEngine(store, max_in_flight=2)
    dep = ModelDeployment(
        model="m",
        policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
        variants=(VariantSpec(name="v1", version=1, features=SPEC, timeout_s=5.0),),
    )
    engine.deploy(dep, {"v1": slow})
    threads = [threading.Thread(target=engine.predict, args=("m", ["u1"])) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    start = time.perf_counter()
    with pytest.raises(ResourceExhaustedError, match="in-flight limit"):
        engine.predict("m", ["u1"])
    assert time.perf_counter() - start < 0.05
    for t in threads:
        t.join()
    assert engine.shed == 1
    engine.close()


def test_hot_swap_under_load_fails_no_request(
    engine: ServingEngine, models: tuple[Path, Path]
) -> None:
    backends = {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])}
    engine.deploy(deployment((10_000, 0)), backends)
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                seen.update(engine.predict("ranker", [f"u{i % 500}"]).variants)
            except BaseException as exc:
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for weights in [(5_000, 5_000), (0, 10_000), (10_000, 0), (9_000, 1_000)]:
        time.sleep(0.05)
        engine.deploy(deployment(weights), backends)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {"v1", "v2"}


def test_prediction_log_batches(engine: ServingEngine, models: tuple[Path, Path]) -> None:
    engine.deploy(deployment(), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])})
    r = engine.predict("ranker", [f"u{i}" for i in range(50)], request_id="req-1")
    assert engine.flush_log()
    sink = engine.sink
    assert isinstance(sink, Recorder)
    records = [rec for b in sink.batches for rec in b.records()]
    assert len(records) == 50
    by_row = {rec.request_id: rec for rec in records}
    for i in range(50):
        rec = by_row[f"req-1:{i}"]
        assert rec.entity_id == f"u{i}" and rec.variant == r.variants[i]
        assert rec.prediction == pytest.approx(r.outputs[i].tolist())
        assert set(rec.features) == {"a", "c"}
    assert any(rec.missing for rec in records)  # u0, u7, ... have no row


def test_artifact_checks(tmp_path: Path, models: tuple[Path, Path]) -> None:
    digest = file_sha256(models[0])
    assert OnnxBackend(models[0], sha256=digest).info.input_dim == 2
    tampered = tmp_path / "t.onnx"
    tampered.write_bytes(models[0].read_bytes() + b"\x00")
    with pytest.raises(FailedPreconditionError, match="modified after registration"):
        OnnxBackend(tampered, sha256=digest)
    with pytest.raises(NotFoundError):
        OnnxBackend(tmp_path / "missing.onnx")
    with pytest.raises(InvalidArgumentError, match="unknown execution provider"):
        OnnxBackend(models[0], providers=("tpu",))
    wrong_dim = write_linear_model(tmp_path / "w.onnx", np.ones((5, 1), np.float32))
    e = ServingEngine(DictStore())
    with pytest.raises(
        InvalidArgumentError, match="model input has 5 columns but its feature spec selects 2"
    ):
        e.deploy(
            ModelDeployment(
                model="m",
                policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
                variants=(VariantSpec(name="v1", version=1, features=SPEC),),
            ),
            {"v1": OnnxBackend(wrong_dim)},
        )
    e.close()


def test_shadow_runs_off_the_response_path_and_is_only_logged(
    store: DictStore, models: tuple[Path, Path]
) -> None:
    sink = Recorder()
    engine = ServingEngine(store, sink=sink)
    engine.deploy(
        ModelDeployment(
            model="ranker",
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),), shadows=("v2",)),
            variants=(
                VariantSpec(name="v1", version=1, features=SPEC),
                VariantSpec(name="v2", version=2, features=SPEC),
            ),
        ),
        {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])},
    )
    ids = [f"u{i}" for i in range(20)]
    result = engine.predict("ranker", ids, request_id="r")
    assert set(result.variants) == {"v1"}  # the shadow never answers
    engine.close()  # waits for the shadow pool
    shadow = [rec for b in sink.batches if b.shadow for rec in b.records()]
    served = [rec for b in sink.batches if not b.shadow for rec in b.records()]
    assert len(shadow) == 20 and len(served) == 20
    assert {rec.variant for rec in shadow} == {"v2"} and all(rec.shadow for rec in shadow)
    by_id = {rec.request_id: rec for rec in shadow}
    for i, entity in enumerate(ids):
        rec = by_id[f"r:{i}"]
        assert rec.entity_id == entity
        assert rec.prediction[0] == pytest.approx(
            expected(store, entity, W2, -0.2), rel=1e-5, abs=1e-5
        )


def test_deploy_warms_up_and_refuses_a_broken_model(
    engine: ServingEngine, models: tuple[Path, Path]
) -> None:
    broken = SlowBackend(OnnxBackend(models[0]))
    broken.fail = True
    with pytest.raises(RuntimeError, match="exploded"):
        engine.deploy(deployment((10_000, 0)), {"v1": broken, "v2": OnnxBackend(models[1])})
    assert engine.models() == []  # nothing was switched in


def test_prediction_log_is_bounded_in_bytes(store: DictStore, models: tuple[Path, Path]) -> None:
    """Past the byte bound, records are dropped and counted, never queued without limit; what
    was queued is delivered."""
    release = threading.Event()

    class StuckSink:
        def __init__(self) -> None:
            self.records = 0

        def write(self, batches: Sequence[PredictionBatch]) -> None:
            release.wait(10)  # the event log is down: the drain thread waits here
            self.records += sum(len(b.entity_ids) for b in batches)

    sink = StuckSink()
    engine = ServingEngine(store, sink=sink, log_max_bytes=64 << 10)  # type: ignore[arg-type]
    engine.deploy(deployment(), {"v1": OnnxBackend(models[0]), "v2": OnnxBackend(models[1])})
    for i in range(200):
        engine.predict("ranker", [f"u{j}" for j in range(i, i + 20)])
    m = engine.native.metrics()
    assert m["log_queued_bytes"] <= 64 << 10
    assert m["log_dropped"] > 0
    queued = m["log_records"]
    assert queued + m["log_dropped"] == 200 * 20
    release.set()
    assert engine.flush_log()
    engine.close()
    assert sink.records == queued
