"""TritonBackend against a real Triton server: same outputs as ONNX Runtime in-process,
errors mapped, and serving through the engine with a fallback when Triton goes away."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, RoutingPolicy, Variant
from carrara.errors import InvalidArgumentError, NotFoundError, UnavailableError
from carrara.gateway.backends import OnnxBackend
from carrara.gateway.engine import ModelDeployment, ServingEngine, VariantSpec
from carrara.gateway.onnx_models import write_linear_model
from carrara.gateway.triton_backend import TritonBackend

from .conftest import BIAS, WEIGHTS

pytestmark = pytest.mark.integration


def test_outputs_match_onnxruntime(triton_url: str, tmp_path: Path) -> None:
    backend = TritonBackend(triton_url, "linear")
    local = OnnxBackend(write_linear_model(tmp_path / "m.onnx", WEIGHTS, BIAS, output_name="score"))
    try:
        assert backend.info.input_dim == 3 and backend.info.output_dim == 1
        x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
        np.testing.assert_allclose(backend.infer(x), local.infer(x), rtol=1e-6)
        np.testing.assert_allclose(backend.infer(x[:1]), x[:1] @ WEIGHTS + BIAS, rtol=1e-6)
        with pytest.raises(InvalidArgumentError, match=r"float32 \[n, 3\]"):
            backend.infer(np.zeros((2, 4), np.float32))
    finally:
        backend.close()


def test_unknown_model_and_unreachable_server(triton_url: str) -> None:
    with pytest.raises((NotFoundError, UnavailableError)):
        TritonBackend(triton_url, "nope")
    with pytest.raises(UnavailableError):
        TritonBackend("127.0.0.1:1", "linear")


class Store:
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        from carrara.core import encode_feature_vector

        return [encode_feature_vector(k.split(":")[-1], "g", 1, [1.0, 2.0, 3.0]) for k in keys]


def test_engine_serves_through_triton(triton_url: str, tmp_path: Path) -> None:
    spec = AssemblerSpec(
        groups=(GroupSchema("g", 1, ("a", "b", "c")),),
        features=(FeatureRef("g", "a"), FeatureRef("g", "b"), FeatureRef("g", "c")),
    )
    engine = ServingEngine(Store())
    triton_backend = TritonBackend(triton_url, "linear")
    engine.deploy(
        ModelDeployment(
            model="m",
            policy=RoutingPolicy(
                variants=(Variant("gpu", 10_000), Variant("cpu", 0)), fallback="cpu"
            ),
            variants=(
                VariantSpec(name="gpu", version=2, features=spec, timeout_s=2.0),
                VariantSpec(name="cpu", version=1, features=spec),
            ),
        ),
        {
            "gpu": triton_backend,
            "cpu": OnnxBackend(write_linear_model(tmp_path / "c.onnx", WEIGHTS * 0, 7.0)),
        },
    )
    r = engine.predict("m", ["e1", "e2"])
    expected = float(np.array([1.0, 2.0, 3.0], np.float32) @ WEIGHTS[:, 0] + BIAS)
    assert r.variants == ["gpu", "gpu"]
    assert r.outputs[:, 0].tolist() == pytest.approx([expected, expected])
    # The native gRPC client is what serves; closing it makes every call fail at once
    # (UNAVAILABLE), as a dead remote would: the fallback answers.
    engine._executors[id(triton_backend)][1].close()
    r = engine.predict("m", ["e1"])
    assert (r.variants, r.degraded, r.outputs[0, 0]) == (["cpu"], [True], 7.0)
    engine.close()
    triton_backend.close()
