"""Every sklearn estimator trains, exports to ONNX within the parity tolerance, and loads in
the gateway's OnnxBackend with the score as the first output."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from carrara.errors import FailedPreconditionError, InvalidArgumentError
from carrara.gateway.backends import OnnxBackend
from carrara.training.export import PARITY_ATOL, check_parity, export_onnx
from carrara.training.spec import ModelSpec
from carrara.training.trainers import predict_scores, train_sklearn

rng = np.random.default_rng(0)
X = rng.normal(size=(240, 4)).astype(np.float32)
Y_BIN = (X[:, 0] - X[:, 1] + rng.normal(size=240) * 0.5 > 0).astype(np.int64)
Y_REG = X @ np.array([1.0, 2.0, 3.0, 4.0]) + rng.normal(size=240)
Y_MULTI = np.digitize(X[:, 0], [-0.5, 0.5])
SMALL = {"n_estimators": 10, "max_depth": 3}


@pytest.mark.parametrize(
    ("estimator", "task", "y", "params", "width", "metric"),
    [
        ("logistic_regression", "classification", Y_BIN, {}, 1, "auc"),
        ("gradient_boosting", "classification", Y_BIN, SMALL, 1, "auc"),
        ("random_forest", "classification", Y_BIN, SMALL, 1, "log_loss"),
        ("logistic_regression", "classification", Y_MULTI, {}, 3, "auc"),
        ("ridge", "regression", Y_REG, {"alpha": 0.5}, 1, "rmse"),
        ("ridge", "regression", Y_REG * 1e5 + 3e6, {}, 1, "r2"),  # large: relative tolerance
        ("gradient_boosting", "regression", Y_REG, SMALL, 1, "mae"),
        ("random_forest", "regression", Y_REG, SMALL, 1, "rmse"),
    ],
)
def test_train_export_parity_and_gateway_backend(
    estimator: str, task: Any, y: Any, params: dict[str, Any], width: int, metric: str
) -> None:
    spec = ModelSpec(estimator=estimator, task=task, params=params)
    result = train_sklearn(spec, X[:180], y[:180], X[180:], y[180:])
    assert metric in result.metrics and result.n_validation == 60
    onnx_model = export_onnx(result.model, 4, task)
    parity = check_parity(result.model, onnx_model, X[180:], task)
    assert parity.ok
    if task == "classification":
        assert parity.rtol == 0.0 and parity.max_abs_diff <= PARITY_ATOL
    backend = OnnxBackend(onnx_model)
    assert backend.info.input_dim == 4 and backend.info.output_dim == width
    assert backend.info.output_names[0] == "score"
    got = backend.infer(X[180:])
    want = predict_scores(result.model, X[180:], task)
    np.testing.assert_allclose(got, want, atol=PARITY_ATOL, rtol=parity.rtol)
    if task == "classification" and width == 1:
        np.testing.assert_allclose(got[:, 0], result.model.predict_proba(X[180:])[:, 1], atol=1e-4)


def test_parity_failure_is_reported() -> None:
    spec = ModelSpec(estimator="logistic_regression")
    a = train_sklearn(spec, X[:180], Y_BIN[:180], X[180:], Y_BIN[180:])
    b = train_sklearn(spec, X[:180], 1 - Y_BIN[:180], X[180:], Y_BIN[180:])
    with pytest.raises(FailedPreconditionError, match="does not match the sklearn model"):
        check_parity(a.model, export_onnx(b.model, 4, "classification"), X, "classification")


def test_trainer_errors() -> None:
    with pytest.raises(InvalidArgumentError, match="bad params"):
        train_sklearn(
            ModelSpec(estimator="ridge", task="regression", params={"nope": 1}),
            X,
            Y_REG,
            X[:0],
            Y_REG[:0],
        )
    with pytest.raises(InvalidArgumentError, match="single class"):
        train_sklearn(ModelSpec(estimator="logistic_regression"), X, np.zeros(240), X, Y_BIN)
