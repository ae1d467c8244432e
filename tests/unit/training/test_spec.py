"""Job spec decoding and submit-time validation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from carrara.errors import InvalidArgumentError
from carrara.feature_cache import Definitions, Entity, Feature, FeatureGroup, FeatureService
from carrara.training.spec import JobSpec, load_spec, parse_spec, validate_spec

YAML = """
model_name: churn
dataset:
  features: ["activity:a", "activity:b"]
  label_source: labels.parquet
  label_column: churned
  entity_column: user_id
  start: "2026-01-01T00:00:00Z"
  end: 2026-02-01T00:00:00Z
model:
  estimator: gradient_boosting
  task: regression
  params: {n_estimators: 10}
resources: {cpus: 2}
"""


def spec_with(**changes: object) -> JobSpec:
    raw = msgspec.to_builtins(parse_spec(YAML))
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return msgspec.convert(raw, JobSpec)


def test_yaml_and_json_decode_the_same(tmp_path: Path) -> None:
    spec = parse_spec(YAML)
    assert spec.model.framework == "sklearn" and spec.model.params == {"n_estimators": 10}
    assert spec.dataset.start is not None and spec.dataset.start.year == 2026
    assert spec.resources.cpus == 2 and spec.resources.gpus == 0
    assert parse_spec(spec.to_json(), format="json") == spec
    validate_spec(spec)
    (tmp_path / "job.yaml").write_text(YAML)
    loaded = load_spec(tmp_path / "job.yaml")
    assert loaded.dataset.label_source == str(tmp_path / "labels.parquet")
    (tmp_path / "job.json").write_text(spec.to_json())
    assert load_spec(tmp_path / "job.json") == loaded


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model__framework": "caffe"}, "unknown framework 'caffe'; known: sklearn"),
        ({"model__estimator": "svm"}, "unknown estimator 'svm' for framework 'sklearn'"),
        (
            {"model__estimator": "ridge", "model__task": "classification"},
            "estimator 'ridge' does regression",
        ),
        ({"dataset__end": "2025-12-01T00:00:00Z"}, "empty time range"),
        ({"resources__nodes": 2}, "only framework 'pytorch' trains across nodes"),
        ({"resources__cpus": 0}, "impossible resources: cpus=0"),
        ({"dataset__features": []}, "dataset.features is empty"),
        ({"dataset__features": ["activity"]}, "are not 'group:feature'"),
        ({"dataset__validation_fraction": 1.0}, "validation_fraction must be in (0, 1)"),
        ({"model_name": "9bad name"}, "model_name '9bad name'"),
    ],
)
def test_validation_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid training job spec") as info:
        validate_spec(spec_with(**changes))
    assert message in str(info.value)


def test_decode_errors() -> None:
    with pytest.raises(InvalidArgumentError, match="invalid training job spec"):
        parse_spec(YAML + "surprise: 1\n")  # unknown field
    with pytest.raises(InvalidArgumentError, match="not valid yaml"):
        parse_spec("model_name: [unclosed")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_spec("/nonexistent/job.yaml")


def test_unknown_features_checked_against_the_catalog(tmp_path: Path) -> None:
    with FeatureService.open(
        catalog_url=f"sqlite:///{tmp_path / 'c.db'}", offline_path=str(tmp_path / "off")
    ) as features:
        features.apply(
            Definitions(
                entities=(Entity(name="user", join_key="user_id"),),
                groups=(
                    FeatureGroup(
                        name="activity",
                        entity="user",
                        features=(Feature(name="a"), Feature(name="b")),
                    ),
                ),
            )
        )
        validate_spec(parse_spec(YAML), features=features)
        bad = spec_with(dataset__features=["activity:a", "activity:zz", "nogroup:x"])
        with pytest.raises(InvalidArgumentError) as info:
            validate_spec(bad, features=features)
        text = str(info.value)
        assert "unknown feature 'activity:zz'; group 'activity' v1 has: a, b" in text
        assert "unknown feature group 'nogroup'" in text


def test_a_relative_label_source_resolves_against_the_spec_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded from another folder by a relative spec path, the label source is the file next
    to the spec, made absolute, so it passes the data-roots check."""
    import pandas as pd

    from carrara.training.queue import JobQueue

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job.yaml").write_text(YAML)
    ts = pd.to_datetime(["2026-01-02"], utc=True)
    labels = pd.DataFrame({"user_id": [1], "event_timestamp": ts, "churned": [0]})
    labels.to_parquet(jobs / "labels.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_spec(Path("..") / "jobs" / "job.yaml")
    assert loaded.dataset.label_source == str(jobs / "labels.parquet")
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", data_roots=[str(jobs)]) as q:
        q.validate(loaded)
    # URLs are left as they are (and refused or checked by the data-roots rules).
    (jobs / "url.yaml").write_text(YAML.replace("labels.parquet", "s3://bucket/l.parquet"))
    assert load_spec(jobs / "url.yaml").dataset.label_source == "s3://bucket/l.parquet"


@pytest.mark.parametrize(
    ("framework", "estimator", "task", "params", "message"),
    [
        (
            "sklearn",
            "gradient_boosting",
            "regression",
            {"n_estimatorz": 10},
            "model.params: unknown param 'n_estimatorz' for sklearn/gradient_boosting; "
            "did you mean 'n_estimators'?",
        ),
        ("pytorch", "mlp", "regression", {"epoch": 5}, "did you mean 'epochs'?"),
        ("tensorflow", "mlp", "regression", {"learning_rate": 0.1}, "unknown param"),
        (
            "pytorch",
            "mlp",
            "regression",
            {"epochs": -3},
            "model.params.epochs must be a whole number >= 1, got -3",
        ),
        ("xgboost", "gradient_boosting", "regression", {"n_estimators": 0}, ">= 1, got 0"),
        ("xgboost", "gradient_boosting", "regression", {"max_depth": -1}, ">= 0, got -1"),
        ("sklearn", "random_forest", "regression", {"max_depth": 2.5}, "whole number"),
        ("pytorch", "mlp", "regression", {"lr": 0}, "model.params.lr must be a number > 0"),
        ("xgboost", "gradient_boosting", "regression", {"learning_rate": -0.1}, "> 0"),
        ("sklearn", "logistic_regression", "classification", {"C": "big"}, "C must be"),
    ],
)
def test_param_typos_and_ranges_are_refused_at_submit(
    framework: str, estimator: str, task: str, params: dict[str, object], message: str
) -> None:
    spec = spec_with(
        model__framework=framework,
        model__estimator=estimator,
        model__task=task,
        model__params=params,
    )
    with pytest.raises(InvalidArgumentError, match="invalid training job spec") as info:
        validate_spec(spec)
    assert message in str(info.value)


def test_valid_params_pass_and_search_space_names_are_checked() -> None:
    validate_spec(spec_with(model__params={"n_estimators": 5, "max_depth": None}))
    validate_spec(
        spec_with(
            model__framework="xgboost",
            model__params={"n_estimators": 5, "max_depth": 0, "learning_rate": 0.1},
        )
    )
    raw = {"type": "float", "low": 0.01, "high": 0.3}
    spec = spec_with(search={"space": {"learnin_rate": raw}, "metric": "rmse"})
    with pytest.raises(InvalidArgumentError, match=r"search\.space: unknown param 'learnin_rate'"):
        validate_spec(spec)
    # Searched ranges and choices are held to the same bounds.
    bad = {
        "n_estimators": {"type": "int", "low": 0, "high": 5},
        "learning_rate": {"type": "categorical", "choices": [0.1, -1.0]},
    }
    with pytest.raises(InvalidArgumentError) as info:
        validate_spec(spec_with(search={"space": bad, "metric": "rmse"}))
    message = str(info.value)
    assert "search.space.n_estimators.low must be a whole number >= 1, got 0" in message
    assert "search.space.learning_rate choice must be a number > 0, got -1.0" in message


def test_the_params_table_matches_the_trainers() -> None:
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        GradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge

    from carrara.training.frameworks import keras_trainer, torch_trainer, xgboost_trainer
    from carrara.training.spec import PARAMS

    def names(*classes: type) -> frozenset[str]:
        return frozenset().union(*(c().get_params() for c in classes))

    assert PARAMS["sklearn"] == {
        "logistic_regression": names(LogisticRegression),
        "ridge": names(Ridge),
        "gradient_boosting": names(GradientBoostingClassifier, GradientBoostingRegressor),
        "random_forest": names(RandomForestClassifier, RandomForestRegressor),
    }
    assert PARAMS["xgboost"]["gradient_boosting"] == (
        xgboost_trainer._BOOSTER_PARAMS | {"n_estimators", "n_jobs"}
    )
    assert PARAMS["pytorch"]["mlp"] == set(torch_trainer.MLPParams.__struct_fields__)
    assert PARAMS["tensorflow"]["mlp"] == set(keras_trainer._DEFAULTS)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "no such file"),
        ("wrong_columns.parquet", "lacks the column(s) entity_column 'user_id', label_column"),
        ("wrong_columns.csv", "lacks the column(s) entity_column 'user_id', label_column"),
        ("not_parquet.parquet", "is not a readable Parquet file"),
    ],
)
def test_the_label_file_is_checked_at_submit(
    tmp_path: Path, write: str | None, message: str
) -> None:
    """Under the data roots, a missing label file or one without the spec's columns is a
    400 at submit (only the schema/header is read), and nothing is queued."""
    import pandas as pd

    from carrara.training.queue import JobQueue

    name = write or "missing.parquet"
    path = tmp_path / name
    wrong = pd.DataFrame({"id": [1], "event_timestamp": [0], "y": [1]})
    if write == "wrong_columns.parquet":
        wrong.to_parquet(path)
    elif write == "wrong_columns.csv":
        wrong.to_csv(path, index=False)
    elif write is not None:
        path.write_text("user_id,churned\n")
    spec = spec_with(dataset__label_source=str(path))
    with JobQueue.open(f"sqlite:///{tmp_path / 'q.db'}", data_roots=[str(tmp_path)]) as q:
        with pytest.raises(InvalidArgumentError, match="invalid training job spec") as info:
            q.submit(spec)
        assert message in str(info.value)
        assert q.list() == []
        good = pd.DataFrame({"user_id": [1], "event_timestamp": [0], "churned": [1]})
        good.to_csv(tmp_path / "good.csv", index=False)
        q.submit(spec_with(dataset__label_source=str(tmp_path / "good.csv")))
        assert len(q.list()) == 1
