"""Reference profiles: what they hold, the inputs they accept, storage by (model, version)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from carrara.errors import InvalidArgumentError, NotFoundError
from carrara.monitoring import upgrade
from carrara.monitoring.profiles import (
    PREDICTION,
    build_profile,
    category_key,
    list_profiles,
    load_profile,
    prediction_value,
    store_profile,
)
from carrara.sql import Database


def frame(n: int = 5_000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    age = rng.normal(40, 10, n)
    age[:500] = np.nan
    return pd.DataFrame(
        {
            "age": age,
            "city": rng.choice(["paris", "lyon", "nice"], n, p=[0.6, 0.3, 0.1]),
            "clicks": rng.poisson(3, n),
        }
    )


def test_profile_of_a_pandas_frame() -> None:
    df = frame()
    p = build_profile(
        df, np.linspace(0, 1, len(df)), model="churn", version=3, baseline={"auc": 0.9}
    )
    age = p.feature("age")
    assert age.kind == "numeric" and age.numeric is not None
    assert age.missing == 500 and age.missing_rate == pytest.approx(0.1)
    assert sum(age.numeric.counts) == age.count == 4_500
    assert len(age.numeric.edges) == 99  # 100 equal-mass bins of a continuous column
    assert max(age.numeric.counts) <= 0.011 * age.count + 1
    assert len(age.numeric.psi_cuts) == 9  # 10 coarse PSI groups
    city = p.feature("city")  # object dtype: categorical without being told
    assert city.kind == "categorical" and city.categorical is not None
    assert city.categorical.categories == ["paris", "lyon", "nice"]
    assert city.categorical.counts[-1] == 0
    assert p.feature(PREDICTION).kind == "numeric"
    assert p.baseline == {"auc": 0.9} and p.rows == 5_000
    with pytest.raises(NotFoundError, match="known: age, city, clicks"):
        p.feature("nope")


def test_profile_of_arrays_and_output_shapes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1_000, 2))
    probs = rng.dirichlet([1, 1, 1], 1_000)
    p = build_profile(
        x,
        probs,
        model="m",
        version=1,
        feature_names=["a", "b"],
        categorical=["b"],
        max_categories=10,
    )
    assert p.feature(PREDICTION).kind == "categorical"  # 3 classes: predicted class
    assert p.feature("b").categorical is not None
    assert len(p.feature("b").categorical.categories) == 10  # type: ignore[union-attr]
    two = build_profile(
        {"a": x[:, 0]}, np.column_stack([1 - x[:, 1], x[:, 1]]), model="m", version=2
    )
    assert two.feature(PREDICTION).numeric is not None
    assert two.feature(PREDICTION).numeric.mean == pytest.approx(x[:, 1].mean())  # type: ignore[union-attr]
    with pytest.raises(InvalidArgumentError, match="feature_names"):
        build_profile(x, None, model="m", version=1)
    with pytest.raises(InvalidArgumentError, match="not columns"):
        build_profile({"a": x[:, 0]}, None, model="m", version=1, categorical=["zz"])
    with pytest.raises(InvalidArgumentError, match="rows"):
        build_profile({"a": x[:, 0]}, np.zeros(3), model="m", version=1)


def test_category_keys_agree_between_training_values_and_logged_floats() -> None:
    assert category_key(3) == category_key(3.0) == category_key(np.int64(3)) == "3"
    assert category_key(True) == category_key(1.0) == "1"
    assert category_key("a") == "a" and category_key(2.5) == "2.5"
    assert prediction_value([0.3]) == 0.3
    assert prediction_value([0.3, 0.7]) == 0.7
    assert prediction_value([0.1, 0.2, 0.6, 0.1]) == 2.0


def test_store_and_load_by_model_and_version(db: Database) -> None:
    store_profile(db, build_profile(frame(500), None, model="churn", version=1))
    store_profile(db, build_profile(frame(600), None, model="churn", version=2))
    store_profile(db, build_profile(frame(700), None, model="churn", version=2))  # replaced
    assert list_profiles(db) == [("churn", 1), ("churn", 2)]
    assert load_profile(db, "churn").rows == 700
    assert load_profile(db, "churn", 1).rows == 500
    with pytest.raises(NotFoundError, match=r"churn v9.*churn v1"):
        load_profile(db, "churn", 9)


def test_upgrade_is_idempotent(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/u.db"
    assert upgrade(url) == [
        "0001_monitoring",
        "0002_alert_clear_streak",
        "0003_alert_deliveries",
        "0004_alert_acknowledgement",
    ]
    assert upgrade(url) == []


def test_profile_of_a_polars_frame_and_pandas_categories() -> None:
    import polars as pl

    df = frame(1_000)
    p = build_profile(pl.from_pandas(df), None, model="m", version=1)
    q = build_profile(df.astype({"clicks": "category"}), None, model="m", version=1)
    assert p.feature("city").kind == "categorical" and p.feature("age").missing == 500
    assert (
        p.feature("age").numeric
        == build_profile(df, None, model="m", version=1).feature("age").numeric
    )
    assert q.feature("clicks").kind == "categorical"
    assert p.prediction is None
