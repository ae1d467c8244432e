# mypy: disable-error-code="import-untyped"
"""The scikit-learn trainer: logistic regression and ridge (behind a StandardScaler), gradient
boosting and random forests; native artifact joblib, ONNX through skl2onnx.

sklearn fits in one call, so this trainer has no epochs: it reports nothing per epoch, writes
no checkpoints and only polls :meth:`TrainContext.should_stop` (and ``preempting``: the job is
handed back whole, :class:`Preempted`) before fitting; a fit under way runs to its end.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
from numpy.typing import NDArray

from carrara.errors import CancelledError, InvalidArgumentError

from .base import FitResult, Preempted, Task, TrainContext, TrainData, evaluate_scores
from .parity import DEFAULT_OPSET, INPUT_NAME, attach_score_output

__all__ = ["TRAINER", "SklearnTrainer", "check_train_data", "check_param_names"]


def check_train_data(data: TrainData) -> int:
    """Validate the split for fitting; returns the class count (0 for regression)."""
    if len(data.x_train) == 0:
        raise InvalidArgumentError("the training split is empty; widen the time range")
    if data.x_train.ndim != 2 or data.x_val.ndim != 2:
        raise InvalidArgumentError("features must be a 2-D [rows, features] array")
    if data.task != "classification":
        return 0
    y = np.asarray(data.y_train)
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgumentError(
            f"classification labels must be int64 class indices 0..k-1, got {y.dtype}; "
            "encode them (TrainData.classes holds the original labels)"
        )
    present = np.unique(y)
    k = data.n_classes or int(present.max()) + 1
    if present.min() < 0 or present.max() >= k:
        raise InvalidArgumentError(
            f"class indices must lie in 0..{k - 1}, got {present.min()}..{present.max()}"
        )
    if len(present) < 2:
        raise InvalidArgumentError(
            f"the training split has a single class {present.tolist()}; "
            "a classifier needs at least two (widen the time range)"
        )
    missing = sorted(set(range(k)) - set(present.tolist()))
    if missing:
        names = [data.classes[i] if i < len(data.classes) else i for i in missing]
        raise InvalidArgumentError(
            f"classes {names} never occur in the training split; widen the time range or drop "
            "those labels so every served probability column was trained"
        )
    return k


def check_param_names(
    framework: str,
    estimator: str,
    params: Mapping[str, Any],
    known: AbstractSet[str],
    reserved: Mapping[str, str] | None = None,
) -> None:
    """InvalidArgumentError naming the first unknown or trainer-owned param."""
    for name in params:
        if reserved and name in reserved:
            raise InvalidArgumentError(
                f"param {name!r} of {framework}/{estimator} is set by the trainer "
                f"({reserved[name]}); remove it from model.params"
            )
        if name not in known:
            raise InvalidArgumentError(
                f"unknown param {name!r} for {framework}/{estimator}; "
                f"known: {', '.join(sorted(known))}"
            )


def _builders(estimator: str, task: Task) -> tuple[type, dict[str, Any]]:
    """The estimator class (the final step for pipelines) and the trainer's defaults."""
    classify = task == "classification"
    if estimator == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression, {"max_iter": 1000}
    if estimator == "ridge":
        from sklearn.linear_model import Ridge

        return Ridge, {}
    if estimator == "gradient_boosting":
        from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

        return (GradientBoostingClassifier if classify else GradientBoostingRegressor), {}
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    return (RandomForestClassifier if classify else RandomForestRegressor), {"n_jobs": 1}


