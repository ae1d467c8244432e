"""Carrara's KServe v2 / Triton gRPC front beside a real Triton, both driven by Triton's own
load generator, ``perf_analyzer``.

``python -m bench.kserve_compare [--concurrency 1,8,16,64] [--protocols grpc,http] [--streaming]
[--scenarios hit,miss] [--measurement-interval MS] [--carrara-grpc HOST:PORT] [--overload]
[--inflight 5000] [--out PATH]``

Side by side on this machine:

- **Carrara**: a gateway serving ``linear`` (3 features -> 1 score, ``write_linear_model``),
  features from an in-process online store (a dict of encoded FeatureVectors). Scenario ``hit``:
  a fixed set of ``HOT_ENTITIES`` ids, warm in the feature cache. Scenario ``miss``: a second
  gateway whose cache keeps entries for a microsecond, sent ``MISS_IDS`` distinct ids (a fresh
  prefix per run), so every request reads the store and fills the cache. The gateway is started
  by ONE function, ``start_python_front`` (``GatewayServer`` on a ``ServerThread``, as
  tests/unit/gateway/test_fronts.py does); ``--carrara-grpc HOST:PORT`` points the run at a
  gateway that is already running instead (e.g. the C++ front), and ``CARRARA_LAUNCHERS`` is
  where another in-process launcher goes.
- **Triton**: a real Triton 2.51 (nvidia-pytriton's ``tritonserver``, from ``build/triton-venv``,
  ``make triton-env``) in a subprocess, serving the same ONNX model through ONNX Runtime in a
  python-backend model (as tests/integration/gateway/conftest.py does), gRPC and HTTP.

perf_analyzer (``bench/perf_analyzer/install.sh``, ``make perf-analyzer``) runs once per target x
scenario x protocol x concurrency with ``--input-data`` JSON written here (Carrara: one entity id
per request, BYTES ``entity_ids`` [1]; Triton: that entity's 3 features, FP32 ``features``
[1, 3]), ``--measurement-interval`` and ``-f`` CSV, which is parsed. A markdown table (infer/s,
p50, p99, ratios Carrara / Triton) goes to stdout and everything to ``--out`` (JSON; checked by
``python -m bench.check_ratios``).

Carrara's gateway here is the native front (C++ gRPC server over the C++ engine, KServe v2
REST on the HTTP front); the same script run from a checkout of commit 20511bd measured the
retired Python ``grpc.aio`` front (``bench/results/python_front.json``), which served neither
KServe REST nor ``ModelStreamInfer``. ``--store-url redis://...`` makes the gateway read the
real Redis (natively) instead of an in-process dict.

Extra scenarios:

- ``--overload``: perf_analyzer ``--request-rate-range`` at ``--overload-factor`` (2) x the
  saturation throughput measured above (best gRPC cache-hit infer/s of that target), async,
  over ``--overload-seconds`` worth of requests (``--request-count``). perf_analyzer ABORTS a
  run at the first failed request (exit 99, "Failed to retrieve results"), so it cannot count
  refusals itself: the row reports whether it survived, the first errors, and the server's own
  count of successful / failed requests over the run (KServe ``ModelStatistics`` before and
  after). For Carrara the same offered rate also goes through the repo's open-loop harness
  (``carrara loadtest`` as a library, KServe target), which keeps going and counts failures by
  status code.
- ``--inflight N`` (5,000): a model that takes 10 ms (a backend that sleeps 10 ms per batch;
  Carrara: a remote-style backend on the engine's worker pool, ``--inflight-workers`` threads;
  Triton: a python-backend model with dynamic batching that sleeps 10 ms per ``execute``),
  driven by perf_analyzer ``--concurrency-range N --async --max-threads T --request-count 8N``.
  perf_analyzer is the driver: it holds N in flight from a few threads (checked against Triton:
  Little's-law in flight, infer/s x mean latency, is reported per row). ``carrara loadtest
  --closed N`` (one asyncio loop) can hold N as well and runs beside it for Carrara, but it
  speaks only entity ids, so it cannot drive the Triton side.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import inspect
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
PERF_ANALYZER = REPO / "build" / "perf-analyzer" / "bin" / "perf_analyzer"
TRITON_VENV = Path(os.environ.get("CARRARA_TRITON_VENV", REPO / "build" / "triton-venv"))

MODEL = "linear"  # both servers serve the linear model under this name
SLEEP_MODEL = "sleep10"  # the 10 ms model of the in-flight scenario
FEATURES = ("a", "b", "c")
WEIGHTS = np.array([[0.5], [-1.0], [2.0]], np.float32)
BIAS = 0.25
HOT_ENTITIES = 100  # the "hit" working set, warm in the gateway's cache
MISS_IDS = 20_000  # distinct ids of the "miss" scenario (each request a different one)
CARRARA = "carrara"
TRITON = "triton"
SCENARIOS = ("hit", "miss")
PROTOCOLS = ("grpc", "http", "grpc-stream")


# -- the data -----------------------------------------------------------------------------


def features_of(entity: str) -> list[float]:
    """Deterministic features of an entity (what the online store holds for it)."""
    rng = np.random.default_rng(zlib.crc32(entity.encode()))
    return [round(float(v), 4) for v in rng.normal(size=len(FEATURES))]


def hot_ids() -> list[str]:
    return [f"h{i}" for i in range(HOT_ENTITIES)]


def miss_ids(nonce: str) -> list[str]:
    """Ids no cache has seen: a per-run prefix, so even a long-running gateway misses."""
    return [f"m{nonce}-{i}" for i in range(MISS_IDS)]


def write_input_data(directory: Path, nonce: str) -> dict[str, Path]:
    """perf_analyzer ``--input-data`` JSON files, one request per entry (batch of 1)."""
    directory.mkdir(parents=True, exist_ok=True)

    def carrara_entries(ids: Sequence[str]) -> dict[str, Any]:
        return {"data": [{"entity_ids": {"content": [e], "shape": [1]}} for e in ids]}

    files = {
        "carrara-hit": carrara_entries(hot_ids()),
        "carrara-miss": carrara_entries(miss_ids(nonce)),
        # Triton is sent the features the gateway would have looked up (no store, no cache).
        "triton": {
            "data": [
                {"features": {"content": features_of(e), "shape": [1, len(FEATURES)]}}
                for e in hot_ids()
            ]
        },
        # The dynamically batched sleep model: shapes without the batch dimension.
        "triton-batched": {
            "data": [
                {"features": {"content": features_of(e), "shape": [len(FEATURES)]}}
                for e in hot_ids()
            ]
        },
    }
    out = {}
    for name, body in files.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(body))
        out[name] = path
    return out


# -- Carrara ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CarraraSetup:
    """What one Carrara gateway serves (independent of which front serves it)."""

    model_path: Path
    cache: str  # "hit" (warm cache of HOT_ENTITIES) | "miss" (entries live 1 us)
    store_ids: tuple[str, ...]  # entities the online store has features for
    sleep_ms: float = 0.0  # > 0: model SLEEP_MODEL, a backend that sleeps this long per batch
    max_in_flight: int = 64  # the gateway's admission bound (Gateway and engine)
    threads: int = 8  # Gateway pool (and engine worker pool for the sleep backend)
    store_url: str | None = None  # online store (e.g. redis://...); None = an in-process dict
    max_batch_size: int = 64  # dynamic batching of the in-process model
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class CarraraEndpoint:
    grpc: str  # host:port of the KServe v2 gRPC service
    http: str | None  # host:port of the HTTP front (not KServe v2 for the Python front)
    front: str  # a description for the report


#: (setup) -> context manager yielding the running gateway's endpoint.
CarraraLauncher = Callable[[CarraraSetup], AbstractContextManager[CarraraEndpoint]]


class DictStore:
    """The online store, in process: raw keys -> encoded FeatureVectors."""

    def __init__(self, ids: Sequence[str]) -> None:
        from carrara.core import encode_feature_vector

        self.data = {
            f"user:1:{e}": encode_feature_vector(e, "user", 1, features_of(e)) for e in ids
        }

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        data = self.data
        return [data.get(k) for k in keys]


class SleepBackend:
    """A model that takes ``sleep_ms`` per batch, in process and dynamically batched (up to
    1,024 rows, one instance, no queue delay), as Triton's ``sleep10`` model is configured."""

    runs_in_process = True

    def __init__(self, sleep_ms: float) -> None:
        from carrara.gateway.backends import BackendInfo

        self.sleep_s = sleep_ms / 1e3
        self._info = BackendInfo(
            input_name="features",
            input_dim=len(FEATURES),
            output_names=("score",),
            output_dim=1,
            platform="sleep",
        )

    @property
    def info(self) -> Any:
        return self._info

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        time.sleep(self.sleep_s)
        return (x @ WEIGHTS + BIAS).astype(np.float32)

    def close(self) -> None:
        pass


