"""Artifacts, checkpoints and the offline store on ``s3://`` against a real S3-compatible server
(moto in server mode, started by the fixtures): sha256-verified artifacts, checkpoints that
appear whole or not at all (also when the writer is killed mid-upload), corrupt checkpoints
skipped as on local disk, and point-in-time training sets equal to those of a local root."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from carrara.errors import ConfigError, NotFoundError
from carrara.feature_cache import FeatureService
from carrara.registry.artifacts import ArtifactIntegrityError, ArtifactStore
from carrara.training.checkpoints import CheckpointStore, decode
from tests.s3_server import S3Server, clear_fsspec_s3
from tests.training_data import DAY_US, T0_US, write_stats_job

ROOT = Path(__file__).resolve().parents[3]


def _put(server: S3Server, bucket: str, key: str, body: bytes) -> None:
    """Change an object behind Carrara's back (another writer, bit rot, a bad copy)."""
    server.client().put_object(Bucket=bucket, Key=key, Body=body)


def _get(server: S3Server, bucket: str, key: str) -> bytes:
    data: bytes = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


# -- artifacts ----------------------------------------------------------------------------------


def test_artifact_round_trip_and_sha256_mismatch(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = ArtifactStore(f"s3://{s3_bucket}/artifacts/")
    assert store.root == f"s3://{s3_bucket}/artifacts"
    data = os.urandom(300_000)
    a = store.put("fraud", "model", data, suffix=".onnx")
    source = tmp_path / "native.joblib"
    source.write_bytes(b"native" * 10_000)
    b = store.put("fraud", "native", source, suffix=".joblib")
    assert a.path.startswith(f"s3://{s3_bucket}/artifacts/fraud/") and a.path.endswith(".onnx")
    assert (a.sha256, a.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert b.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    keys = s3_server.keys(s3_bucket)
    assert keys == sorted(p.removeprefix(f"s3://{s3_bucket}/") for p in (a.path, b.path))
    # Another process (a fresh filesystem instance) reads and verifies them.
    clear_fsspec_s3()
    reader = ArtifactStore(f"s3://{s3_bucket}/artifacts")
    assert reader.load(a.path, a.sha256) == data
    reader.verify(b.path, b.sha256)

    key = a.path.removeprefix(f"s3://{s3_bucket}/")
    _put(s3_server, s3_bucket, key, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactIntegrityError, match="registered " + a.sha256):
        reader.load(a.path, a.sha256)
    with pytest.raises(ArtifactIntegrityError, match="fails its integrity check"):
        reader.verify(a.path, a.sha256)
    _put(s3_server, s3_bucket, key, data[:1000])  # truncated
    with pytest.raises(ArtifactIntegrityError):
        reader.load(a.path, a.sha256)
    reader.delete(a.path)
    with pytest.raises(NotFoundError, match="missing from the artifact store"):
        reader.load(a.path, a.sha256)


# -- checkpoints --------------------------------------------------------------------------------


def test_checkpoints_round_trip_retention_and_resume(s3_server: S3Server, s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/artifacts/checkpoints"
    store = CheckpointStore(root, "job1", keep=2)
    for epoch in range(5):
        path = store.save(epoch, f"state-{epoch}".encode() * 100, early_stopping={"bad": epoch})
        assert path == f"{root}/job1/main/epoch-{epoch:06d}.ckpt"
    assert store.epochs() == [3, 4]
    # What S3 holds: exactly the two newest, no temporary objects.
    assert s3_server.keys(s3_bucket) == [
        "artifacts/checkpoints/job1/main/epoch-000003.ckpt",
        "artifacts/checkpoints/job1/main/epoch-000004.ckpt",
    ]
    # A restarted worker (new process: new filesystem instance) resumes from the newest.
    clear_fsspec_s3()
    resumed = CheckpointStore(root, "job1", keep=2)
    latest = resumed.latest()
    assert latest is not None
    assert (latest.epoch, latest.state, latest.early_stopping) == (4, b"state-4" * 100, {"bad": 4})
    # The first process's listing is not stale: it sees what the second one wrote.
    resumed.save(5, b"state-5")
    assert store.epochs() == [4, 5]
    newest = store.latest()
    assert newest is not None and newest.state == b"state-5"
    trial = store.scoped("trial-0")
    assert trial.load_model() is None
    trial.save_model(b"native-bytes")
    assert trial.load_model() == b"native-bytes"
    store.delete_job()
    assert s3_server.keys(s3_bucket) == [] and store.latest() is None


@pytest.mark.parametrize("damage", ["torn", "flipped", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_as_locally(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, damage: str
) -> None:
    stores = [
        CheckpointStore(f"s3://{s3_bucket}/ckpt", "job", keep=3),
        CheckpointStore(str(tmp_path / "ckpt"), "job", keep=3),
    ]
    for store in stores:
        store.save(1, b"A" * 1000)
        newest = store.save(2, b"B" * 1000)
        if newest.startswith("s3://"):
            key = newest.removeprefix(f"s3://{s3_bucket}/")
            data = _get(s3_server, s3_bucket, key)
        else:
            data = Path(newest).read_bytes()
        bad = {
            "torn": data[: len(data) - 10],
            "flipped": data[:-1] + bytes([data[-1] ^ 1]),
            "garbage": b"not a checkpoint",
            "empty": b"",
        }[damage]
        if newest.startswith("s3://"):
            _put(s3_server, s3_bucket, key, bad)
        else:
            Path(newest).write_bytes(bad)
        latest = store.latest()
        assert latest is not None and (latest.epoch, latest.state) == (1, b"A" * 1000), newest


@pytest.fixture
def slow_multipart(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3fs uploads in 5 MiB parts (the S3 minimum) at about 20 parts a second, so a few MB
    make a multipart upload that takes a while: a reader can poll during it."""
    import s3fs

    defaults = s3fs.S3FileSystem._pipe_file.__defaults__
    assert defaults is not None and defaults[0] == 50 * 2**20  # (chunksize, concurrency, mode)
    monkeypatch.setattr(s3fs.S3FileSystem._pipe_file, "__defaults__", (5 * 2**20, 1, *defaults[2:]))
    call = s3fs.S3FileSystem._call_s3

    async def slow_call(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":
            import asyncio

            await asyncio.sleep(0.05)
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", slow_call)


@pytest.mark.usefixtures("slow_multipart")
def test_a_reader_polling_never_sees_a_partial_checkpoint(
    s3_server: S3Server, s3_bucket: str
) -> None:
    store = CheckpointStore(f"s3://{s3_bucket}/ckpt", "job", keep=2)
    state = os.urandom(26 * 2**20)  # 6 parts
    key = "ckpt/job/main/epoch-000000.ckpt"
    client = s3_server.client()
    seen = {"absent": 0, "whole": 0, "partial": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() or not seen["whole"]:
            try:
                body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:
                seen["absent"] += 1
                time.sleep(0.01)
                continue
            ok = decode(body) is not None and decode(body).state == state  # type: ignore[union-attr]
            seen["whole" if ok else "partial"] += 1
            if ok:
                return

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    store.save(0, state)
    done.set()
    reader.join(30)
    assert seen["partial"] == 0 and seen["whole"] == 1 and seen["absent"] >= 3, seen
    assert s3_server.in_progress_uploads(s3_bucket) == []


_KILLED_WRITER = """
import asyncio, os, sys
import s3fs
from carrara.training.checkpoints import CheckpointStore

# 5 MiB parts, one at a time, each slowed down: the upload is still running when killed.
s3fs.S3FileSystem._pipe_file.__defaults__ = (5 * 2**20, 1, "overwrite")
call = s3fs.S3FileSystem._call_s3
async def slow(self, method, *args, **kwargs):
    if method == "upload_part":
        print("part", flush=True)
        await asyncio.sleep(0.5)
    return await call(self, method, *args, **kwargs)
s3fs.S3FileSystem._call_s3 = slow
CheckpointStore(sys.argv[1], "job", keep=2).save(1, os.urandom(26 * 2**20))
print("finished", flush=True)
"""


def test_a_writer_killed_mid_upload_leaves_no_object(s3_server: S3Server, s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/ckpt"
    CheckpointStore(root, "job", keep=2).save(0, b"good")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), root],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"part\n"
        assert proc.stdout.readline() == b"part\n"  # the first part is in
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert s3_server.in_progress_uploads(s3_bucket) == ["ckpt/job/main/epoch-000001.ckpt"]
    assert s3_server.keys(s3_bucket) == ["ckpt/job/main/epoch-000000.ckpt"]
    store = CheckpointStore(root, "job", keep=2)
    latest = store.latest()
    assert store.epochs() == [0] and latest is not None and latest.state == b"good"


# -- the offline store --------------------------------------------------------------------------


@pytest.fixture
def two_feature_services(s3_bucket: str, tmp_path: Path) -> Iterator[list[FeatureService]]:
    services = [
        FeatureService.open(
            catalog_url=f"sqlite:///{tmp_path / name}.db", offline_path=offline_path
        )
        for name, offline_path in (
            ("local", str(tmp_path / "offline")),
            ("s3", f"s3://{s3_bucket}/offline"),
        )
    ]
    try:
        yield services
    finally:
        for s in services:
            s.close()


def test_offline_store_on_s3_equals_a_local_root(
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    two_feature_services: list[FeatureService],
) -> None:
    rng = np.random.default_rng(3)
    n = 400
    late = pd.DataFrame(  # a second append: late rows over several days, some replacing
        {
            "id": [f"e{i}" for i in rng.integers(0, n, 300)],
            "event_timestamp": T0_US + rng.integers(0, 5 * DAY_US, 300),
            "x": rng.normal(size=300),
            "y": rng.normal(size=300),
        }
    )
    labels = pd.DataFrame(
        {
            "id": [f"e{i}" for i in rng.integers(0, n + 20, 1000)],  # some unknown entities
            "event_timestamp": pd.to_datetime(
                T0_US + rng.integers(-DAY_US, 6 * DAY_US, 1000), unit="us", utc=True
            ),
        }
    )
    tables = []
    for i, features in enumerate(two_feature_services):
        folder = tmp_path / f"job{i}"
        folder.mkdir()
        write_stats_job(features, folder, n, seed=1)
        features.ingest("stats", late.assign(created_timestamp=T0_US + 6 * DAY_US))
        first = features.get_training_set(labels, ["stats:x", "stats:y"])
        features.compact("stats")
        again = features.get_training_set(labels, ["stats:*"])
        assert again.table.equals(first.table)
        tables.append(first.table)
    assert tables[0].equals(tables[1])
    keys = s3_server.keys(s3_bucket)
    assert keys and all(k.startswith("offline/stats/v1/date=") for k in keys), keys
    partitions = [k.rsplit("/", 1)[0] for k in keys]
    assert len(set(partitions)) == len(partitions) > 1  # compacted: one file per date
    assert all(k.endswith(".parquet") for k in keys)  # no temporary objects
    # A reader in another process (fresh filesystem) sees the same files.
    clear_fsspec_s3()
    other = FeatureService.open(
        catalog_url=f"sqlite:///{tmp_path / 's3'}.db", offline_path=f"s3://{s3_bucket}/offline"
    )
    try:
        assert other.get_training_set(labels, ["stats:x", "stats:y"]).table.equals(tables[0])
    finally:
        other.close()


def test_spark_engine_on_s3_says_what_is_missing(s3_bucket: str) -> None:
    pytest.importorskip("pyspark")
    from carrara.feature_cache.spark_store import SparkOfflineStore

    store = SparkOfflineStore(f"s3://{s3_bucket}/offline")  # the session other tests share
    try:
        with pytest.raises(ConfigError, match=r"no Hadoop filesystem for s3a://.*hadoop-aws"):
            store._spark_paths([f"{s3_bucket}/offline/g/v1/date=2026-01-01/p.parquet"])
    finally:
        store.close()


# -- end to end ---------------------------------------------------------------------------------

XGB_SPEC = """
model_name: score
dataset:
  features: ["stats:x", "stats:y"]
  label_source: labels.csv
  label_column: target
  entity_column: id
model:
  framework: xgboost
  estimator: gradient_boosting
  task: regression
  params: {n_estimators: 12}
checkpoint: {every_epochs: 3, keep: 2}
"""


def test_training_on_s3_registers_and_serves_from_the_bucket(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose offline store, artifacts and checkpoints are all in the bucket: the model
    registered there is what the gateway's engine loads (sha256-checked) and serves."""
    import onnxruntime as ort

    from carrara.core import FeatureCache
    from carrara.gateway.embedded import StoreReader
    from carrara.gateway.engine import ServingEngine
    from carrara.gateway.registry_source import load_active
    from carrara.registry.auth import Principal
    from carrara.registry.registry import ModelRegistry
    from carrara.training.queue import JobQueue
    from carrara.training.spec import load_spec
    from carrara.training.worker import Worker

    saved: list[str] = []
    save = CheckpointStore.save

    def spy(self: CheckpointStore, *args: Any, **kwargs: Any) -> str:
        path = save(self, *args, **kwargs)
        saved.append(path)
        return path

    monkeypatch.setattr(CheckpointStore, "save", spy)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    artifacts = f"s3://{s3_bucket}/artifacts"
    with (
        FeatureService.open(catalog_url=url, offline_path=f"s3://{s3_bucket}/offline") as fs,
        ModelRegistry.open(url, artifacts) as registry,
        JobQueue.open(url) as queue,
    ):
        write_stats_job(fs, tmp_path, 200, seed=5)
        (tmp_path / "job.yaml").write_text(XGB_SPEC)
        job = queue.submit(load_spec(tmp_path / "job.yaml"), submitted_by="ana")
        (done,) = Worker(queue, features=fs, registry=registry).run(until_idle=True)
        assert done.state == "SUCCEEDED", done.error
        v = registry.get_version("score", done.result["version"])
        assert v.metrics["rmse"] < 1.5
        assert v.artifact_path.startswith(f"{artifacts}/score/")
        assert v.native_artifact_path.startswith(f"{artifacts}/score/")
        assert saved and all(
            p.startswith(f"{artifacts}/checkpoints/{job.job_id}/main/") for p in saved
        )
        keys = s3_server.keys(s3_bucket, "artifacts/")
        assert keys == sorted(
            p.removeprefix(f"s3://{s3_bucket}/") for p in (v.artifact_path, v.native_artifact_path)
        )  # the checkpoints were removed once the job succeeded
        registry.deploy("score", v.version, actor=Principal("ci", frozenset({"deployer"})))

        fs.materialize(full=True)
        clear_fsspec_s3()  # the gateway: another process, its own connection to the bucket
        engine = ServingEngine(StoreReader(fs.online), cache=FeatureCache(capacity=100))
        try:
            assert load_active(registry, engine, ["score"]) == ["score"]
            served = engine.predict("score", ["e1", "e2", "e3"]).outputs[:, 0]
        finally:
            engine.close()
        onnx = _get(s3_server, s3_bucket, v.artifact_path.removeprefix(f"s3://{s3_bucket}/"))
        assert hashlib.sha256(onnx).hexdigest() == v.artifact_sha256
        session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        online = fs.get_online("stats", ["e1", "e2", "e3"], ["x", "y"], require_found=True)
        x = np.asarray(online.values, np.float32)
        (expected,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
        np.testing.assert_allclose(served, expected[:, 0], atol=1e-5)
