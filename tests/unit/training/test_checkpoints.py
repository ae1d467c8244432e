"""The checkpoint store: layout, atomic writes, retention, torn/corrupt files skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carrara.errors import InvalidArgumentError
from carrara.registry.registry import ModelRegistry
from carrara.training.checkpoints import CheckpointStore, checkpoint_root, decode


def test_layout_retention_and_latest(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), "job1", keep=2)
    for epoch in range(5):
        path = store.save(epoch, f"state-{epoch}".encode(), early_stopping={"bad": epoch})
        assert path == f"{tmp_path}/ckpt/job1/main/epoch-{epoch:06d}.ckpt"
    assert store.epochs() == [3, 4]  # only the newest two are kept
    assert sorted(os.listdir(tmp_path / "ckpt/job1/main")) == [
        "epoch-000003.ckpt",
        "epoch-000004.ckpt",
    ]  # no temp files left behind
    latest = store.latest()
    assert latest is not None
    assert (latest.epoch, latest.state, latest.early_stopping) == (4, b"state-4", {"bad": 4})
    trial = store.scoped("trial-3")
    assert trial.latest() is None and trial.epochs() == []
    trial.save(0, b"t")
    assert trial.run_dir == f"{tmp_path}/ckpt/job1/trial-3"
    store.delete_job()
    assert not (tmp_path / "ckpt/job1").exists() and store.latest() is None


@pytest.mark.parametrize("damage", ["torn", "flipped", "garbage", "empty"])
def test_latest_skips_a_damaged_newest_file(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(str(tmp_path), "job", keep=3)
    store.save(1, b"A" * 1000)
    newest = Path(store.save(2, b"B" * 1000))
    data = newest.read_bytes()
    if damage == "torn":  # a write cut short (no atomic rename on some store)
        newest.write_bytes(data[: len(data) - 10])
    elif damage == "flipped":
        newest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "garbage":
        newest.write_bytes(b"not a checkpoint")
    else:
        newest.write_bytes(b"")
    assert decode(newest.read_bytes()) is None
    latest = store.latest()
    assert latest is not None and latest.epoch == 1 and latest.state == b"A" * 1000


def test_a_file_renamed_to_another_epoch_is_not_trusted(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job", keep=3)
    store.save(1, b"one")
    os.rename(store.path(1), store.path(7))
    assert store.latest() is None


def test_trial_model_round_trip_and_fsspec_store() -> None:
    store = CheckpointStore("memory://carrara-test-ckpt", "job9", "trial-0", keep=1)
    store.save(0, b"x")
    store.save(1, b"y")
    assert store.epochs() == [1]
    latest = store.latest()
    assert latest is not None and latest.state == b"y"
    assert store.load_model() is None
    store.save_model(b"native-bytes")
    assert store.load_model() == b"native-bytes"
    store.delete_job()
    assert store.epochs() == [] and store.load_model() is None


def test_store_lives_under_the_registry_artifact_root(tmp_path: Path) -> None:
    with ModelRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts") as reg:
        root = checkpoint_root(reg)
        assert root == f"{tmp_path / 'artifacts'}/checkpoints"
        store = CheckpointStore.for_registry(reg, "j", keep=1)
        store.save(0, b"s")
        assert (tmp_path / "artifacts/checkpoints/j/main/epoch-000000.ckpt").is_file()


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="keep must be >= 1"):
        CheckpointStore("/tmp", "j", keep=0)
    with pytest.raises(InvalidArgumentError, match=r"run '\.\./x'"):
        CheckpointStore("/tmp", "j", "../x")
