"""The scikit-learn trainer and the parts every trainer shares: the estimator lists, ONNX
parity (:mod:`carrara.training.frameworks.parity`) and the serving shape through the gateway's
OnnxBackend. XGBoost and Keras: ``test_frameworks_xgboost.py``, ``test_frameworks_keras.py``."""

from __future__ import annotations

import io
import itertools
from typing import Any

import joblib
import numpy as np
import pytest

from carrara.errors import CancelledError, FailedPreconditionError, InvalidArgumentError
from carrara.gateway.backends import OnnxBackend
from carrara.training.frameworks import LocalContext, TrainData, get_trainer
from carrara.training.frameworks.base import bound_history, history_entry
from carrara.training.frameworks.parity import Parity, check_parity, onnx_scores
from carrara.training.frameworks.sklearn_trainer import TRAINER as SKLEARN
from carrara.training.spec import ESTIMATORS

from .conftest import make_data as _make_data


def make_data(task: str, k: int = 0, *, n: int = 1500, seed: int = 0) -> TrainData:
    """Separable-ish data: 80 % train, 20 % validation (string class names)."""
    return _make_data(task, k, n=n, seed=seed, class_names=[f"c{i}" for i in range(k)])


CASES = [
    ("logistic_regression", "classification", 2, {}),
    ("logistic_regression", "classification", 3, {"C": 10.0}),
    ("ridge", "regression", 0, {"alpha": 0.5}),
    ("gradient_boosting", "classification", 2, {"n_estimators": 30, "max_depth": 3}),
    ("gradient_boosting", "classification", 3, {"n_estimators": 30, "max_depth": 3}),
    ("gradient_boosting", "regression", 0, {"n_estimators": 50, "max_depth": 3}),
    ("random_forest", "classification", 2, {"n_estimators": 20, "max_depth": 6}),
    ("random_forest", "regression", 0, {"n_estimators": 20, "max_depth": 8}),
]


def assert_sane(metrics: dict[str, float], data: TrainData) -> None:
    """AUC > 0.9 on the easy problems; RMSE well below the label std for regression."""
    if data.task == "classification":
        assert metrics["auc"] > 0.9, metrics
        assert metrics["accuracy"] > 0.75, metrics
        assert 0 < metrics["log_loss"] < 0.6, metrics
    else:
        assert metrics["rmse"] < 0.5 * float(np.std(data.y_val)), metrics
        assert metrics["r2"] > 0.75, metrics


@pytest.mark.parametrize(("estimator", "task", "k", "params"), CASES)
def test_sklearn_fit_export_parity_roundtrip(
    estimator: str, task: str, k: int, params: dict[str, Any]
) -> None:
    data = make_data(task, k)
    result = SKLEARN.fit(estimator, params, data, LocalContext(seed=1))
    assert (result.n_train, result.n_validation) == (1200, 300)
    assert result.native_format == "joblib" and result.classes == data.classes
    assert_sane(result.metrics, data)
    # train metrics are reported beside validation ones
    assert ("train_auc" if task == "classification" else "train_rmse") in result.metrics
    assert result.history == []  # no epochs, no learning curve

    onnx_bytes = SKLEARN.export_onnx(result, data)
    parity = check_parity(SKLEARN, result.model, onnx_bytes, data.x_val, data.task)
    assert parity.ok and parity.rows == 300
    assert (parity.atol, parity.rtol) == (SKLEARN.parity_atol, SKLEARN.parity_rtol) == (1e-4, 1e-5)

    width = 1 if k <= 2 else k
    backend = OnnxBackend(onnx_bytes)
    assert backend.info.input_dim == 5 and backend.info.output_dim == width
    assert backend.info.output_names[0] == "score"
    want = SKLEARN.predict_scores(result.model, data.x_val, data.task)
    assert want.shape == (300, width)
    np.testing.assert_allclose(backend.infer(data.x_val), want, atol=1e-4, rtol=1e-5)
    if k == 2:  # the score is P(class index 1)
        np.testing.assert_array_equal(want[:, 0], result.model.predict_proba(data.x_val)[:, 1])

    loaded = SKLEARN.load_native(result.native, data)
    np.testing.assert_array_equal(SKLEARN.predict_scores(loaded, data.x_val, data.task), want)


def test_sklearn_is_deterministic_given_the_seed() -> None:
    data = make_data("classification", 2)
    params = {"n_estimators": 10, "max_depth": 4}
    a = SKLEARN.fit("random_forest", params, data, LocalContext(seed=7))
    b = SKLEARN.fit("random_forest", params, data, LocalContext(seed=7))
    c = SKLEARN.fit("random_forest", params, data, LocalContext(seed=8))
    sa, sb, sc = (SKLEARN.predict_scores(r.model, data.x_val, "classification") for r in (a, b, c))
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(sa, sc)
    assert a.model.random_state == 7


def test_sklearn_linear_models_standardize_and_record_convergence() -> None:
    data = make_data("classification", 2)
    result = SKLEARN.fit("logistic_regression", {"max_iter": 1}, data, LocalContext())
    assert result.metrics["converged"] == 0.0  # a ConvergenceWarning becomes a metric
    assert [name for name, _ in result.model.steps] == ["standardscaler", "logisticregression"]
    native = joblib.load(io.BytesIO(result.native))
    assert type(native.steps[-1][1]).__name__ == "LogisticRegression"