def redis_store(url: str, data: dict[str, bytes]) -> Any:
    """``data`` written to Redis under a fresh namespace; the store the gateway reads it from
    (the native hiredis reader where the gateway has one, else redis-py)."""
    from carrara.feature_cache.online_store import open_online_store
    from carrara.gateway import embedded

    namespace = f"kserve-bench-{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in url else "?"
    online: Any = open_online_store(f"{url}{sep}namespace={namespace}")
    pipe = online.client.pipeline(transaction=False)
    for k, v in data.items():
        pipe.set(f"{namespace}:{k}", v, ex=3_600)  # gone an hour after the run
    pipe.execute()
    wrap = getattr(embedded, "serving_store", None) or embedded.StoreReader
    return wrap(online)


def _supported(cls: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``cls`` takes (the gateway's constructors change as it is
    rewritten; a setting it no longer has is left to its default)."""
    params = inspect.signature(cls).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def build_engine(setup: CarraraSetup) -> Any:
    """A ``ServingEngine`` with the setup's model deployed and (for "hit") the cache warm."""
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

    group = GroupSchema("user", 1, FEATURES)
    spec = AssemblerSpec(groups=(group,), features=tuple(FeatureRef("user", f) for f in FEATURES))
    if setup.cache == "hit":
        cache = FeatureCache(capacity=max(10_000, 2 * len(setup.store_ids)), ttl_seconds=3600.0)
    else:  # every entry expires a microsecond after it is written: each request misses
        cache = FeatureCache(capacity=64, ttl_seconds=1e-6)
    sleeping = setup.sleep_ms > 0
    store: Any = DictStore(setup.store_ids)
    if setup.store_url:
        store = redis_store(setup.store_url, store.data)
    engine = ServingEngine(
        store,
        **_supported(
            ServingEngine,
            cache=cache,
            max_in_flight=setup.max_in_flight,
            workers=setup.threads if sleeping else 4,
        ),
    )
    model = SLEEP_MODEL if sleeping else MODEL
    backend: Any = SleepBackend(setup.sleep_ms) if sleeping else OnnxBackend(setup.model_path)
    engine.deploy(
        ModelDeployment(
            model=model,
            policy=RoutingPolicy(variants=(Variant("v1", 10_000),)),
            variants=(
                VariantSpec(
                    name="v1",
                    version=1,
                    features=spec,
                    timeout_s=60.0,
                    reset_after_s=1,
                    **_supported(
                        VariantSpec,
                        max_batch_size=1024 if sleeping else setup.max_batch_size,
                        max_queue_delay_us=0 if sleeping else setup.max_queue_delay_us,
                    ),
                ),
            ),
        ),
        {"v1": backend},
    )
    if setup.cache == "hit":
        ids = list(setup.store_ids[:HOT_ENTITIES])
        for i in range(0, len(ids), 100):
            engine.predict(model, ids[i : i + 100])
    return engine


def _front_description() -> str:
    from carrara import _native

    if hasattr(_native, "GrpcServer"):
        return "native (C++ grpc++ front over the C++ engine, in-process; HTTP on uvicorn)"
    return "python (grpc.aio + uvicorn, in-process ServerThread)"


@contextmanager
def start_python_front(setup: CarraraSetup) -> Iterator[CarraraEndpoint]:
    """THE place the gateway is started in process: ``GatewayServer`` (the native gRPC front
    and the uvicorn HTTP front) on a ``ServerThread`` (its own event loop), as in
    tests/unit/gateway/test_fronts.py. Swap this function (or add one to ``CARRARA_LAUNCHERS``)
    for another front; the rest of the benchmark only sees the endpoint."""
    from carrara.gateway.server import GatewayServer, ServerThread
    from carrara.gateway.service import Gateway

    engine = build_engine(setup)
    gateway = Gateway(
        engine, **_supported(Gateway, threads=setup.threads, max_in_flight=setup.max_in_flight)
    )
    thread = ServerThread(lambda: GatewayServer(gateway))
    server = thread.start()
    try:
        yield CarraraEndpoint(
            grpc=f"127.0.0.1:{server.grpc_port}",
            http=f"127.0.0.1:{server.http_port}",
            front=_front_description(),
        )
    finally:
        thread.stop()
        gateway.close()


CARRARA_LAUNCHERS: dict[str, CarraraLauncher] = {"python": start_python_front}


def external_launcher(grpc: str, http: str | None) -> CarraraLauncher:
    """A gateway that is already running (``--carrara-grpc``): nothing to start."""

    @contextmanager
    def launch(setup: CarraraSetup) -> Iterator[CarraraEndpoint]:
        yield CarraraEndpoint(grpc=grpc, http=http, front=f"external gateway at {grpc}")

    return launch


# -- Triton -------------------------------------------------------------------------------

TRITON_MODEL_PY = """
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            (y,) = self.session.run(None, {"features": x.astype(np.float32)})
            out = pb_utils.Tensor("score", y.astype(np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""

TRITON_CONFIG = """
name: "linear"
backend: "python"
max_batch_size: 0
input [ { name: "features" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ -1, 1 ] } ]
instance_group [ { kind: KIND_CPU count: %(instances)d } ]
"""

# 10 ms per execute() call, i.e. per dynamically formed batch.
TRITON_SLEEP_PY = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils

W = np.array([[0.5], [-1.0], [2.0]], np.float32)


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(%(sleep_s)r)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            out = pb_utils.Tensor("score", (x @ W + 0.25).astype(np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
"""

