"""`carrara serve` as a real process (config file, real Redis online store) and `carrara predict`
against it over HTTP and gRPC; SIGTERM shuts it down cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import yaml

from carrara.core import encode_feature_vector
from carrara.gateway.backends import file_sha256
from carrara.gateway.onnx_models import write_linear_model
from tests.servers import free_port, serve_process, wait_ready

pytestmark = pytest.mark.integration


def carrara(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carrara", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_and_predict(tmp_path: Path, redis_url: str, redis_namespace: str) -> None:
    weights = np.array([1.0, -2.0], np.float32)
    model = write_linear_model(tmp_path / "m.onnx", weights, 0.5)
    client = redis.Redis.from_url(redis_url)
    client.mset(
        {
            f"{redis_namespace}:trips:2:d{i}": encode_feature_vector(
                f"d{i}", "trips", 2, [i, i / 10, 7.0]
            )
            for i in range(5)
        }
    )
    client.close()
    config = {
        "online_store_url": f"{redis_url}?namespace={redis_namespace}",
        "max_in_flight": 37,
        "models": [
            {
                "name": "eta",
                "policy": {"variants": [{"name": "v2", "weight_bp": 10_000}]},
                "variants": [
                    {
                        "name": "v2",
                        "version": 2,
                        "artifact": "m.onnx",
                        "sha256": file_sha256(model),
                        "features": {
                            "groups": [
                                {"name": "trips", "version": 2, "features": ["count", "rate", "x"]}
                            ],
                            "features": [
                                {"group": "trips", "feature": "count"},
                                {"group": "trips", "feature": "rate", "default": -1.0},
                            ],
                        },
                    }
                ],
            }
        ],
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    argv = _serve_argv(tmp_path / "gateway.yaml", grpc_port, http_port)
    with serve_process(argv, http_port, log=log):

        def expected(i: int) -> float:
            return float(np.float32(i) * 1.0 + np.float32(i / 10) * -2.0 + 0.5)

        for target in (f"http://127.0.0.1:{http_port}", f"grpc://127.0.0.1:{grpc_port}"):
            out = carrara("predict", "eta", "d3", "d4", "ghost", "--target", target)
            assert out.returncode == 0, out.stderr
            body = json.loads(out.stdout)
            values = [p["values"][0] for p in body["predictions"]]
            assert values == pytest.approx([expected(3), expected(4), 0.0 * 1 + -1.0 * -2.0 + 0.5])
            assert {p["model_version"] for p in body["predictions"]} == {2}
            out = carrara("predict", "eta", "d3", "--target", target, "--override", "rate=0")
            assert json.loads(out.stdout)["predictions"][0]["values"][0] == pytest.approx(3.5)
            out = carrara("predict", "nope", "d3", "--target", target)
            assert out.returncode == 1 and "NOT_FOUND" in out.stderr
        # The configured admission bound is the one the native engine enforces.
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        assert "carrara_predict_in_flight_limit 37.0" in metrics
    assert "carrara gateway: gRPC" in log.read_text()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("models: [{name: m}]\n")
    out = carrara("serve", "--config", str(tmp_path / "g.yaml"))
    assert out.returncode == 2
    assert "invalid gateway config" in out.stderr and "policy" in out.stderr


def _serve_argv(config: Path, grpc_port: int, http_port: int) -> list[str]:
    return [
        "serve", "--config", str(config),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
    ]  # fmt: skip


def _ready_body(proc: subprocess.Popen[bytes], http_port: int, log: Path) -> dict[str, object]:
    body: dict[str, object] = wait_ready(
        proc, f"http://127.0.0.1:{http_port}/readyz", log=log
    ).json()
    return body


def test_serve_survives_a_bad_model_and_restarts_without_the_registry(tmp_path: Path) -> None:
    """A model that does not load is unavailable while the others serve; a restart with the
    registry's event log and artifact store gone serves the last good state."""
    from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, serving_spec
    from carrara.eventlog import open_event_log
    from carrara.registry.auth import Principal
    from carrara.registry.registry import ModelRegistry

    actor = Principal("ci", frozenset({"publisher", "deployer"}))
    spec = AssemblerSpec(groups=(GroupSchema("u", 1, ("x",)),), features=(FeatureRef("u", "x"),))
    events = open_event_log(f"local:///{tmp_path / 'events.db'}")
    registry = ModelRegistry.open(
        f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "artifacts", events=events
    )
    for name, weight in (("a", 2.0), ("b", 3.0)):
        path = write_linear_model(tmp_path / f"{name}.onnx", [weight], 0.0)
        v = registry.register(
            name,
            actor=actor,
            serving_artifact=path.read_bytes(),
            framework="onnx",
            serving_spec=serving_spec(spec),
        )
        registry.deploy(name, v.version, actor=actor)
    registry.close()
    events.close()
    bad = write_linear_model(tmp_path / "c.onnx", [1.0], 0.0)
    config = {
        "registry": {
            "event_log_url": f"local:///{tmp_path / 'events.db'}",
            "artifact_path": str(tmp_path / "artifacts"),
            "state_dir": "state",
        },
        "models": [
            {
                "name": "c",
                "policy": {"variants": [{"name": "v1", "weight_bp": 10_000}]},
                "variants": [
                    {
                        "name": "v1",
                        "version": 1,
                        "artifact": "c.onnx",
                        "sha256": "0" * 64,  # does not match: c cannot load
                        "features": msgspec_builtins(spec),
                    }
                ],
            }
        ],
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    assert bad.exists()
    log = tmp_path / "serve.log"
    for attempt in range(2):
        grpc_port, http_port = free_port(), free_port()
        argv = _serve_argv(tmp_path / "gateway.yaml", grpc_port, http_port)
        with serve_process(argv, http_port, log=log) as proc:
            deadline = time.monotonic() + 30
            while True:
                body = _ready_body(proc, http_port, log)
                if sorted(body["models"]) == ["a", "b"]:  # type: ignore[call-overload]
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
            assert list(body["unavailable"]) == ["c"]  # type: ignore[call-overload]
            for name, weight in (("a", 2.0), ("b", 3.0)):
                target = f"http://127.0.0.1:{http_port}"
                out = carrara("predict", name, "e1", "--target", target, "--override", "x=1")
                assert out.returncode == 0, out.stderr
                assert json.loads(out.stdout)["predictions"][0]["values"] == [weight]
            out = carrara("predict", "c", "e1", "--target", f"http://127.0.0.1:{http_port}")
            assert out.returncode == 1 and "NOT_FOUND" in out.stderr
        if attempt == 0:
            # The registry goes away entirely: no event log, no artifact store.
            (tmp_path / "events.db").unlink()
            for f in (tmp_path / "artifacts").rglob("*"):
                if f.is_file():
                    f.chmod(0o644)
                    f.write_bytes(b"tampered")
    assert "model c is unavailable" in log.read_text()


def msgspec_builtins(value: object) -> object:
    import msgspec

    return msgspec.to_builtins(value)
