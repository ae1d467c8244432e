"""Each role runs with only its own extra: ``carrara[serving]``, ``[features]``,
``[monitoring]`` and ``[training]`` are what the per-role images install, so each role's real
work runs here with every package outside its extra made unimportable (``role_env.py``): the
gateway serves predictions without pandas, DuckDB, PyTorch or TensorFlow; the feature platform
ingests, materializes and builds a training set without ONNX Runtime or PyTorch; the monitor
judges drift without the training frameworks; a training worker trains and registers without
the gateway's packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from carrara.core import encode_feature_vector
from carrara.eventlog import open_event_log
from carrara.gateway.backends import file_sha256
from carrara.gateway.onnx_models import write_linear_model
from carrara.monitoring import ModelMonitorConfig
from carrara.monitoring.traffic import SyntheticModel, phased_records, publish, register_synthetic
from carrara.sql import connect

from ..servers import free_port, serve_process

pytestmark = pytest.mark.integration

RUNNER = Path(__file__).with_name("role_env.py")
ROOT = Path(__file__).resolve().parents[2]


def role(
    name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER), name, *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, **(env or {})},
    )


def blocked(stderr: str) -> list[str]:
    line = [x for x in stderr.splitlines() if x.startswith("blocked: ")][-1]
    names: list[str] = json.loads(line.removeprefix("blocked: ").replace("'", '"'))
    return names


def test_the_blocker_hides_other_roles_packages() -> None:
    out = role("serving", "-c", "import onnxruntime, redis, starlette\nimport torch")
    assert out.returncode == 1 and "No module named 'torch' (not in this role)" in out.stderr
    out = role("features", "-c", "import duckdb, pyarrow, pandas\nimport onnxruntime")
    assert "No module named 'onnxruntime' (not in this role)" in out.stderr
    # A command of a role that is not installed says which extra to install.
    out = role("features", "--", "monitor", "run", "--until-idle")
    assert out.returncode == 2
    assert "'carrara monitor' needs the 'monitoring' extra" in out.stderr
    assert "pip install 'carrara[monitoring]'" in out.stderr


def test_serving_role_serves(tmp_path: Path, redis_url: str, redis_namespace: str) -> None:
    model = write_linear_model(tmp_path / "m.onnx", np.array([1.0, -2.0], np.float32), 0.5)
    client = redis.Redis.from_url(redis_url)
    client.set(
        f"{redis_namespace}:trips:1:d3", encode_feature_vector("d3", "trips", 1, [3.0, 0.25])
    )
    client.close()
    variant = {
        "name": "v1",
        "version": 1,
        "artifact": "m.onnx",
        "sha256": file_sha256(model),
        "features": {
            "groups": [{"name": "trips", "version": 1, "features": ["count", "rate"]}],
            "features": [
                {"group": "trips", "feature": "count"},
                {"group": "trips", "feature": "rate"},
            ],
        },
    }
    config = {
        "online_store_url": f"{redis_url}?namespace={redis_namespace}",
        "models": [
            {
                "name": "eta",
                "policy": {"variants": [{"name": "v1", "weight_bp": 10_000}]},
                "variants": [variant],
            }
        ],
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    argv = ["serve", "--config", str(tmp_path / "gateway.yaml")]
    argv += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    runner = (str(RUNNER), "serving", "--")
    with serve_process(argv, http_port, log=log, python_args=runner, timeout_s=60):
        for target in (f"http://127.0.0.1:{http_port}", f"grpc://127.0.0.1:{grpc_port}"):
            got = role("serving", "--", "predict", "eta", "d3", "--target", target)
            assert got.returncode == 0, got.stderr
            [prediction] = json.loads(got.stdout)["predictions"]
            assert prediction["values"][0] == pytest.approx(3.0 - 2 * 0.25 + 0.5)
            assert "pandas" not in got.stderr.split("blocked: ")[-1]
    text = log.read_text()
    # The gateway never reached for the offline or training stack.
    asked = blocked(text)
    assert not {"pandas", "duckdb", "torch", "tensorflow", "sklearn"} & set(asked), asked


FEATURES = """
import json
import pandas as pd
from carrara.config import load_settings
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService

