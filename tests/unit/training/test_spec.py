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
