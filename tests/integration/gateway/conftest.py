"""A real Triton server (2.51, from the PyPI package nvidia-pytriton, CPU only, python backend)
serving an ONNX model through onnxruntime, for the Triton backend tests.

nvidia-pytriton pins numpy<2, so it lives in its own virtualenv (`make triton-env` builds
build/triton-venv; CARRARA_TRITON_VENV overrides) and only its server process uses it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from carrara.gateway.onnx_models import write_linear_model
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[3]
TRITON_VENV = Path(os.environ.get("CARRARA_TRITON_VENV", ROOT / "build" / "triton-venv"))
WEIGHTS = np.array([[0.5], [-1.0], [2.0]], np.float32)
BIAS = 0.25

MODEL_PY = """
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            (y,) = self.session.run(None, {"features": x.astype(np.float32)})
            out = pb_utils.Tensor("score", y.astype(np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""

CONFIG = """
name: "linear"
backend: "python"
max_batch_size: 0
input [ { name: "features" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ -1, 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*/site-packages"))


@pytest.fixture(scope="session")
def triton_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = TRITON_VENV / "bin" / "python"
    if not python.exists():
        message = f"no Triton virtualenv at {TRITON_VENV}; run `make triton-env`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    site = _site_packages(TRITON_VENV)
    server_root = site / "pytriton" / "tritonserver"
    work = tmp_path_factory.mktemp("triton")
    backend = work / "backends" / "python"
    backend.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(server_root / "backends" / "python" / f, backend / f)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(server_root / "python_backend_stubs" / py / "triton_python_backend_stub", backend)
    model_dir = work / "repo" / "linear" / "1"
    model_dir.mkdir(parents=True)
    write_linear_model(model_dir / "model.onnx", WEIGHTS, BIAS, output_name="score")
    (model_dir / "model.py").write_text(MODEL_PY)
    (work / "repo" / "linear" / "config.pbtxt").write_text(CONFIG)

    libdir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{site / 'nvidia_pytriton.libs'}:{libdir}"
    env["PATH"] = f"{TRITON_VENV / 'bin'}:{env['PATH']}"
    grpc_port = free_port()
    log = open(work / "triton.log", "wb")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        [
            str(server_root / "bin" / "tritonserver"),
            f"--model-repository={work / 'repo'}",
            f"--backend-directory={work / 'backends'}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--log-verbose=0",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"127.0.0.1:{grpc_port}"
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url)
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited: {(work / 'triton.log').read_text()[-3000:]}"
                )
            try:
                if client.is_server_ready() and client.is_model_ready("linear"):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tritonserver not ready: {(work / 'triton.log').read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield url
    finally:
        client.close()
        # SIGTERM the whole session: tritonserver drains for a few seconds, then exits.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


class PrivateRedis:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make test installs it)"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    if r.proc is not None and r.proc.poll() is None:
        r.kill()
