# mypy: disable-error-code="import-untyped"
"""The scikit-learn trainer: build the estimator a spec names, fit it, evaluate it."""

from __future__ import annotations

import math
import warnings
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import InvalidArgumentError

from .spec import ESTIMATORS, ModelSpec

__all__ = ["TrainResult", "build_estimator", "evaluate", "predict_scores", "train_sklearn"]


class TrainResult(msgspec.Struct, frozen=True, kw_only=True):
    model: Any  # the fitted sklearn estimator (a Pipeline for linear models)
    metrics: dict[str, float]
    n_train: int
    n_validation: int
    classes: list[Any] = msgspec.field(default_factory=list)


def build_estimator(spec: ModelSpec, *, seed: int = 0) -> Any:
    """A fresh (unfitted) estimator; linear models get a StandardScaler in front."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if spec.framework != "sklearn" or spec.estimator not in ESTIMATORS["sklearn"]:
        raise InvalidArgumentError(
            f"no sklearn trainer for {spec.framework}/{spec.estimator}; "
            f"known: {', '.join(sorted(ESTIMATORS['sklearn']))}"
        )
    params = dict(spec.params)
    classify = spec.task == "classification"
    try:
        if spec.estimator == "logistic_regression":
            from sklearn.linear_model import LogisticRegression

            params.setdefault("max_iter", 1000)
            return make_pipeline(StandardScaler(), LogisticRegression(**params))
        if spec.estimator == "ridge":
            from sklearn.linear_model import Ridge

            return make_pipeline(StandardScaler(), Ridge(**params))
        if spec.estimator == "gradient_boosting":
            from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

            params.setdefault("random_state", seed)
            cls = GradientBoostingClassifier if classify else GradientBoostingRegressor
            return cls(**params)
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        params.setdefault("random_state", seed)
        params.setdefault("n_jobs", 1)
        cls2 = RandomForestClassifier if classify else RandomForestRegressor
        return cls2(**params)
    except TypeError as exc:  # unknown keyword argument
        raise InvalidArgumentError(f"bad params for {spec.estimator}: {exc}") from exc


def predict_scores(model: Any, x: NDArray[np.float32], task: str) -> NDArray[np.float64]:
    """What the served model returns: P(positive) ``[n, 1]`` for binary classifiers, the class
    probabilities ``[n, k]`` for multi-class ones, the prediction ``[n, 1]`` for regressors."""
    if task == "classification":
        proba = np.asarray(model.predict_proba(x), dtype=np.float64)
        return proba[:, 1:2] if proba.shape[1] == 2 else proba
    return np.asarray(model.predict(x), dtype=np.float64).reshape(len(x), 1)


def evaluate(model: Any, x: NDArray[np.float32], y: NDArray[Any], task: str) -> dict[str, float]:
    """Validation metrics: AUC and log loss (plus accuracy) for classification; RMSE, MAE and
    R² for regression. AUC is left out when the validation split has one class only."""
    from sklearn import metrics as m

    out: dict[str, float] = {}
    if task == "classification":
        proba = np.asarray(model.predict_proba(x), dtype=np.float64)
        # float32 inputs give float32 probabilities; renormalize in float64 for log_loss.
        proba = proba / proba.sum(axis=1, keepdims=True)
        classes = list(model.classes_)
        out["accuracy"] = float(m.accuracy_score(y, model.predict(x)))
        out["log_loss"] = float(m.log_loss(y, proba, labels=classes))
        if len(np.unique(y)) > 1:
            if proba.shape[1] == 2:
                out["auc"] = float(m.roc_auc_score(np.asarray(y) == classes[1], proba[:, 1]))
            else:
                out["auc"] = float(m.roc_auc_score(y, proba, multi_class="ovr", labels=classes))
    else:
        pred = np.asarray(model.predict(x), dtype=np.float64)
        out["rmse"] = math.sqrt(float(m.mean_squared_error(y, pred)))
        out["mae"] = float(m.mean_absolute_error(y, pred))
        if len(y) > 1:
            out["r2"] = float(m.r2_score(y, pred))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def train_sklearn(
    spec: ModelSpec,
    x_train: NDArray[np.float32],
    y_train: NDArray[Any],
    x_val: NDArray[np.float32],
    y_val: NDArray[Any],
    *,
    seed: int = 0,
) -> TrainResult:
    """Fit on the training split, evaluate on the validation split."""
    if len(x_train) == 0:
        raise InvalidArgumentError("the training split is empty; widen the time range")
    if spec.task == "classification" and len(np.unique(y_train)) < 2:
        raise InvalidArgumentError(
            f"the training split has a single class {np.unique(y_train).tolist()}; "
            "a classifier needs at least two"
        )
    model = build_estimator(spec, seed=seed)
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    metrics = evaluate(model, x_val, y_val, spec.task) if len(x_val) else {}
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            metrics["converged"] = 0.0  # recorded as a metric rather than failing the job
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    classes = list(getattr(model, "classes_", []))
    return TrainResult(
        model=model,
        metrics=metrics,
        n_train=len(x_train),
        n_validation=len(x_val),
        classes=[c.item() if hasattr(c, "item") else c for c in classes],
    )
