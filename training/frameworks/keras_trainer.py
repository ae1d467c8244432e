# mypy: disable-error-code="import-untyped"
"""The TensorFlow/Keras trainer: ``mlp``, a Keras 3 Sequential of ReLU Dense layers.

The model standardizes its own inputs (a ``Normalization`` layer holding the training split's
mean and variance) and, for regression, un-standardizes its output (a ``Rescaling`` layer with
the training labels' std and mean), so it serves raw features and predicts in label units; the
head is a sigmoid (binary), softmax (multi-class) or linear unit. Adam with ``lr``.

Training runs through ``model.fit`` with a callback that reports ``loss``/``val_loss`` after
every epoch, stops when the context says so (restoring the weights of the lowest-``val_loss``
epoch, like ``restore_best_weights``) and offers a checkpoint (model weights, optimizer state
and the best weights so far). A resumed run restores all of it and continues at the next epoch;
its batch order is re-seeded from ``seed + start epoch``, so it is deterministic but not
bit-identical to an uninterrupted run. Preemption is honoured between epochs: at the start of
the next epoch the state after the last one is written with ``ctx.checkpoint_now`` (whatever
the checkpoint policy) and :class:`Preempted` is raised, so at most the epoch under way is
redone. ONNX export: :mod:`.keras_onnx`.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from carrara.errors import CancelledError, FailedPreconditionError, InvalidArgumentError

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
from .keras_onnx import tf_numpy_compat
from .sklearn_trainer import check_param_names, check_train_data

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

__all__ = ["TRAINER", "KerasTrainer"]

_DEFAULTS: dict[str, Any] = {"epochs": 20, "batch_size": 64, "lr": 1e-3, "hidden": [32]}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"param {name!r} of tensorflow/mlp must be a positive integer, got {value!r}"
        )
    return value


def _params(params: Mapping[str, Any]) -> tuple[int, int, float, list[int]]:
    check_param_names("tensorflow", "mlp", params, set(_DEFAULTS))
    p = {**_DEFAULTS, **params}
    epochs = _positive_int("epochs", p["epochs"])
    batch_size = _positive_int("batch_size", p["batch_size"])
    lr = p["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise InvalidArgumentError(
            f"param 'lr' of tensorflow/mlp must be a positive number, got {lr!r}"
        )
    hidden = p["hidden"]
    if not isinstance(hidden, list | tuple):
        raise InvalidArgumentError(
            f"param 'hidden' of tensorflow/mlp must be a list of layer widths, got {hidden!r}"
        )
    return epochs, batch_size, float(lr), [_positive_int("hidden", h) for h in hidden]


def _pack(**arrays: list[NDArray[Any]] | float | int) -> bytes:
    """Checkpoint blob: lists of arrays as ``<key><i>`` entries of one npz, scalars as 0-d."""
    flat: dict[str, NDArray[Any]] = {}
    for key, value in arrays.items():
        if isinstance(value, list):
            flat[f"{key}_n"] = np.asarray(len(value))
            flat.update({f"{key}{i}": np.asarray(a) for i, a in enumerate(value)})
        else:
            flat[key] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **flat)  # type: ignore[arg-type]
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        items = {k: z[k] for k in z.files}
    out: dict[str, Any] = {}
    for key in [k[:-2] for k in items if k.endswith("_n")]:
        out[key] = [items[f"{key}{i}"] for i in range(int(items[f"{key}_n"]))]
    for key, value in items.items():
        if not key.endswith("_n") and value.ndim == 0:
            out[key] = value.item()
    return out


class KerasTrainer:
    """Keras 3 (TensorFlow backend) MLPs; see the module docstring."""

    framework = "tensorflow"
    estimators: Mapping[str, Task | None] = {"mlp": None}
    # Keras (TensorFlow, oneDNN kernels) and ONNX Runtime both compute in float32 but sum the
    # matrix products in different orders: probabilities differ by ~1e-7 and regression
    # outputs (scaled back to label units) by ~1e-7 relative. 1e-5 absolute plus 1e-5
    # relative leaves a 10-100x margin without hiding a wrong layer.
    parity_atol = 1e-5
    parity_rtol = 1e-5

    def framework_version(self) -> str:
        import keras
        import tensorflow as tf

        return f"keras {keras.__version__}, tensorflow {tf.__version__}"

    def build(
        self, data: TrainData, n_classes: int, hidden: list[int], lr: float, seed: int
    ) -> Any:
        """A compiled model for ``data`` (weights seeded by ``seed``)."""
        import keras

        keras.utils.set_random_seed(seed)
        x = np.asarray(data.x_train, np.float64)
        variance = x.var(axis=0)
        variance[~(variance > 0)] = 1.0  # constant features: leave them centred, unscaled
        layers: list[Any] = [
            keras.Input(shape=(data.n_features,), dtype="float32"),
            keras.layers.Normalization(mean=x.mean(axis=0), variance=variance),
        ]
        layers += [keras.layers.Dense(h, activation="relu") for h in hidden]
        if data.task == "regression":
            y = np.asarray(data.y_train, np.float64)
            std = float(y.std()) or 1.0
            layers += [
                keras.layers.Dense(1, activation="linear"),
                keras.layers.Rescaling(scale=std, offset=float(y.mean())),
            ]
            loss: Any = keras.losses.MeanSquaredError()
        elif n_classes == 2:
            layers.append(keras.layers.Dense(1, activation="sigmoid"))
            loss = keras.losses.BinaryCrossentropy()
        else:
            layers.append(keras.layers.Dense(n_classes, activation="softmax"))
            loss = keras.losses.SparseCategoricalCrossentropy()
        model = keras.Sequential(layers, name="carrara_mlp")
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=lr), loss=loss, jit_compile=False
        )
        return model

    @staticmethod
    def _targets(y: NDArray[Any], task: Task, n_classes: int) -> NDArray[Any]:
        if task == "regression" or n_classes == 2:
            return np.asarray(y, np.float32).reshape(-1, 1)
        return np.asarray(y, np.int64)

    def fit(
        self, estimator: str, params: Mapping[str, Any], data: TrainData, ctx: TrainContext
    ) -> FitResult:
        with tf_numpy_compat():
            return self._fit(estimator, params, data, ctx)

    def _fit(
        self, estimator: str, params: Mapping[str, Any], data: TrainData, ctx: TrainContext
    ) -> FitResult:
        import keras

        if estimator not in self.estimators:
            raise InvalidArgumentError(f"unknown tensorflow estimator {estimator!r}; known: mlp")
        epochs, batch_size, lr, hidden = _params(params)
        k = check_train_data(data)
        if ctx.should_stop():
            raise CancelledError("training cancelled before the Keras fit started")
        model = self.build(data, k, hidden, lr, ctx.seed)
        x = np.asarray(data.x_train, np.float32)
        y = self._targets(data.y_train, data.task, k)
        validation = None
        if len(data.x_val):
            validation = (
                np.asarray(data.x_val, np.float32),
                self._targets(data.y_val, data.task, k),
            )
        loop = _Loop(model, ctx)
        checkpoint = ctx.resume()
        start = 0
        if checkpoint is not None:
            try:
                loop.restore(_unpack(checkpoint.state))
            except (ValueError, KeyError, OSError) as exc:
                raise FailedPreconditionError(
                    f"the checkpoint of epoch {checkpoint.epoch} does not fit this model "
                    f"(written with other params or data?): {exc}"
                ) from exc
            start = checkpoint.epoch + 1
            keras.utils.set_random_seed(ctx.seed + start)
        if start < epochs:
            model.fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                initial_epoch=start,
                validation_data=validation,
                shuffle=True,
                verbose=0,
                callbacks=[loop.callback()],
            )
        epochs_run = max(start, loop.last_epoch + 1)
        if loop.stopped_early and loop.best_weights and loop.best_epoch < loop.last_epoch:
            model.set_weights(loop.best_weights)
        metrics: dict[str, float] = {}
        if len(data.x_val):
            metrics = evaluate_scores(
                self.predict_scores(model, data.x_val, data.task), data.y_val, data.task, k
            )
        return FitResult(
            model=model,
            metrics=metrics,
            native=self._save(model),
            native_format="keras",
            n_train=len(data.x_train),
            n_validation=len(data.x_val),
            classes=list(data.classes),
            epochs_run=epochs_run,
            best_epoch=loop.best_epoch,
            resumed_from_epoch=checkpoint.epoch if checkpoint is not None else -1,
            history=bound_history(loop.history),
            extra={"stopped_early": loop.stopped_early, "hidden": hidden},
        )

    def predict_scores(self, model: Any, x: NDArray[np.float32], task: Task) -> NDArray[np.float64]:
        x = np.asarray(x, np.float32)
        if len(x) == 0:
            width = int(model.outputs[0].shape[-1])
            return np.zeros((0, width), np.float64)
        import keras

        # A direct (eager) call per chunk: model.predict would trace a new tf.function for
        # every model, which costs more than the tiny MLP's forward pass.
        with tf_numpy_compat():
            parts = [
                keras.ops.convert_to_numpy(model(x[i : i + 65536], training=False))
                for i in range(0, len(x), 65536)
            ]
        return np.concatenate(parts).astype(np.float64).reshape(len(x), -1)

    def export_onnx(self, result: FitResult, data: TrainData) -> bytes:
        from .keras_onnx import export_sequential

        with tf_numpy_compat():
            return export_sequential(result.model, data.n_features)

    def load_native(self, native: bytes, data: TrainData) -> Any:
        import keras

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            path.write_bytes(native)
            with tf_numpy_compat():
                return keras.saving.load_model(path, compile=False)

    @staticmethod
    def _save(model: Any) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            model.save(path)
            return path.read_bytes()


#: The checkpoint's learning-curve table: one row per epoch (NaN: not reported).
_HISTORY_COLUMNS = ("epoch", "loss", "val_loss")


def _history_table(history: list[dict[str, float]]) -> NDArray[np.float64]:
    rows = [[h.get(c, math.nan) for c in _HISTORY_COLUMNS] for h in history]
    return np.asarray(rows, np.float64).reshape(-1, len(_HISTORY_COLUMNS))


class _Loop:
    """The per-epoch side of training: report, track the best epoch, checkpoint, stop."""

    def __init__(self, model: Any, ctx: TrainContext) -> None:
        self.model = model
        self.ctx = ctx
        self.best_loss: float | None = None
        self.best_epoch = -1
        self.best_weights: list[NDArray[Any]] = []
        self.last_epoch = -1
        self.stopped_early = False
        self.history: list[dict[str, float]] = []  # FitResult.history, resumed epochs included

    def state(self) -> bytes:
        optimizer = self.model.optimizer
        return _pack(
            weights=[np.asarray(w) for w in self.model.get_weights()],
            optimizer=[np.asarray(v.numpy()) for v in optimizer.variables],
            best=self.best_weights,
            best_epoch=self.best_epoch,
            best_loss=math.nan if self.best_loss is None else self.best_loss,
            history=[_history_table(self.history)],
        )

    def restore(self, state: Mapping[str, Any]) -> None:
        self.model.set_weights(state["weights"])
        optimizer = self.model.optimizer
        optimizer.build(self.model.trainable_variables)
        saved = state["optimizer"]
        if len(saved) != len(optimizer.variables):
            raise FailedPreconditionError(
                f"the checkpoint holds {len(saved)} optimizer variables, the model's Adam "
                f"has {len(optimizer.variables)}; it was written for other params"
            )
        for variable, value in zip(optimizer.variables, saved, strict=True):
            variable.assign(value)
        self.best_weights = list(state["best"])
        self.best_epoch = int(state["best_epoch"])
        loss = float(state["best_loss"])
        self.best_loss = None if math.isnan(loss) else loss
        table = state.get("history") or [np.zeros((0, len(_HISTORY_COLUMNS)))]
        self.history = [
            history_entry(int(row[0]) - 1, dict(zip(_HISTORY_COLUMNS[1:], row[1:], strict=True)))
            for row in np.asarray(table[0], np.float64).reshape(-1, len(_HISTORY_COLUMNS))
        ]

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        logs = logs or {}
        metrics = {k: float(v) for k, v in logs.items() if k in ("loss", "val_loss")}
        self.last_epoch = epoch
        self.history.append(history_entry(epoch, metrics))
        loss = metrics.get("val_loss", metrics.get("loss", math.nan))
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self.best_weights = [np.array(w) for w in self.model.get_weights()]
        stop = self.ctx.report(epoch, metrics)
        self.ctx.save_checkpoint(epoch, self.state())
        if stop:
            self.stopped_early = True
            self.model.stop_training = True

    def on_epoch_begin(self, epoch: int) -> None:
        if self.ctx.should_stop():
            raise CancelledError(f"Keras training cancelled before epoch {epoch}")
        if self.ctx.preempting():
            if self.last_epoch < 0:  # no epoch of this attempt done: nothing new to save
                raise Preempted(f"Keras training preempted before epoch {epoch}")
            # The weights and optimizer now are the end of the last epoch's.
            self.ctx.checkpoint_now(self.last_epoch, self.state())
            raise Preempted(
                f"Keras training preempted after epoch {self.last_epoch}", epoch=self.last_epoch
            )

    def callback(self) -> Any:
        import keras

        loop = self

        class _Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                loop.on_epoch_begin(epoch)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                loop.on_epoch_end(epoch, logs)

        return _Callback()


TRAINER = KerasTrainer()