@pytest.mark.parametrize(
    ("estimator", "task", "params", "match"),
    [
        ("random_forest", "classification", {"n_trees": 5}, "unknown param 'n_trees'"),
        ("logistic_regression", "classification", {"alpha": 1.0}, "unknown param 'alpha'"),
        ("random_forest", "regression", {"n_estimators": -3}, "n_estimators"),
        ("gradient_boosting", "classification", {"learning_rate": "fast"}, "learning_rate"),
        ("ridge", "classification", {}, "does only regression"),
        ("logistic_regression", "regression", {}, "does only classification"),
        ("svm", "classification", {}, "unknown sklearn estimator 'svm'"),
    ],
)
def test_sklearn_bad_params_name_the_problem(
    estimator: str, task: str, params: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        SKLEARN.fit(estimator, params, make_data(task, 2), LocalContext())


def test_bad_training_data_is_refused() -> None:
    data = make_data("classification", 3)
    only_two = TrainData(
        x_train=data.x_train,
        y_train=np.minimum(data.y_train, 1),
        x_val=data.x_val,
        y_val=data.y_val,
        feature_names=data.feature_names,
        task="classification",
        classes=data.classes,
    )
    with pytest.raises(InvalidArgumentError, match=r"classes \['c2'\] never occur"):
        SKLEARN.fit("logistic_regression", {}, only_two, LocalContext())
    single = TrainData(
        x_train=data.x_train,
        y_train=np.zeros(1200, np.int64),
        x_val=data.x_val,
        y_val=data.y_val,
        feature_names=data.feature_names,
        task="classification",
    )
    with pytest.raises(InvalidArgumentError, match="single class"):
        SKLEARN.fit("logistic_regression", {}, single, LocalContext())
    floats = TrainData(
        x_train=data.x_train,
        y_train=data.y_train.astype(np.float64),
        x_val=data.x_val,
        y_val=data.y_val,
        feature_names=data.feature_names,
        task="classification",
    )
    with pytest.raises(InvalidArgumentError, match="int64 class indices"):
        SKLEARN.fit("logistic_regression", {}, floats, LocalContext())


def test_cancelled_job_does_not_fit() -> None:
    ctx = LocalContext()
    ctx.cancelled = True
    with pytest.raises(CancelledError):
        SKLEARN.fit("ridge", {}, make_data("regression"), ctx)


def test_estimator_lists_match_the_spec() -> None:
    for framework in ("sklearn", "xgboost", "tensorflow"):
        trainer = get_trainer(framework)
        assert trainer.framework == framework
        assert dict(trainer.estimators) == ESTIMATORS[framework]
        assert trainer.framework_version()


def test_parity_reports_a_mismatch_with_numbers() -> None:
    data = make_data("classification", 2)
    good = SKLEARN.fit("logistic_regression", {}, data, LocalContext())
    other = SKLEARN.fit("logistic_regression", {"C": 1e-4}, data, LocalContext())
    wrong_onnx = SKLEARN.export_onnx(other, data)
    parity = check_parity(
        SKLEARN, good.model, wrong_onnx, data.x_val, "classification", raise_on_failure=False
    )
    assert not parity.ok and parity.rows == 300 and parity.max_abs_diff > 0.05
    with pytest.raises(FailedPreconditionError, match="does not match the sklearn model"):
        check_parity(SKLEARN, good.model, wrong_onnx, data.x_val, "classification")
    # the wrong width (a 3-class export for a binary model) is a mismatch, not a crash
    multi = make_data("classification", 3)
    multi_onnx = SKLEARN.export_onnx(
        SKLEARN.fit("logistic_regression", {}, multi, LocalContext()), multi
    )
    bad = check_parity(
        SKLEARN, good.model, multi_onnx, data.x_val, "classification", raise_on_failure=False
    )
    assert not bad.ok and bad.max_abs_diff == float("inf")
    empty = check_parity(SKLEARN, good.model, wrong_onnx, data.x_val[:0], "classification")
    assert empty == Parity(max_abs_diff=0.0, atol=1e-4, rtol=1e-5, rows=0, ok=True)
    assert onnx_scores(wrong_onnx, data.x_val[:4]).dtype == np.float32


def test_history_entries_are_one_based_finite_and_bounded() -> None:
    assert history_entry(0, {"loss": 1, "val_loss": float("nan"), "val_auc": 0.5}) == {
        "epoch": 1.0,
        "loss": 1.0,
        "val_auc": 0.5,
    }
    run = [history_entry(e, {"loss": 1.0 / (e + 1)}) for e in range(2500)]
    kept = bound_history(run, 1000)
    epochs = [int(h["epoch"]) for h in kept]
    assert len(kept) <= 1000 and epochs[0] == 1 and epochs[-1] == 2500  # first and last kept
    steps = {b - a for a, b in itertools.pairwise(epochs[:-1])}
    assert steps == {3}  # every 3rd epoch: ceil(2499 / 999)
    assert kept[-1] == run[-1] and all(h == run[int(h["epoch"]) - 1] for h in kept)
    assert bound_history(run[:1000], 1000) == run[:1000]  # short runs are kept whole
    assert len(bound_history(run[:1001], 1000)) <= 1000