T0 = 1_780_000_000_000_000
with FeatureService.from_settings(load_settings()) as fs:
    fs.apply(Definitions(
        entities=(Entity(name="rider", join_key="rider_id"),),
        groups=(FeatureGroup(name="trips", entity="rider",
                             features=(Feature(name="count"), Feature(name="rate"))),),
    ))
    fs.ingest("trips", pd.DataFrame({
        "rider_id": ["a", "a", "b"],
        "event_timestamp": pd.to_datetime([T0, T0 + 10**9, T0], unit="us", utc=True),
        "count": [1.0, 2.0, 5.0],
        "rate": [0.5, 0.25, 0.75],
    }))
    written = sum(r.written for r in fs.materialize("trips", full=True))
    online = fs.get_online("trips", ["a", "b"])
    labels = pd.DataFrame({
        "rider_id": ["a", "a"],
        "event_timestamp": pd.to_datetime([T0 + 1, T0 + 2 * 10**9], unit="us", utc=True),
    })
    table = fs.get_training_set(labels, ["trips:count"]).to_pandas()
print(json.dumps({"written": written, "online": str(online),
                  "train": table["trips__count"].tolist() if "trips__count" in table
                  else table[[c for c in table.columns if c.endswith("count")][0]].tolist()}))
"""


def test_features_role_ingests_materializes_and_joins(tmp_path: Path) -> None:
    out = role("features", "-c", FEATURES, env={"CARRARA_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["written"] == 2
    assert result["train"] == [1.0, 2.0]  # point in time: the row before each label
    assert "0.25" in result["online"] and "0.75" in result["online"]
    asked = blocked(out.stderr)
    assert not {"onnxruntime", "torch", "tensorflow", "scipy"} & set(asked), asked


def test_monitoring_role_judges_drift(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'registry.db'}"
    log_url = f"local:///{tmp_path / 'events.db'}"
    sm = SyntheticModel(seed=13)
    config = ModelMonitorConfig(window_ms=60_000, allowed_lateness_ms=0)
    with connect(db_url) as db:
        register_synthetic(db, sm, model="churn", version=1, config=config)
    records = phased_records(
        sm, [(2, {}), (2, {"x0": 1.0})], model="churn", window_ms=60_000, per_window=1_000
    )
    with open_event_log(log_url) as log:
        publish(log, records)
    argv = ["monitor", "run", "--db", db_url, "--event-log", log_url, "--until-idle", "--flush"]
    out = role("monitoring", "--", *argv)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "predictions: 4000 new" in out.stdout and "churn:v1:drift:x0" in out.stdout
    asked = blocked(out.stderr)
    assert not {"torch", "tensorflow", "duckdb", "onnxruntime"} & set(asked), asked


def test_training_role_trains_and_registers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carrara.config import load_settings
    from carrara.feature_cache import FeatureService

    from ..training_data import write_stats_job

    env = {"CARRARA_HOME": str(tmp_path / "home"), "CARRARA_DATA_ROOTS": str(tmp_path)}
    for name in ("CARRARA_CONFIG", "CARRARA_REGISTRY_URL", "CARRARA_EVENT_LOG_URL"):
        env[name] = ""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with FeatureService.from_settings(load_settings()) as features:
        write_stats_job(features, tmp_path, 60)
    out = role("training", "--", "train", "submit", str(tmp_path / "job.yaml"), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    out = role("training", "--", "train", "worker", "--until-idle", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SUCCEEDED  score  -> score v1" in out.stdout
    asked = blocked(out.stderr)
    assert not {"tritonclient", "uvloop"} & set(asked), asked
