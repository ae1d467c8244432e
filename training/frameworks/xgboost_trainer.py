# mypy: disable-error-code="import-untyped"
"""The XGBoost trainer: ``gradient_boosting`` (binary:logistic, multi:softprob or
reg:squarederror) boosted one round at a time through the native Booster API, so each round is
an epoch of the :class:`TrainContext` loop: validation metrics are reported, a checkpoint (the
booster's UBJ bytes) is offered, and a resumed run continues boosting from the saved booster.

Without row/column sampling (``subsample``, ``colsample_*`` = 1, the defaults) a run resumed
from a checkpoint grows exactly the trees an uninterrupted run would. With sampling, XGBoost
re-seeds its samplers when the booster is loaded, so the resumed trees differ from an
uninterrupted run's (still deterministic given the seed and the checkpoint).

Preemption is honoured between rounds: once ``ctx.preempting()``, the booster after the last
round is written with ``ctx.checkpoint_now`` (whatever the checkpoint policy) and
:class:`Preempted` is raised; at most the round under way is redone elsewhere.

``val_loss`` is log loss (classification) or mean squared error (regression), like the other
epoch-based trainers. When early stopping stops the run, the model is cut back to the round
with the lowest ``val_loss`` (XGBoost's own ``best_iteration`` behaviour).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import (
    CancelledError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
)

from ..spec import PARAMS
from .base import (
    FitResult,
    Preempted,
    Task,
    TrainContext,
    TrainData,
    bound_history,
    evaluate_scores,
    history_entry,
)
from .parity import INPUT_NAME, attach_score_output
from .sklearn_trainer import check_param_names, check_train_data

__all__ = ["TRAINER", "XGBoostTrainer"]

#: Booster params a spec may set (scikit-learn wrapper names; XGBoost accepts them as aliases),
#: besides ``n_estimators`` (the number of rounds) and ``n_jobs`` (threads, default 1): the
#: spec's table (``carrara.training.spec.PARAMS``), which validates specs without importing us.
_BOOSTER_PARAMS = PARAMS["xgboost"]["gradient_boosting"] - {"n_estimators", "n_jobs"}
_RESERVED = {
    "objective": "from model.task and the class count",
    "num_class": "from the class count",
    "eval_metric": "log loss or rmse, reported as val_loss",
    "random_state": "the job's seed",
    "seed": "the job's seed",
    "early_stopping_rounds": "use the job spec's early_stopping",
    "callbacks": "the trainer reports every round to the job",
}
_DEFAULTS: dict[str, Any] = {"n_estimators": 100, "max_depth": 6, "learning_rate": 0.3}
# A metric line of Booster.eval_set: "[3]\ttrain-logloss:0.12\tval-logloss:0.2"
_METRIC = re.compile(r"(\w+)-([\w@.]+):(-?[\d.eE+-]+|nan|inf)")


class _State(msgspec.Struct, kw_only=True):
    """The checkpoint blob: the booster after a round, the best round so far and the
    learning curve up to that round (:attr:`FitResult.history` entries)."""

    booster: bytes
    best_epoch: int = -1
    best_loss: float | None = None
    history: list[dict[str, float]] = msgspec.field(default_factory=list)


class XGBoostTrainer:
    """XGBoost boosted trees; see the module docstring."""

    framework = "xgboost"
    estimators: Mapping[str, Task | None] = {"gradient_boosting": None}
    # The ONNX tree ensemble sums leaf values in float32, XGBoost in float32 too, but in a
    # different order, and applies the sigmoid/softmax in float32: probabilities agree to a
    # few 1e-7. Regression sums of hundreds of leaves (plus a large base score) round at
    # ~1e-7 relative, hence the relative part.
    parity_atol = 1e-5
    parity_rtol = 1e-5

    def framework_version(self) -> str:
        import xgboost

        return str(xgboost.__version__)

    def booster_params(
        self, estimator: str, params: Mapping[str, Any], task: Task, n_classes: int, seed: int
    ) -> tuple[dict[str, Any], int]:
        """The Booster params and the number of rounds for a spec's ``model.params``."""
        if estimator not in self.estimators:
            raise InvalidArgumentError(
                f"unknown xgboost estimator {estimator!r}; known: gradient_boosting"
            )
        check_param_names(
            "xgboost", estimator, params, _BOOSTER_PARAMS | {"n_estimators", "n_jobs"}, _RESERVED
        )
        merged = {**_DEFAULTS, **params}
        rounds = merged.pop("n_estimators")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise InvalidArgumentError(
                f"param 'n_estimators' of xgboost/{estimator} must be a positive integer "
                f"(boosting rounds), got {rounds!r}"
            )
        nthread = merged.pop("n_jobs", 1)
        out: dict[str, Any] = {**merged, "nthread": nthread, "seed": seed, "verbosity": 0}
        if task == "classification" and n_classes > 2:
            out.update(objective="multi:softprob", num_class=n_classes, eval_metric="mlogloss")
        elif task == "classification":
            out.update(objective="binary:logistic", eval_metric="logloss")
        else:
            out.update(objective="reg:squarederror", eval_metric="rmse")
        return out, rounds

    def fit(
        self, estimator: str, params: Mapping[str, Any], data: TrainData, ctx: TrainContext
    ) -> FitResult:
        import xgboost as xgb

        k = check_train_data(data)
        booster_params, rounds = self.booster_params(estimator, params, data.task, k, ctx.seed)
        nthread = booster_params["nthread"]
        dtrain = xgb.DMatrix(data.x_train, label=data.y_train, nthread=nthread)
        evals = [(dtrain, "train")]
        if len(data.x_val):
            evals.append((xgb.DMatrix(data.x_val, label=data.y_val, nthread=nthread), "val"))
        cache = [d for d, _ in evals]
        checkpoint = ctx.resume()
        try:
            if checkpoint is not None:
                try:
                    state = msgspec.msgpack.decode(checkpoint.state, type=_State)
                    booster = xgb.Booster(
                        booster_params, cache, model_file=bytearray(state.booster)
                    )
                except (msgspec.DecodeError, xgb.core.XGBoostError) as exc:
                    raise FailedPreconditionError(
                        f"the checkpoint of round {checkpoint.epoch} is not an xgboost trainer "
                        f"checkpoint: {exc}"
                    ) from exc
                start = checkpoint.epoch + 1
            else:
                state = _State(booster=b"")
                booster = xgb.Booster(booster_params, cache)
                start = 0
            stopped_early = False
            epochs_run = start
            blob = b""  # the last round's checkpoint, for a preemption handback
            for i in range(start, rounds):
                if ctx.should_stop():
                    raise CancelledError(f"xgboost training cancelled after round {i - 1}")
                if ctx.preempting():
                    if not blob:
                        raise Preempted(f"xgboost training preempted before round {i}")
                    ctx.checkpoint_now(i - 1, blob)
                    raise Preempted(f"xgboost training preempted after round {i - 1}", epoch=i - 1)
                booster.update(dtrain, iteration=i)
                epochs_run = i + 1
                metrics = self._round_metrics(booster.eval_set(evals, iteration=i))
                loss = metrics.get("val_loss", metrics.get("loss", math.nan))
                if state.best_loss is None or loss < state.best_loss:
                    state.best_loss, state.best_epoch = loss, i
                state.history.append(
                    history_entry(
                        i, {k: v for k, v in metrics.items() if k == "loss" or k[:4] == "val_"}
                    )
                )
                stop = ctx.report(i, metrics)
                state.booster = bytes(booster.save_raw("ubj"))
                blob = msgspec.msgpack.encode(state)
                ctx.save_checkpoint(i, blob)
                if stop:
                    stopped_early = True
                    break
        except xgb.core.XGBoostError as exc:
            message = str(exc).split("Stack trace:")[0].strip().replace("\n", "; ")
            if "Parameter" in message or "Invalid" in message:
                raise InvalidArgumentError(
                    f"xgboost rejected the params of xgboost/{estimator}: {message}"
                ) from exc
            raise InternalError(f"xgboost failed while training: {message}") from exc
        if stopped_early and 0 <= state.best_epoch < epochs_run - 1:
            booster = booster[: state.best_epoch + 1]
        booster.set_param({"nthread": nthread})
        metrics = {}
        if len(data.x_val):
            metrics = evaluate_scores(
                self.predict_scores(booster, data.x_val, data.task), data.y_val, data.task, k
            )
        return FitResult(
            model=booster,
            metrics=metrics,
            native=bytes(booster.save_raw("ubj")),
            native_format="xgboost-ubj",
            n_train=len(data.x_train),
            n_validation=len(data.x_val),
            classes=list(data.classes),
            epochs_run=epochs_run,
            best_epoch=state.best_epoch,
            resumed_from_epoch=checkpoint.epoch if checkpoint is not None else -1,
            history=bound_history(state.history),
            extra={
                "rounds": booster.num_boosted_rounds(),
                "stopped_early": stopped_early,
                "objective": booster_params["objective"],
            },
        )

    @staticmethod
    def _round_metrics(line: str) -> dict[str, float]:
        """``loss``/``val_loss`` (log loss or MSE) and the raw eval metric of one round."""
        out: dict[str, float] = {}
        for split, name, value in _METRIC.findall(line):
            v = float(value)
            prefix = "" if split == "train" else "val_"
            loss = v * v if name == "rmse" else v
            out[f"{prefix}loss"] = loss
            if name == "rmse":
                out[f"{prefix}rmse"] = v
        return out

    def predict_scores(self, model: Any, x: NDArray[np.float32], task: Task) -> NDArray[np.float64]:
        import xgboost as xgb

        pred = np.asarray(model.predict(xgb.DMatrix(np.asarray(x, np.float32))), np.float64)
        return pred.reshape(len(x), -1) if pred.ndim == 1 else pred

    def export_onnx(self, result: FitResult, data: TrainData) -> bytes:
        from onnxmltools import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType

        k = len(result.classes) if data.task == "classification" else 0
        if data.task == "classification" and k == 0:
            k = int(np.max(data.y_train)) + 1
        # onnxmltools' XGBoost converter supports the default-domain opsets up to 15.
        proto = convert_xgboost(
            result.model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, data.n_features]))],
            target_opset=15,
        )
        names = [o.name for o in proto.graph.output]
        source = "probabilities" if data.task == "classification" else names[0]
        if source not in names:
            raise InvalidArgumentError(f"unexpected onnxmltools outputs {names}")
        attach_score_output(proto, source, data.task, k)
        onnx_bytes: bytes = proto.SerializeToString()
        return onnx_bytes

    def load_native(self, native: bytes, data: TrainData) -> Any:
        import xgboost as xgb

        booster = xgb.Booster({"nthread": 1}, model_file=bytearray(native))
        return booster


TRAINER = XGBoostTrainer()