TRITON_SLEEP_CONFIG = """
name: "sleep10"
backend: "python"
max_batch_size: 1024
input [ { name: "features" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { max_queue_delay_microseconds: 0 }
"""


@dataclass(frozen=True)
class TritonEndpoint:
    grpc: str
    http: str
    version: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(
    url: str, models: Sequence[str], deadline_s: float, alive: Callable[[], bool]
) -> str:
    """Poll a KServe v2 gRPC server until ``models`` are ready; returns its version."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url)
    deadline = time.monotonic() + deadline_s
    try:
        while True:
            if not alive():
                raise RuntimeError(f"server at {url} exited before it was ready")
            with contextlib.suppress(Exception):
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return str(client.get_server_metadata().version)
            if time.monotonic() > deadline:
                raise RuntimeError(f"server at {url} not ready within {deadline_s:.0f}s")
            time.sleep(0.3)
    finally:
        client.close()


@contextmanager
def start_triton(
    work: Path, *, instances: int = 1, sleep_ms: float = 0.0, venv: Path = TRITON_VENV
) -> Iterator[TritonEndpoint]:
    """tritonserver (gRPC + HTTP, loopback) with ``linear`` (and ``sleep10`` when ``sleep_ms``)."""
    from carrara.gateway.onnx_models import write_linear_model

    python = venv / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"no Triton virtualenv at {venv}; run `make triton-env`")
    info = json.loads(
        subprocess.run(
            [
                str(python),
                "-c",
                "import json, sys, sysconfig, site; print(json.dumps({'libdir': "
                "sysconfig.get_config_var('LIBDIR'), 'py': '%d.%d' % sys.version_info[:2], "
                "'site': site.getsitepackages()[0]}))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    site = Path(info["site"])
    server_root = site / "pytriton" / "tritonserver"
    backend = work / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(server_root / "backends" / "python" / f, backend / f)
    stub = server_root / "python_backend_stubs" / info["py"] / "triton_python_backend_stub"
    shutil.copy(stub, backend)
    repo = work / "repo"
    version = repo / MODEL / "1"
    version.mkdir(parents=True, exist_ok=True)
    write_linear_model(version / "model.onnx", WEIGHTS, BIAS, output_name="score")
    (version / "model.py").write_text(TRITON_MODEL_PY)
    (repo / MODEL / "config.pbtxt").write_text(TRITON_CONFIG % {"instances": instances})
    models = [MODEL]
    if sleep_ms > 0:
        sv = repo / SLEEP_MODEL / "1"
        sv.mkdir(parents=True, exist_ok=True)
        (sv / "model.py").write_text(TRITON_SLEEP_PY % {"sleep_s": sleep_ms / 1e3})
        (repo / SLEEP_MODEL / "config.pbtxt").write_text(TRITON_SLEEP_CONFIG)
        models.append(SLEEP_MODEL)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{site / 'nvidia_pytriton.libs'}:{info['libdir']}"
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    grpc_port, http_port = free_port(), free_port()
    log_path = work / "triton.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(server_root / "bin" / "tritonserver"),
                f"--model-repository={repo}",
                f"--backend-directory={work / 'backends'}",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={grpc_port}",
                "--http-address=127.0.0.1",
                f"--http-port={http_port}",
                "--allow-metrics=false",
                "--log-verbose=0",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            try:
                server_version = _wait_ready(
                    f"127.0.0.1:{grpc_port}", models, 120.0, lambda: proc.poll() is None
                )
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{log_path.read_text()[-3000:]}") from None
            yield TritonEndpoint(
                grpc=f"127.0.0.1:{grpc_port}",
                http=f"127.0.0.1:{http_port}",
                version=server_version,
            )
        finally:
            # SIGTERM the whole session: tritonserver drains for a few seconds, then exits.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -- perf_analyzer ------------------------------------------------------------------------


@dataclass
class Row:
    """One perf_analyzer run (or a failed attempt, with ``error`` set)."""

    target: str  # carrara | triton
    scenario: str  # hit | miss ("triton": the same features for both)
    protocol: str  # grpc | http | grpc-stream
    concurrency: int | None = None
    request_rate: float | None = None
    model: str = MODEL
    infer_per_s: float | None = None
    p50_us: float | None = None
    p90_us: float | None = None
    p95_us: float | None = None
    p99_us: float | None = None
    avg_us: float | None = None
    stable: bool | None = None
    mode: str = ""  # how perf_analyzer measured: time windows or a request count
    error: str | None = None
    returncode: int | None = None
    wall_s: float = 0.0
    server_success: int | None = None  # KServe ModelStatistics deltas over the run
    server_fail: int | None = None
    little_inflight: float | None = None  # infer/s x mean latency
    loadgen: dict[str, Any] | None = None  # overload: the open-loop harness at the same rate
    command: str = ""


@dataclass
class PerfSettings:
    binary: Path = PERF_ANALYZER
    measurement_interval_ms: int = 2_000
    max_trials: int = 6
    stability_percentage: float = 25.0
    #: > 0: one measurement of this many requests per run (``--request-count``), no windows.
    request_count: int = 0
    #: When the time windows do not stabilise (a busy machine), measure once more with the
    #: stability bound relaxed to this many percent (the row says so); 0: report the failure.
    #: (Not ``--request-count``: perf_analyzer 2.60 sometimes never finishes a sync run with
    #: one at c=64.)
    fallback_stability_percentage: float = 100.0
    extra: list[str] = field(default_factory=list)


_ERROR_PATTERNS = (
    re.compile(r"^error: .*$", re.MULTILINE),
    re.compile(r"^Thread \[\d+\] had error: .*$", re.MULTILINE),
    re.compile(r"^.*No valid requests recorded.*$", re.MULTILINE),
    re.compile(r"^Failed to .*$", re.MULTILINE),
)


def _errors_in(output: str) -> list[str]:
    found: list[str] = []
    for pattern in _ERROR_PATTERNS:
        for m in pattern.findall(output):
            line = m.strip()
            if line not in found:
                found.append(line)
    return found


def _number(row: dict[str, str], *names: str) -> float | None:
    for name in names:
        value = row.get(name)
        if value not in (None, ""):
            return float(value)
    return None


_UNSTABLE = re.compile(r"unable to stabilize|Failed to obtain stable")


def run_perf_analyzer(
    settings: PerfSettings,
    row: Row,
    *,
    request_count: int | None = None,
    **kwargs: Any,
) -> Row:
    """Run perf_analyzer for ``row``'s target/protocol/load and fill in its figures; when the
    time windows do not stabilise, once more with a relaxed bound (see ``PerfSettings``).
    ``request_count`` overrides the settings' (one measurement of that many requests)."""
    count = settings.request_count if request_count is None else request_count
    output = _run_perf_analyzer_once(settings, row, request_count=count, **kwargs)
    relaxed = settings.fallback_stability_percentage
    if (
        row.infer_per_s is None
        and count == 0
        and relaxed > settings.stability_percentage
        and _UNSTABLE.search(output)
    ):
        first_error = row.error
        row.error = None
        _run_perf_analyzer_once(
            settings, row, request_count=0, stability_percentage=relaxed, **kwargs
        )
        row.stable = False
        row.mode += f" (after {settings.stability_percentage:g}% did not stabilise)"
        if row.infer_per_s is None:
            row.error = f"{row.error}; before that: {first_error}"
    return row