class SklearnTrainer:
    """scikit-learn estimators; see the module docstring."""

    framework = "sklearn"
    estimators: Mapping[str, Task | None] = {
        "logistic_regression": "classification",
        "ridge": "regression",
        "gradient_boosting": None,
        "random_forest": None,
    }
    # ONNX Runtime evaluates the converted model in float32 while sklearn computes in float64
    # (on the same float32 inputs): probabilities agree to ~1e-6, tree sums to float32
    # rounding. 1e-4 absolute covers both with margin; the relative part covers regression
    # targets of large magnitude, whose float32 outputs carry ~6e-8 relative rounding per op.
    parity_atol = 1e-4
    parity_rtol = 1e-5

    def framework_version(self) -> str:
        import sklearn

        return str(sklearn.__version__)

    def build(self, estimator: str, params: Mapping[str, Any], task: Task, seed: int) -> Any:
        """A fresh (unfitted) estimator; linear models get a StandardScaler in front."""
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        only = self.estimators.get(estimator, "?")
        if only == "?":
            raise InvalidArgumentError(
                f"unknown sklearn estimator {estimator!r}; known: "
                f"{', '.join(sorted(self.estimators))}"
            )
        if only is not None and only != task:
            raise InvalidArgumentError(
                f"sklearn/{estimator} does only {only}, not {task}; pick another estimator"
            )
        cls, defaults = _builders(estimator, task)
        known = set(cls().get_params())
        check_param_names("sklearn", estimator, params, known)
        kwargs = {**defaults, **params}
        if "random_state" in known:
            kwargs.setdefault("random_state", seed)
        final = cls(**kwargs)
        if estimator in ("logistic_regression", "ridge"):
            return make_pipeline(StandardScaler(), final)
        return final

    def fit(
        self, estimator: str, params: Mapping[str, Any], data: TrainData, ctx: TrainContext
    ) -> FitResult:
        k = check_train_data(data)
        model = self.build(estimator, params, data.task, ctx.seed)
        if ctx.should_stop():
            raise CancelledError("training cancelled before the sklearn fit started")
        if ctx.preempting():
            raise Preempted("preempted before the sklearn fit started (it has no checkpoints)")
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                model.fit(data.x_train, data.y_train)
            except (ValueError, TypeError) as exc:  # sklearn's InvalidParameterError is both
                raise InvalidArgumentError(f"bad params for sklearn/{estimator}: {exc}") from exc
        metrics: dict[str, float] = {}
        if len(data.x_val):
            scores = self.predict_scores(model, data.x_val, data.task)
            metrics = evaluate_scores(scores, data.y_val, data.task, k)
        train_scores = self.predict_scores(model, data.x_train, data.task)
        for name, value in evaluate_scores(train_scores, data.y_train, data.task, k).items():
            metrics[f"train_{name}"] = value
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                metrics["converged"] = 0.0  # recorded as a metric rather than failing the job
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return FitResult(
            model=model,
            metrics=metrics,
            native=self._dump(model),
            native_format="joblib",
            n_train=len(data.x_train),
            n_validation=len(data.x_val),
            classes=list(data.classes),
        )

    def predict_scores(self, model: Any, x: NDArray[np.float32], task: Task) -> NDArray[np.float64]:
        if task == "classification":
            proba = np.asarray(model.predict_proba(x), dtype=np.float64)
            return proba[:, 1:2] if proba.shape[1] == 2 else proba
        return np.asarray(model.predict(x), dtype=np.float64).reshape(len(x), 1)

    def export_onnx(self, result: FitResult, data: TrainData) -> bytes:
        from onnx import TensorProto
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType

        model = result.model
        steps = getattr(model, "steps", None)
        final = steps[-1][1] if steps else model
        classify = data.task == "classification"
        proto = to_onnx(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, data.n_features]))],
            options={type(final): {"zipmap": False}} if classify else None,
            target_opset=DEFAULT_OPSET,
        )
        outputs = list(proto.graph.output)
        if classify:
            source = next(o for o in outputs if o.type.tensor_type.elem_type == TensorProto.FLOAT)
            k = len(final.classes_)
        else:
            (source,), k = outputs, 0
        attach_score_output(proto, source.name, data.task, k)
        onnx_bytes: bytes = proto.SerializeToString()
        return onnx_bytes

    def load_native(self, native: bytes, data: TrainData) -> Any:
        import joblib

        return joblib.load(io.BytesIO(native))

    @staticmethod
    def _dump(model: Any) -> bytes:
        import joblib

        buf = io.BytesIO()
        joblib.dump(model, buf)
        return buf.getvalue()


TRAINER = SklearnTrainer()
