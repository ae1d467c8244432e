"""The trainer contract every framework implements, and what they share.

A :class:`Trainer` turns a :class:`TrainData` (float32 features, encoded labels, a time-ordered
train/validation split built by the worker) into a :class:`FitResult`: the fitted native model,
its framework-native artifact bytes, and validation metrics computed by :func:`evaluate_scores`
from the model's *served scores* (:meth:`Trainer.predict_scores`), so every framework reports
the same metrics the same way. :meth:`Trainer.export_onnx` produces the serving artifact: one
float32 input ``features: [batch, d]``, first output ``score`` (float32):

- binary classification: ``[batch, 1]``, P(class index 1);
- multi-class: ``[batch, k]``, class probabilities in class-index order;
- regression: ``[batch, 1]``, the prediction.

Labels: for classification the worker encodes labels as ``int64`` class indices ``0..k-1``
(``TrainData.classes`` holds the original labels in index order); for regression they are
``float64``.

Epoch-based trainers (PyTorch, Keras, XGBoost rounds) drive a loop through the
:class:`TrainContext`::

    state = ctx.resume()                      # Checkpoint | None: continue after state.epoch
    for epoch in range(start, max_epochs):
        ...train one epoch...
        stop = ctx.report(epoch, {"val_loss": v, ...})   # early stopping / pruning / cancel
        ctx.save_checkpoint(epoch, blob)                  # the policy decides if it is written
        if stop: break

``report`` raises :class:`carrara.training.frameworks.base.Pruned` when a search pruner stops
the trial and :class:`JobCancelledError`-like errors when the job is cancelled; it returns True
when early stopping says to stop. ``save_checkpoint`` is called after ``report`` so the
context persists its early-stopping state together with the trainer's blob.

Preemption (a spot notice, SIGTERM): ``ctx.preempting()`` is a cheap flag (no I/O) that
trainers poll at their checkpoint points — PyTorch after every step, XGBoost per round, Keras
per epoch. A preempted trainer writes its state with ``ctx.checkpoint_now`` (whatever the
checkpoint policy; ``step > 0`` marks a checkpoint taken that many steps into the next epoch)
and raises :class:`Preempted`; the worker hands the job back to the queue and another worker
resumes from that checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import CancelledError, CarraraError, FailedPreconditionError

__all__ = [
    "Checkpoint",
    "EarlyStopper",
    "FitResult",
    "LocalContext",
    "Preempted",
    "Pruned",
    "RankFailedError",
    "TrainContext",
    "TrainData",
    "Trainer",
    "MAX_HISTORY_POINTS",
    "bound_history",
    "evaluate_scores",
    "history_entry",
]

Task = Literal["classification", "regression"]


class Pruned(CarraraError):
    """A hyperparameter-search pruner stopped this trial (not a failure of the job)."""


class Preempted(CancelledError):
    """The run stopped because its worker is going away (spot preemption notice, SIGTERM);
    its state is checkpointed and the job goes back to the queue, not to CANCELLED.

    ``epoch``/``step`` locate the handback checkpoint as in :class:`Checkpoint` (``epoch``
    None: nothing new was checkpointed; the run's previous checkpoint stands)."""

    def __init__(self, message: str, *, epoch: int | None = None, step: int = 0) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class RankFailedError(FailedPreconditionError):
    """A node's torchrun ranks failed (a rank died, or lost its peers): in a multi-node job the
    attempt failed, not the job; the worker requeues it to resume from its checkpoint."""


class TrainData(msgspec.Struct, kw_only=True):
    """The training set as arrays, split by time (the newest rows validate)."""

    x_train: NDArray[np.float32]
    y_train: NDArray[Any]  # int64 class indices (classification) or float64 (regression)
    x_val: NDArray[np.float32]
    y_val: NDArray[Any]
    feature_names: list[str]
    task: Task
    classes: list[Any] = msgspec.field(default_factory=list)  # original labels, index order

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    epoch: int  # the last COMPLETED epoch (0-based); resume at epoch + 1
    state: bytes  # the trainer's own blob (weights, optimizer, RNG, best-so-far)
    step: int = 0  # > 0: taken this many steps into epoch + 1 (a preempted run's handback)


class FitResult(msgspec.Struct, kw_only=True):
    model: Any  # the fitted native model object
    metrics: dict[str, float]
    native: bytes  # framework-native artifact (joblib, xgboost JSON, torch state dict, .keras)
    native_format: str
    n_train: int
    n_validation: int
    classes: list[Any] = msgspec.field(default_factory=list)
    epochs_run: int = 0  # epochs (or boosting rounds) trained in total, resumed ones included
    best_epoch: int = -1
    resumed_from_epoch: int = -1  # -1: started from scratch
    extra: dict[str, Any] = msgspec.field(default_factory=dict)  # trainer-specific lineage
    #: the learning curve: one entry per epoch (boosting round) of the whole run, resumed
    #: epochs included, from :func:`history_entry`, thinned by :func:`bound_history`; empty
    #: for trainers without epochs (scikit-learn)
    history: list[dict[str, float]] = msgspec.field(default_factory=list)


@runtime_checkable
class TrainContext(Protocol):
    """What a trainer may ask of the run it is part of."""

    seed: int

    def should_stop(self) -> bool:
        """True once the job is cancelled; trainers may poll it between epochs."""
        ...

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Validation metrics after ``epoch``; True when early stopping says stop. Raises
        :class:`Pruned` when a search pruner stops the trial."""
        ...

    def resume(self) -> Checkpoint | None:
        """The last checkpoint of this run (another worker's, after a crash), or None."""
        ...

    def save_checkpoint(self, epoch: int, state: bytes) -> None:
        """Offer a checkpoint after ``epoch``; the checkpoint policy decides if it is kept."""
        ...

    def preempting(self) -> bool:
        """True once the worker must hand the job back (spot notice, SIGTERM): checkpoint at
        the next step or epoch and raise :class:`Preempted`. Cheap: polled every step."""
        ...

    def checkpoint_now(self, epoch: int, state: bytes, *, step: int = 0) -> None:
        """Write a checkpoint whatever the policy (the handback of a preempted run):
        ``epoch`` completed plus ``step`` steps of the next one."""
        ...


class Trainer(Protocol):
    """One framework's trainer (see the module docstring for the contract)."""

    framework: str
    #: estimator name -> the task it is limited to (None: classification or regression)
    estimators: Mapping[str, Task | None]
    #: ONNX parity tolerance: |onnx - native| <= atol + rtol * |native| on every row
    parity_atol: float
    parity_rtol: float

    def framework_version(self) -> str: ...

    def fit(
        self, estimator: str, params: Mapping[str, Any], data: TrainData, ctx: TrainContext
    ) -> FitResult: ...

    def predict_scores(self, model: Any, x: NDArray[np.float32], task: Task) -> NDArray[np.float64]:
        """The native model's scores in the served ``score`` shape (module docstring)."""
        ...

    def export_onnx(self, result: FitResult, data: TrainData) -> bytes:
        """The serving artifact (serialized ONNX ``ModelProto``)."""
        ...

    def load_native(self, native: bytes, data: TrainData) -> Any:
        """The model back from :attr:`FitResult.native` (round-trip tested)."""
        ...


def evaluate_scores(
    scores: NDArray[np.float64], y: NDArray[Any], task: Task, n_classes: int = 0
) -> dict[str, float]:
    """Validation metrics from served scores: AUC, log loss and accuracy for classification
    (``y`` class indices); RMSE, MAE and R² for regression. AUC is left out when ``y`` has a
    single class; non-finite values are dropped."""
    from sklearn import metrics as m

    out: dict[str, float] = {}
    if len(y) == 0:
        return out
    if task == "classification":
        s = np.asarray(scores, np.float64)
        if s.ndim == 2 and s.shape[1] == 1:
            p1 = np.clip(s[:, 0], 0.0, 1.0)
            proba = np.stack([1.0 - p1, p1], axis=1)
        else:
            proba = np.clip(s, 0.0, 1.0)
        proba = proba / np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)
        k = max(n_classes, proba.shape[1])
        labels = list(range(k))
        yi = np.asarray(y, np.int64)
        out["accuracy"] = float(np.mean(np.argmax(proba, axis=1) == yi))
        out["log_loss"] = float(m.log_loss(yi, proba, labels=labels))
        if len(np.unique(yi)) > 1:
            if proba.shape[1] == 2:
                out["auc"] = float(m.roc_auc_score(yi == 1, proba[:, 1]))
            else:
                out["auc"] = float(m.roc_auc_score(yi, proba, multi_class="ovr", labels=labels))
    else:
        pred = np.asarray(scores, np.float64).reshape(-1)
        yt = np.asarray(y, np.float64)
        out["rmse"] = math.sqrt(float(m.mean_squared_error(yt, pred)))
        out["mae"] = float(m.mean_absolute_error(yt, pred))
        if len(yt) > 1:
            out["r2"] = float(m.r2_score(yt, pred))
    return {k: v for k, v in out.items() if math.isfinite(v)}


#: The most points a :attr:`FitResult.history` keeps (longer runs are thinned).
MAX_HISTORY_POINTS = 1000


def history_entry(epoch: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """One learning-curve point for the 0-based ``epoch``: ``{"epoch": epoch + 1, ...}`` plus
    ``metrics``, whose keys the trainer has already spelt ``loss`` (training) or ``val_*``
    (validation); non-finite values are left out."""
    out = {"epoch": float(epoch + 1)}
    out.update((k, float(v)) for k, v in metrics.items() if math.isfinite(float(v)))
    return out


def bound_history(
    history: list[dict[str, float]], max_points: int = MAX_HISTORY_POINTS
) -> list[dict[str, float]]:
    """``history`` with at most ``max_points`` entries: every k-th one from the first, plus
    the last (each entry keeps its own ``epoch``, so a thinned curve still plots right)."""
    n = len(history)
    if n <= max_points:
        return list(history)
    if max_points < 2:
        return history[-max_points:] if max_points > 0 else []
    k = -(-(n - 1) // (max_points - 1))  # ceil: ceil((n - 1) / k) + 1 <= max_points
    return [*history[0 : n - 1 : k], history[-1]]


class EarlyStopper:
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` reports.

    Its state (``best``, ``best_epoch``, ``bad``) is plain data so a context can checkpoint it.
    """

    def __init__(
        self,
        metric: str,
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch = -1
        self.bad = 0

    def update(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Record one epoch; True when training should stop."""
        if self.metric not in metrics:
            raise CarraraError(
                f"early stopping watches {self.metric!r}, but the trainer reported "
                f"{sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        better = self.best is None or (
            value < self.best - self.min_delta
            if self.mode == "min"
            else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_epoch, self.bad = value, epoch, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", -1))
        self.bad = int(state.get("bad", 0))


class LocalContext:
    """An in-process context for direct use and tests: optional early stopping, checkpoints
    kept in memory (``checkpoints``), cancellation by setting ``cancelled``, preemption by
    setting ``preempted``."""

    def __init__(self, *, seed: int = 0, early_stopping: EarlyStopper | None = None) -> None:
        self.seed = seed
        self.early_stopping = early_stopping
        self.checkpoints: list[Checkpoint] = []
        self.reports: list[tuple[int, dict[str, float]]] = []
        self.cancelled = False
        self.preempted = False

    def should_stop(self) -> bool:
        return self.cancelled

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self.reports.append((epoch, dict(metrics)))
        return self.early_stopping.update(epoch, metrics) if self.early_stopping else False

    def resume(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def save_checkpoint(self, epoch: int, state: bytes) -> None:
        self.checkpoints.append(Checkpoint(epoch=epoch, state=state))

    def preempting(self) -> bool:
        return self.preempted

    def checkpoint_now(self, epoch: int, state: bytes, *, step: int = 0) -> None:
        self.checkpoints.append(Checkpoint(epoch=epoch, state=state, step=step))