def _run_perf_analyzer_once(
    settings: PerfSettings,
    row: Row,
    *,
    url: str,
    input_data: Path,
    workdir: Path,
    async_mode: bool = False,
    max_threads: int | None = None,
    measurement_interval_ms: int | None = None,
    max_trials: int | None = None,
    timeout_s: float | None = None,
    request_count: int = 0,
    stability_percentage: float | None = None,
) -> str:
    """One perf_analyzer run; fills ``row`` in, returns perf_analyzer's output."""
    interval = measurement_interval_ms or settings.measurement_interval_ms
    trials = max_trials or settings.max_trials
    if request_count > 0 and row.concurrency:
        # perf_analyzer 2.60 over HTTP (sync) never finishes when the count is not a multiple
        # of the concurrency: round up.
        request_count = -(-request_count // row.concurrency) * row.concurrency
    csv_path = workdir / f"pa-{uuid.uuid4().hex[:8]}.csv"
    cmd = [
        str(settings.binary),
        "-v",  # per-window figures in the logs
        "-m",
        row.model,
        "-u",
        url,
        "-i",
        "http" if row.protocol == "http" else "grpc",
        "--input-data",
        str(input_data),
        "--measurement-interval",
        str(interval),
        "--max-trials",
        str(trials),
        "--stability-percentage",
        f"{stability_percentage or settings.stability_percentage:g}",
        "--verbose-csv",
        "-f",
        str(csv_path),
    ]
    if row.protocol == "grpc-stream":
        cmd.append("--streaming")
    if row.request_rate is not None:
        cmd += ["--request-rate-range", f"{row.request_rate:.0f}"]
    else:
        assert row.concurrency is not None
        cmd += ["--concurrency-range", str(row.concurrency)]
    if request_count > 0:
        cmd += ["--request-count", str(request_count)]
    if async_mode:
        cmd.append("--async")
    if max_threads is not None:
        cmd += ["--max-threads", str(max_threads)]
    cmd += settings.extra
    row.command = " ".join(cmd)
    limit = timeout_s or (interval / 1e3) * (trials + 3) + 30.0
    if request_count > 0 and timeout_s is None:
        limit = max(limit, 120.0)
    row.mode = (
        f"request-count {request_count}"
        if request_count > 0
        else f"time windows {interval} ms, <= {trials} trials, "
        f"stability {stability_percentage or settings.stability_percentage:g}%"
    )
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        output = proc.stdout + proc.stderr
        row.returncode = proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        row.returncode = None
        row.error = f"timed out after {limit:.0f}s"
    row.wall_s = round(time.monotonic() - start, 2)
    (workdir / f"{csv_path.stem}.log").write_text(f"$ {row.command}\n{output}")
    row.stable = not _UNSTABLE.search(output)
    if csv_path.exists():
        with open(csv_path, newline="") as fh:
            records = list(csv.DictReader(fh))
        if records:
            r = records[0]
            row.infer_per_s = _number(r, "Inferences/Second")
            row.p50_us = _number(r, "p50 latency")
            row.p90_us = _number(r, "p90 latency")
            row.p95_us = _number(r, "p95 latency")
            row.p99_us = _number(r, "p99 latency")
            row.avg_us = _number(r, "Avg latency")
    errors = _errors_in(output)
    if row.infer_per_s is None and row.error is None:
        row.error = (
            "; ".join(errors[:3])
            or f"perf_analyzer exited {row.returncode}: "
            + (output.strip().splitlines() or ["(no output)"])[-1]
        )
    elif errors and row.error is None and row.returncode not in (0, None):
        row.error = "; ".join(errors[:3])
    if row.infer_per_s and row.avg_us:
        row.little_inflight = round(row.infer_per_s * row.avg_us / 1e6, 1)
    return output


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def perf_analyzer_version(binary: Path) -> str:
    """The wheel's version (the binary reports 0.0.0) and the binary's own line."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    line = (proc.stdout + proc.stderr).strip().splitlines()
    wheels = sorted(binary.resolve().parent.parent.glob("dist/perf_analyzer-*.dist-info"))
    wheel = wheels[-1].name.removesuffix(".dist-info").replace("-", " ") if wheels else ""
    return "; ".join(p for p in (wheel, line[0] if line else "") if p)


@contextmanager
def server_counts(url: str, model: str, row: Row) -> Iterator[None]:
    """Fill ``row.server_success`` / ``server_fail`` with KServe ModelStatistics deltas."""

    def read() -> tuple[int, int] | None:
        import tritonclient.grpc as triton

        try:
            client = triton.InferenceServerClient(url)
            try:
                stats = client.get_inference_statistics(model).model_stats
            finally:
                client.close()
        except Exception:
            return None
        ok = sum(int(s.inference_stats.success.count) for s in stats)
        fail = sum(int(s.inference_stats.fail.count) for s in stats)
        return ok, fail

    before = read()
    try:
        yield
    finally:
        after = read()
        if before is not None and after is not None:
            row.server_success = after[0] - before[0]
            row.server_fail = after[1] - before[1]


# -- the runs -----------------------------------------------------------------------------


@dataclass
class Plan:
    concurrency: list[int]
    protocols: list[str]
    scenarios: list[str]
    perf: PerfSettings
    overload: bool = False
    overload_factor: float = 2.0
    overload_s: float = 5.0  # seconds' worth of requests at the overload rate
    loadgen: bool = True  # also run the repo's load harness beside perf_analyzer (Carrara)
    inflight: int = 0
    inflight_threads: int = 16
    inflight_workers: int = 64
    sleep_ms: float = 10.0
    store_url: str | None = None
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    triton: bool = True
    triton_instances: int = 1


@dataclass
class Report:
    machine: dict[str, Any]
    source: dict[str, Any]
    started_at: str
    finished_at: str
    carrara_front: str
    triton_version: str | None
    perf_analyzer: str
    settings: dict[str, Any]
    rows: list[Row]
    ratios: list[dict[str, Any]]
    overload: list[Row]
    inflight: list[Row]
    notes: list[str]


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "loadavg_start": list(os.getloadavg()),
    }


def source_info(label: str) -> dict[str, Any]:
    """Which Carrara was measured: the imported package and the repository's commit."""
    import carrara

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "label": label,
        "carrara_package": str(Path(carrara.__file__).parent),
        # The checkout the benchmark ran from (the package measured may be elsewhere: see
        # carrara_package and the label).
        "repo_head_at_start": git("rev-parse", "HEAD"),
        "repo_modified_files_at_start": len(git("status", "--porcelain").splitlines()),
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe(row: Row) -> str:
    load = f"c={row.concurrency}" if row.request_rate is None else f"rate={row.request_rate:.0f}/s"
    if row.error and row.infer_per_s is None:
        return f"{row.target} {row.scenario} {row.protocol} {load}: ERROR {row.error}"
    return (
        f"{row.target} {row.scenario} {row.protocol} {load}: {row.infer_per_s:,.0f} infer/s, "
        f"p50 {row.p50_us:,.0f} us, p99 {row.p99_us:,.0f} us"
        + ("" if row.stable else " (unstable)")
        + (f"  [{row.error}]" if row.error else "")
    )


@dataclass(frozen=True)
class Side:
    """One server as perf_analyzer sees it in a sweep."""

    target: str  # carrara | triton
    grpc: str
    http: str | None
    input_data: Path


def probe(plan: Plan, side: Side, protocol: str, workdir: Path) -> str | None:
    """A few requests over ``protocol``; the error when the server does not serve it (so the
    sweep records one failed row instead of waiting out every level's windows)."""
    url = side.http if protocol == "http" else side.grpc
    row = Row(target=side.target, scenario="probe", protocol=protocol, concurrency=1)
    run_perf_analyzer(
        plan.perf, row, url=url or "", input_data=side.input_data, workdir=workdir,
        request_count=20, timeout_s=30.0,
    )  # fmt: skip
    return None if row.infer_per_s is not None else (row.error or "no result")


def sweep(plan: Plan, rows: list[Row], sides: Sequence[Side], scenario: str, workdir: Path) -> None:
    """Every protocol x concurrency level, the sides back to back at each level (so a change
    in the machine's load between levels hits both alike)."""
    for protocol in plan.protocols:
        live = []
        for side in sides:
            url = side.http if protocol == "http" else side.grpc
            if url is None:
                continue
            error = probe(plan, side, protocol, workdir)
            if error is None:
                live.append(side)
                continue
            row = Row(
                target=side.target,
                scenario=scenario,
                protocol=protocol,
                concurrency=plan.concurrency[0],
                error=f"not served: {error}",
            )
            rows.append(row)
            _log("  " + _describe(row))
        for c in plan.concurrency:
            for side in live:
                url = side.http if protocol == "http" else side.grpc
                assert url is not None
                row = Row(target=side.target, scenario=scenario, protocol=protocol, concurrency=c)
                run_perf_analyzer(
                    plan.perf, row, url=url, input_data=side.input_data, workdir=workdir
                )
                rows.append(row)
                _log("  " + _describe(row))


def compute_ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Carrara / Triton per scenario, protocol and concurrency (throughput: > 1 favours
    Carrara; latency: < 1 favours Carrara)."""
    triton = {
        (r.scenario, r.protocol, r.concurrency): r
        for r in rows
        if r.target == TRITON and r.infer_per_s is not None
    }
    out = []
    for r in rows:
        if r.target != CARRARA or r.infer_per_s is None:
            continue
        t = triton.get((r.scenario, r.protocol, r.concurrency))
        if t is None or not t.infer_per_s:
            continue

        def ratio(a: float | None, b: float | None) -> float | None:
            return round(a / b, 3) if a is not None and b else None

        out.append(
            {
                "scenario": r.scenario,
                "protocol": r.protocol,
                "concurrency": r.concurrency,
                "throughput": ratio(r.infer_per_s, t.infer_per_s),
                "p50": ratio(r.p50_us, t.p50_us),
                "p99": ratio(r.p99_us, t.p99_us),
            }
        )
    return out


def saturation(rows: Sequence[Row], target: str) -> float | None:
    best = [
        r.infer_per_s
        for r in rows
        if r.target == target and r.protocol == "grpc" and r.infer_per_s and r.scenario != "miss"
    ]
    return max(best) if best else None


def loadgen(address: str, model: str, stage: Any) -> dict[str, Any]:
    """The repo's load harness (``carrara loadtest kserve://``, as a library) for one stage:
    unlike perf_analyzer it keeps going through failed requests and counts them by status."""
    from carrara.loadgen import EntitySpec, TargetSpec, run_stage

    spec = TargetSpec(
        kind="kserve",
        address=address,
        model=model,
        entities=EntitySpec(count=HOT_ENTITIES, prefix="h"),
        timeout_s=30.0,
    )
    try:
        result = run_stage(spec, stage)
    except Exception as exc:  # a complement to perf_analyzer; its failure is reported
        return {"error": f"{type(exc).__name__}: {exc}"}
    mode = (
        f"closed loop, {stage.concurrency} in flight"
        if stage.mode == "closed"
        else f"open loop, {stage.arrivals} arrivals at {stage.rate:,.0f}/s"
    )
    out: dict[str, Any] = {
        "tool": f"carrara loadtest (library), kserve target, {mode}, {stage.duration_s:g} s",
        "achieved_rate": round(result.achieved_rate, 1),
        "p50_ms": round(result.latency.p50_ms, 3),
        "p99_ms": round(result.latency.p99_ms, 3),
        "errors": dict(result.errors),
    }
    if stage.mode == "closed":  # latency from the actual send: Little's law holds
        out["little_inflight"] = round(result.achieved_rate * result.latency.mean_ms / 1e3, 1)
    return out


def run_overload(
    plan: Plan,
    rows: list[Row],
    out: list[Row],
    *,
    target: str,
    grpc: str,
    input_data: Path,
    workdir: Path,
) -> None:
    """perf_analyzer at ``overload_factor`` x the measured saturation, async, over a fixed
    number of requests (``overload_s`` seconds' worth at that rate)."""
    from carrara.loadgen import StagePlan

    sat = saturation(rows, target)
    if sat is None:
        _log(f"  overload {target}: no saturation figure (no gRPC rows); skipped")
        return
    rate = plan.overload_factor * sat
    count = int(rate * plan.overload_s)
    row = Row(target=target, scenario="overload", protocol="grpc", request_rate=rate)
    with server_counts(grpc, MODEL, row):
        run_perf_analyzer(
            plan.perf, row, url=grpc, input_data=input_data, workdir=workdir,
            async_mode=True, max_threads=8, request_count=count,
            timeout_s=count / max(sat / 2, 1.0) + 60,
        )  # fmt: skip
    if target == CARRARA and plan.loadgen:
        stage = StagePlan(rate=rate, arrivals="poisson", duration_s=plan.overload_s, warmup_s=1.0)
        row.loadgen = loadgen(grpc, MODEL, stage)
    out.append(row)
    _log(
        f"  {_describe(row)}; server counted ok={row.server_success} fail={row.server_fail}"
        + (f"; loadgen {row.loadgen}" if row.loadgen else "")
    )


def run_inflight(
    plan: Plan, out: list[Row], *, target: str, grpc: str, input_data: Path, workdir: Path
) -> None:
    """``plan.inflight`` requests kept in flight against the ``sleep_ms`` model: perf_analyzer
    async over 8 x N requests (plus, for Carrara, the load harness closed loop at N)."""
    from carrara.loadgen import StagePlan

    row = Row(
        target=target,
        scenario=f"inflight-{plan.sleep_ms:g}ms",
        protocol="grpc",
        concurrency=plan.inflight,
        model=SLEEP_MODEL,
    )
    count = 8 * plan.inflight
    with server_counts(grpc, SLEEP_MODEL, row):
        run_perf_analyzer(
            plan.perf, row, url=grpc, input_data=input_data, workdir=workdir,
            async_mode=True, max_threads=plan.inflight_threads, request_count=count,
            timeout_s=300.0,
        )  # fmt: skip
    if target == CARRARA and plan.loadgen:
        stage = StagePlan(mode="closed", concurrency=plan.inflight, duration_s=6.0, warmup_s=2.0)
        row.loadgen = loadgen(grpc, SLEEP_MODEL, stage)
    out.append(row)
    _log(
        f"  {_describe(row)}; Little's-law in flight {row.little_inflight}"
        + (f"; loadgen {row.loadgen}" if row.loadgen else "")
    )


def run(
    plan: Plan, launcher: CarraraLauncher, front_name: str, workdir: Path, label: str = ""
) -> Report:
    from carrara.gateway.onnx_models import write_linear_model

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = machine_info()
    source = source_info(label)
    nonce = uuid.uuid4().hex[:8]
    data = write_input_data(workdir / "input-data", nonce)
    model_path = write_linear_model(workdir / "linear.onnx", WEIGHTS, BIAS, output_name="score")
    rows: list[Row] = []
    overload: list[Row] = []
    inflight: list[Row] = []
    notes: list[str] = []
    front = front_name
    hot = tuple(hot_ids())
    triton_version = None
    with contextlib.ExitStack() as stack:
        triton: TritonEndpoint | None = None
        if plan.triton:
            _log("triton: starting tritonserver")
            triton = stack.enter_context(
                start_triton(
                    workdir / "triton",
                    instances=plan.triton_instances,
                    sleep_ms=plan.sleep_ms if plan.inflight else 0.0,
                )
            )
            triton_version = triton.version
        for scenario in plan.scenarios:
            setup = CarraraSetup(
                model_path=model_path,
                cache=scenario,
                store_ids=hot if scenario == "hit" else hot + tuple(miss_ids(nonce)),
                store_url=plan.store_url,
                max_batch_size=plan.max_batch_size,
                max_queue_delay_us=plan.max_queue_delay_us,
            )
            _log(f"carrara {scenario}: starting the gateway")
            with launcher(setup) as endpoint:
                front = endpoint.front
                sides = [Side(CARRARA, endpoint.grpc, endpoint.http, data[f"carrara-{scenario}"])]
                if triton is not None:
                    sides.append(Side(TRITON, triton.grpc, triton.http, data["triton"]))
                sweep(plan, rows, sides, scenario, workdir)
                if plan.overload and scenario == "hit":
                    run_overload(
                        plan, rows, overload, target=CARRARA, grpc=endpoint.grpc,
                        input_data=data["carrara-hit"], workdir=workdir,
                    )  # fmt: skip
        if plan.overload and triton is not None:
            run_overload(
                plan, rows, overload, target=TRITON, grpc=triton.grpc,
                input_data=data["triton"], workdir=workdir,
            )  # fmt: skip
        if plan.inflight:
            setup = CarraraSetup(
                model_path=model_path,
                cache="hit",
                store_ids=hot,
                sleep_ms=plan.sleep_ms,
                max_in_flight=2 * plan.inflight,
                threads=plan.inflight_workers,
            )
            _log(f"carrara in-flight {plan.inflight}: starting the gateway ({plan.sleep_ms:g} ms)")
            with launcher(setup) as endpoint:
                run_inflight(
                    plan, inflight, target=CARRARA, grpc=endpoint.grpc,
                    input_data=data["carrara-hit"], workdir=workdir,
                )  # fmt: skip
            if triton is not None:
                run_inflight(
                    plan, inflight, target=TRITON, grpc=triton.grpc,
                    input_data=data["triton-batched"], workdir=workdir,
                )  # fmt: skip
    machine["loadavg_end"] = list(os.getloadavg())
    what = {
        "http": "KServe v2 over HTTP (/v2/models/...)",
        "grpc-stream": "gRPC ModelStreamInfer (perf_analyzer --streaming)",
        "grpc": "KServe v2 gRPC ModelInfer",
    }
    seen: set[str] = set()
    for r in rows:
        served = not (r.error and r.error.startswith("not served"))
        if r.target == CARRARA and not served and r.protocol not in seen:
            seen.add(r.protocol)
            notes.append(
                f"carrara {r.protocol}: this front does not serve {what[r.protocol]} to "
                f"perf_analyzer; {r.error}"
            )
    for r in overload + inflight:
        if r.target == CARRARA and r.error and "CANCELLED" in r.error:
            notes.append(
                f"carrara {r.scenario}: perf_analyzer's requests were answered CANCELLED by the "
                "gateway's gRPC server (not by the gateway's own admission, which refuses with "
                "RESOURCE_EXHAUSTED and is counted as a ModelStatistics failure)."
            )
    notes.append(
        "perf_analyzer aborts a run at the first failed request (exit 99), so refusals are "
        "counted by the servers' ModelStatistics and, for Carrara, by the open-loop harness."
    )
    notes.append(
        "perf_analyzer runs on the same cores as both servers; on a small machine it takes a "
        "large share of the CPU, so absolute figures are low for both and the ratio is what "
        "counts."
    )
    return Report(
        machine=machine,
        source=source,
        started_at=started,
        finished_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        carrara_front=front,
        triton_version=triton_version,
        perf_analyzer=perf_analyzer_version(plan.perf.binary),
        settings={
            "concurrency": plan.concurrency,
            "protocols": plan.protocols,
            "scenarios": plan.scenarios,
            "measurement_interval_ms": plan.perf.measurement_interval_ms,
            "max_trials": plan.perf.max_trials,
            "stability_percentage": plan.perf.stability_percentage,
            "request_count": plan.perf.request_count or None,
            "fallback_stability_percentage": plan.perf.fallback_stability_percentage,
            "hot_entities": HOT_ENTITIES,
            "miss_ids": MISS_IDS,
            "triton_instances": plan.triton_instances,
            "triton_model": "python backend running onnxruntime (CPU, 1 intra-op thread)",
            "overload_factor": plan.overload_factor if plan.overload else None,
            "overload_s": plan.overload_s if plan.overload else None,
            "inflight": plan.inflight or None,
            "sleep_ms": plan.sleep_ms if plan.inflight else None,
        },
        rows=rows,
        ratios=compute_ratios(rows),
        overload=overload,
        inflight=inflight,
        notes=notes,
    )


# -- the report ---------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_table(report: Report) -> str:
    triton = {(r.scenario, r.protocol, r.concurrency): r for r in report.rows if r.target == TRITON}
    ratios = {(r["scenario"], r["protocol"], r["concurrency"]): r for r in report.ratios}
    lines = [
        f"Carrara front: {report.carrara_front}; Triton {report.triton_version or '-'}; "
        f"{report.perf_analyzer}",
        f"Machine: {report.machine['nproc']} CPUs ({report.machine['cpu_model']}), load "
        f"{report.machine['loadavg_start'][0]:.1f} -> "
        f"{report.machine.get('loadavg_end', [0.0])[0]:.1f}",
        "",
        "| scenario | protocol | c | Carrara infer/s | p50 µs | p99 µs | Triton infer/s | p50 µs "
        "| p99 µs | infer/s ratio | p50 ratio | p99 ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    carrara = {
        (r.scenario, r.protocol, r.concurrency): r for r in report.rows if r.target == CARRARA
    }
    keys = list(dict.fromkeys((r.scenario, r.protocol, r.concurrency) for r in report.rows))

    def cells(row: Row | None) -> str:
        if row is None:
            return "- | - | -"
        if row.infer_per_s is None:
            return f"error: {(row.error or '')[:60]} | - | -"
        return f"{_fmt(row.infer_per_s)} | {_fmt(row.p50_us)} | {_fmt(row.p99_us)}"

    for key in keys:
        q = ratios.get(key, {})
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {cells(carrara.get(key))} | "
            f"{cells(triton.get(key))} | {_fmt(q.get('throughput'), 2)} | "
            f"{_fmt(q.get('p50'), 2)} | {_fmt(q.get('p99'), 2)} |"
        )
    extra = report.overload + report.inflight
    if extra:
        lines += [
            "",
            "| scenario | target | load | infer/s | p50 µs | p99 µs | server ok / fail | "
            "in flight (Little) | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in extra:
            load = (
                f"{r.request_rate:,.0f} req/s"
                if r.request_rate is not None
                else f"c={r.concurrency}"
            )
            note = r.error or ""
            if r.loadgen:
                lg = r.loadgen
                note += (
                    f"{'; ' if note else ''}loadgen: {lg.get('achieved_rate')}/s ok, "
                    f"p99 {lg.get('p99_ms')} ms, errors {lg.get('errors', lg.get('error'))}"
                )
            lines.append(
                f"| {r.scenario} | {r.target} | {load} | {_fmt(r.infer_per_s)} | "
                f"{_fmt(r.p50_us)} | {_fmt(r.p99_us)} | {r.server_success} / {r.server_fail} | "
                f"{_fmt(r.little_inflight)} | {note[:160]} |"
            )
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report), indent=2, default=str)


