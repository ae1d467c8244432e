"""`carrara train submit | list | status | cancel | worker --until-idle` on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from carrara.cli import main
from carrara.config import load_settings
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.registry.registry import ModelRegistry

from ...training_data import SPEC, stats_definitions, write_stats_job


def test_train_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CARRARA_DATA_ROOTS", str(tmp_path))  # the worker reads labels.csv there
    monkeypatch.delenv("CARRARA_CONFIG", raising=False)
    monkeypatch.delenv("CARRARA_REGISTRY_URL", raising=False)
    monkeypatch.delenv("CARRARA_EVENT_LOG_URL", raising=False)
    with FeatureService.from_settings(load_settings()) as features:
        write_stats_job(features, tmp_path, 80)
    (tmp_path / "bad.yaml").write_text(SPEC.replace("stats:y", "stats:nope"))

    assert main(["train", "submit", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown feature 'stats:nope'" in capsys.readouterr().err
    assert main(["train", "submit", str(tmp_path / "job.yaml")]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["train", "submit", str(tmp_path / "job.yaml")]) == 0
    other = capsys.readouterr().out.strip()
    assert main(["train", "cancel", other]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert main(["train", "list", "--state", "QUEUED"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["train", "worker", "--until-idle"]) == 0
    assert "SUCCEEDED  score  -> score v1" in capsys.readouterr().out
    assert main(["train", "status", job_id]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    # `watch` reads the training-events topic: a job's transitions, exit 0 when it succeeded,
    # 1 when it ended otherwise; without a job, every retained change once.
    assert main(["train", "watch", job_id, "--poll", "0.05"]) == 0
    states = [line.split()[2] for line in capsys.readouterr().out.splitlines()]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert main(["train", "watch", other, "--poll", "0.05"]) == 1
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()] == [
        "QUEUED",
        "CANCELLED",
    ]
    assert main(["train", "watch", "--poll", "0.05"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5

    settings = load_settings()
    with ModelRegistry.open(settings.resolved_registry_url, settings.resolved_artifact_path) as r:
        v = r.get_version("score", 1)
        assert v.run_id == job_id and v.metrics["rmse"] < 0.2


def test_train_logs_and_triggers_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CARRARA_TRAINING_GPUS_PER_NODE", "3")
    monkeypatch.setenv("CARRARA_DATA_ROOTS", str(tmp_path))  # submit checks the label file
    for name in ("CARRARA_CONFIG", "CARRARA_REGISTRY_URL", "CARRARA_EVENT_LOG_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "labels.csv").write_text("id,event_timestamp,target\n")
    with FeatureService.from_settings(load_settings()) as features:
        features.apply(stats_definitions())
    (tmp_path / "job.yaml").write_text(SPEC)
    (tmp_path / "gpu4.yaml").write_text(SPEC + "resources: {gpus: 4}\n")
    (tmp_path / "gpu3.yaml").write_text(
        SPEC.replace("{estimator: ridge, task: regression}", "{framework: pytorch, estimator: mlp}")
        + "resources: {gpus: 3}\n"
    )
    spec = str(tmp_path / "job.yaml")

    assert main(["train", "submit", str(tmp_path / "gpu4.yaml")]) == 2
    assert "largest node has 3" in capsys.readouterr().err
    assert main(["train", "submit", str(tmp_path / "gpu3.yaml")]) == 0
    capsys.readouterr()

    assert main(["train", "triggers", "add", "again", "--kind", "manual", "--spec", spec]) == 0
    assert "added manual trigger again for model score" in capsys.readouterr().out
    args = ["train", "triggers", "add", "tick", "--kind", "schedule", "--spec", spec]
    assert main([*args, "--schedule", "0 3 * * *"]) == 0
    assert main([*args[:3], "bad", *args[4:], "--schedule", "0 25 * * *"]) == 2
    assert "Bad hour (minute 0-59, hour 0-23" in capsys.readouterr().err
    assert main(["train", "triggers", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("again  manual") and "last: never" in out[0]
    assert out[1].startswith("tick  schedule  0 3 * * *  -> score")

    assert main(["train", "triggers", "run", "again"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["train", "triggers", "run", "again"]) == 0
    assert f"run {job_id} of again is active" in capsys.readouterr().out
    assert main(["train", "triggers", "--once"]) == 0  # the follow-up waits for the run
    assert capsys.readouterr().out == ""
    assert main(["train", "logs", job_id]) == 0
    assert "INFO    submitted by trigger 'again': manual (CLI)" in capsys.readouterr().out
    assert main(["train", "cancel", job_id]) == 0
    capsys.readouterr()
    assert main(["train", "logs", job_id, "--follow", "--after", "1"]) == 0  # ended: returns
    assert capsys.readouterr().out == ""
    assert main(["train", "triggers", "--once"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("again  submitted") and "follow-up" in line
    assert main(["train", "list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # gpu3, the run, the follow-up
    assert main(["train", "triggers", "remove", "again"]) == 0
    assert main(["train", "triggers", "remove", "again"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "logs", "nope"]) == 2


def test_submit_resolves_the_label_source_next_to_the_spec_and_checks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From another folder, a spec's relative label_source is the file beside the spec (made
    absolute, so it passes the data-roots check); a missing label file, a wrong column and a
    param typo are refused at submit with the reason."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    monkeypatch.setenv("CARRARA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CARRARA_DATA_ROOTS", str(jobs))
    for name in ("CARRARA_CONFIG", "CARRARA_REGISTRY_URL", "CARRARA_EVENT_LOG_URL"):
        monkeypatch.delenv(name, raising=False)
    with FeatureService.from_settings(load_settings()) as features:
        features.apply(
            Definitions(
                entities=(Entity(name="thing", join_key="id"),),
                groups=(
                    FeatureGroup(
                        name="stats",
                        entity="thing",
                        features=(Feature(name="x"), Feature(name="y")),
                    ),
                ),
            )
        )
    (jobs / "job.yaml").write_text(SPEC)
    (jobs / "typo.yaml").write_text(SPEC.replace("task: regression}", "params: {alpah: 1}}"))
    (jobs / "column.yaml").write_text(SPEC.replace("label_column: target", "label_column: tgt"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert main(["train", "submit", "../jobs/job.yaml"]) == 2
    assert f"no such file '{jobs / 'labels.csv'}'" in capsys.readouterr().err
    (jobs / "labels.csv").write_text("id,event_timestamp,target\n")
    assert main(["train", "submit", "../jobs/job.yaml"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["train", "status", job_id, "--json"]) == 0
    assert f'label_source\\":\\"{jobs / "labels.csv"}' in capsys.readouterr().out
    assert main(["train", "submit", "../jobs/column.yaml"]) == 2
    assert "lacks the column(s) label_column 'tgt'" in capsys.readouterr().err
    assert main(["train", "submit", "../jobs/typo.yaml"]) == 2
    assert "unknown param 'alpah' for sklearn/ridge; did you mean 'alpha'?" in (
        capsys.readouterr().err
    )
