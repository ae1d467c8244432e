"""Unmodified ``tritonclient.grpc`` (and the grpc_health / carrara.v1 Python clients) against
the native front: runs ``carrara_serve_main`` (server/tests/serve_main.cpp) and checks every
call the fronts' tests make, plus streaming.

    .venv/bin/python server/tests/tritonclient_smoke.py build/<dir>/server/tests/carrara_serve_main
"""

from __future__ import annotations

import queue
import subprocess
import sys
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException


def expected(i: int, shift: float = 0.0) -> list[float]:
    return [i + 0.5 + shift, -2.0 * i - 0.5 + shift]


def ids_input(ids: list[str]) -> Any:
    inp = triton.InferInput("entity_ids", [len(ids)], "BYTES")
    inp.set_data_from_numpy(np.array([s.encode() for s in ids], dtype=np.object_))
    return inp


def check(url: str) -> None:
    client = triton.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("scorer") and not client.is_model_ready("nope")
        assert client.get_server_metadata().name == "carrara"
        meta = client.get_model_metadata("scorer")
        assert meta.versions == ["3"], meta
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("entity_ids", "BYTES", [-1])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("predictions", "FP32", [-1, 2])
        ]
        config = client.get_model_config("scorer").config
        assert config.name == "scorer" and config.output[0].name == "predictions"

        inp = ids_input(["u1", "u42", "u99"])
        result = client.infer(
            "scorer", [inp], outputs=[triton.InferRequestedOutput("predictions")], request_id="r1"
        )
        out = result.as_numpy("predictions")
        assert out is not None and out.shape == (3, 2), out
        np.testing.assert_allclose(out, [expected(1), expected(42), expected(99)], rtol=1e-6)
        response = result.get_response()
        assert response.id == "r1" and response.model_version == "3"
        assert response.parameters["carrara_variants"].string_param == "v3,v3,v3"

        override = triton.InferInput("a", [3], "FP32")
        override.set_data_from_numpy(np.array([0.0, 0.0, 1.0], np.float32))
        out = client.infer("scorer", [inp, override]).as_numpy("predictions")
        assert out is not None and out[2].tolist() == [1.5, -198.5], out

        for call, text in [
            (lambda: client.infer("nope", [inp]), "not deployed"),
            (lambda: client.infer("scorer", [inp], model_version="7"), "no deployed version 7"),
        ]:
            try:
                call()
            except InferenceServerException as exc:
                assert text in str(exc), exc
            else:
                raise AssertionError(f"no error for {text!r}")
        bad = triton.InferInput("entity_ids", [2], "FP32")
        bad.set_data_from_numpy(np.zeros(2, np.float32))
        try:
            client.infer("scorer", [bad])
        except InferenceServerException as exc:
            assert "must be BYTES" in str(exc) and exc.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            raise AssertionError("FP32 entity ids accepted")

        stats = client.get_inference_statistics("scorer").model_stats[0]
        assert stats.inference_stats.success.count >= 2, stats
        assert stats.inference_stats.fail.count >= 1, stats
        index = client.get_model_repository_index()
        assert sorted((m.name, m.version) for m in index.models) == [
            ("ab", "1"),
            ("ab", "2"),
            ("held", "1"),
            ("scorer", "3"),
        ], index

        # Streaming: answers come back in request order; an error does not end the stream.
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        n = 50
        for i in range(n):
            inputs = [ids_input([f"u{i}"])] if i != 17 else [bad]
            client.async_stream_infer("ab" if i % 2 else "scorer", inputs, request_id=f"s{i}")
        client.stop_stream()
        for i in range(n):
            result, error = answers.get(timeout=10)
            if i == 17:
                assert result is None and "must be BYTES" in str(error), (result, error)
                continue
            assert error is None, error
            response = result.get_response()
            assert response.id == f"s{i}", (i, response.id)
            shift = (
                100.0
                if response.parameters["carrara_variants"].string_param == "treatment"
                else 0.0
            )
            np.testing.assert_allclose(result.as_numpy("predictions"), [expected(i, shift)])
        assert answers.empty()
    finally:
        client.close()

    with grpc.insecure_channel(url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status
        from carrara.v1 import predict_pb2

        predict = channel.unary_unary(
            "/carrara.v1.Predict/Predict",
            request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )
        r = predict(
            predict_pb2.PredictRequest(model="scorer", entity_ids=["u3", "nobody"], request_id="q1")
        )
        assert (r.model, r.model_version, r.variant, r.request_id) == ("scorer", 3, "v3", "q1")
        assert list(r.predictions[0].values) == expected(3)
        assert list(r.predictions[1].values) == expected(0) and r.predictions[1].degraded


def main() -> int:
    proc = subprocess.Popen([sys.argv[1], "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "READY", line
        check(f"127.0.0.1:{line[1]}")
    finally:
        proc.terminate()
        rc = proc.wait(timeout=20)
    assert rc == 0, f"serve_main exited with {rc}"
    print("tritonclient smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