# -- the command line ---------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str, allowed: Sequence[str]) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.kserve_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 16, 64], help="e.g. 1,8,16,64")
    p.add_argument(
        "--protocols",
        type=lambda s: _names(s, PROTOCOLS),
        default=["grpc", "http"],
        help="grpc,http (HTTP: where the server speaks KServe v2 HTTP)",
    )
    p.add_argument("--streaming", action="store_true", help="also gRPC with --streaming")
    p.add_argument("--scenarios", type=lambda s: _names(s, SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--measurement-interval", type=int, default=2_000, help="ms per window")
    p.add_argument("--max-trials", type=int, default=6)
    p.add_argument("--stability-percentage", type=float, default=25.0)
    p.add_argument(
        "--request-count",
        type=int,
        default=0,
        metavar="N",
        help="measure each run once over N requests (no stabilisation windows)",
    )
    p.add_argument(
        "--fallback-stability-percentage",
        type=float,
        default=100.0,
        help="when windows do not stabilise, measure once more with this bound (0: do not)",
    )
    p.add_argument("--perf-analyzer", type=Path, default=PERF_ANALYZER)
    p.add_argument(
        "--carrara",
        choices=sorted(CARRARA_LAUNCHERS),
        default="python",
        help="in-process front to start (ignored with --carrara-grpc)",
    )
    p.add_argument("--carrara-grpc", metavar="HOST:PORT", help="use a running gateway")
    p.add_argument(
        "--carrara-grpc-miss",
        metavar="HOST:PORT",
        help="running gateway for the miss scenario (default: --carrara-grpc; the miss ids are "
        "fresh per run, so they miss its cache the first time round)",
    )
    p.add_argument("--carrara-http", metavar="HOST:PORT", help="its KServe v2 HTTP port, if any")
    p.add_argument("--no-triton", action="store_true", help="Carrara only")
    p.add_argument("--triton-instances", type=int, default=1, help="python-backend instances")
    p.add_argument("--overload", action="store_true", help="2x-saturation request-rate run")
    p.add_argument("--overload-factor", type=float, default=2.0)
    p.add_argument("--overload-seconds", type=float, default=5.0, help="requests' worth")
    p.add_argument(
        "--no-loadgen",
        action="store_true",
        help="overload / in-flight: skip the repo's load harness beside perf_analyzer",
    )
    p.add_argument(
        "--inflight", type=int, default=0, metavar="N", help="N-in-flight run (e.g. 5000)"
    )
    p.add_argument("--inflight-threads", type=int, default=16, help="perf_analyzer threads")
    p.add_argument(
        "--inflight-workers", type=int, default=64, help="gateway pool threads (sleep model)"
    )
    p.add_argument("--sleep-ms", type=float, default=10.0, help="the in-flight model's time")
    p.add_argument(
        "--store-url",
        help="online store the gateway reads (e.g. redis://127.0.0.1:6379/0; the data is "
        "written under a fresh namespace); default: an in-process dict",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="gateway dynamic batching")
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="gateway batching delay")
    p.add_argument("--workdir", type=Path, help="keep input data, CSVs and logs here")
    p.add_argument("--label", default="", help="what was measured, for the JSON")
    p.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "kserve_compare.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.perf_analyzer.exists():
        print(
            f"no perf_analyzer at {args.perf_analyzer}; run `make perf-analyzer`", file=sys.stderr
        )
        return 2
    protocols = list(args.protocols) + (["grpc-stream"] if args.streaming else [])
    plan = Plan(
        concurrency=args.concurrency,
        protocols=list(dict.fromkeys(protocols)),
        scenarios=args.scenarios,
        perf=PerfSettings(
            binary=args.perf_analyzer,
            measurement_interval_ms=args.measurement_interval,
            max_trials=args.max_trials,
            stability_percentage=args.stability_percentage,
            request_count=args.request_count,
            fallback_stability_percentage=args.fallback_stability_percentage,
        ),
        overload=args.overload,
        overload_factor=args.overload_factor,
        overload_s=args.overload_seconds,
        loadgen=not args.no_loadgen,
        inflight=args.inflight,
        inflight_threads=args.inflight_threads,
        inflight_workers=args.inflight_workers,
        sleep_ms=args.sleep_ms,
        store_url=args.store_url,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        triton=not args.no_triton,
        triton_instances=args.triton_instances,
    )
    if args.carrara_grpc:
        hit = external_launcher(args.carrara_grpc, args.carrara_http)
        miss = external_launcher(args.carrara_grpc_miss or args.carrara_grpc, args.carrara_http)

        @contextmanager
        def launcher(setup: CarraraSetup) -> Iterator[CarraraEndpoint]:
            with (hit if setup.cache == "hit" else miss)(setup) as endpoint:
                yield endpoint

        chosen: CarraraLauncher = launcher
        front_name = f"external gateway at {args.carrara_grpc}"
    else:
        chosen = CARRARA_LAUNCHERS[args.carrara]
        front_name = args.carrara
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(TemporaryDirectory(prefix="kserve-compare-")))
        report = run(plan, chosen, front_name, workdir, args.label)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(report) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
