"""The XGBoost trainer: metrics, ONNX parity, native round trip, per-round reporting, early
stopping, checkpoint/resume (bit-identical to an uninterrupted run) and bad params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from carrara.errors import CancelledError, FailedPreconditionError, InvalidArgumentError
from carrara.gateway.backends import OnnxBackend
from carrara.training.frameworks import Checkpoint, EarlyStopper, LocalContext, Pruned, TrainData
from carrara.training.frameworks.parity import check_parity
from carrara.training.frameworks.xgboost_trainer import TRAINER as XGB

from .conftest import make_data as _make_data


def make_data(
    task: str, k: int = 0, *, n: int = 1500, seed: int = 0, noise: float = 0.3
) -> TrainData:
    return _make_data(task, k, n=n, seed=seed, noise=noise)


PARAMS = {"n_estimators": 40, "max_depth": 3, "learning_rate": 0.3}


@pytest.mark.parametrize(
    ("task", "k"), [("classification", 2), ("classification", 3), ("regression", 0)]
)
def test_fit_metrics_parity_roundtrip(task: str, k: int) -> None:
    data = make_data(task, k)
    ctx = LocalContext(seed=3)
    result = XGB.fit("gradient_boosting", PARAMS, data, ctx)
    if task == "classification":
        assert result.metrics["auc"] > 0.95 and result.metrics["accuracy"] > 0.85
    else:
        assert result.metrics["rmse"] < 0.3 * float(np.std(data.y_val))
    assert result.native_format == "xgboost-ubj"
    assert result.epochs_run == 40 and result.resumed_from_epoch == -1
    assert result.model.num_boosted_rounds() == 40
    assert (
        result.extra["objective"]
        == {2: "binary:logistic", 3: "multi:softprob", 0: "reg:squarederror"}[k]
    )
    # one report and one checkpoint offer per boosting round, in order
    assert [e for e, _ in ctx.reports] == list(range(40))
    assert [c.epoch for c in ctx.checkpoints] == list(range(40))
    assert {"loss", "val_loss"} <= set(ctx.reports[0][1])
    val_losses = [m["val_loss"] for _, m in ctx.reports]
    assert val_losses[-1] < val_losses[0]
    assert result.best_epoch == int(np.argmin(val_losses))
    if task == "regression":  # val_loss is the MSE: the squared rmse XGBoost evaluates
        assert ctx.reports[-1][1]["val_loss"] == pytest.approx(
            result.metrics["rmse"] ** 2, rel=1e-4
        )
    else:
        assert ctx.reports[-1][1]["val_loss"] == pytest.approx(result.metrics["log_loss"], rel=1e-3)
    # the learning curve: one entry per round, train/validation loss (and rmse) of each
    h = result.history
    assert len(h) == result.epochs_run == 40
    assert [e["epoch"] for e in h] == [float(i) for i in range(1, 41)]
    assert [e["val_loss"] for e in h] == val_losses
    assert [e["loss"] for e in h] == [m["loss"] for _, m in ctx.reports]
    if task == "regression":
        assert set(h[-1]) == {"epoch", "loss", "val_loss", "val_rmse"}
        assert h[-1]["val_rmse"] == pytest.approx(result.metrics["rmse"], rel=1e-4)
    else:
        assert set(h[-1]) == {"epoch", "loss", "val_loss"}

    # ONNX parity on 300 rows, within the tolerance the trainer states
    onnx_bytes = XGB.export_onnx(result, data)
    parity = check_parity(XGB, result.model, onnx_bytes, data.x_val, data.task)
    assert parity.ok and parity.rows == 300 and (parity.atol, parity.rtol) == (1e-5, 1e-5)
    width = 3 if k == 3 else 1
    backend = OnnxBackend(onnx_bytes)
    assert backend.info.output_names[0] == "score" and backend.info.output_dim == width
    scores = XGB.predict_scores(result.model, data.x_val, data.task)
    assert scores.shape == (300, width)
    if k == 3:
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    # the native artifact scores identically after a round trip
    loaded = XGB.load_native(result.native, data)
    np.testing.assert_array_equal(XGB.predict_scores(loaded, data.x_val, data.task), scores)


def test_deterministic_given_the_seed() -> None:
    data = make_data("classification", 2)
    params = {**PARAMS, "n_estimators": 10, "subsample": 0.7, "colsample_bytree": 0.6}
    a = XGB.fit("gradient_boosting", params, data, LocalContext(seed=5))
    b = XGB.fit("gradient_boosting", params, data, LocalContext(seed=5))
    c = XGB.fit("gradient_boosting", params, data, LocalContext(seed=6))
    assert a.native == b.native
    assert not np.array_equal(
        XGB.predict_scores(a.model, data.x_val, "classification"),
        XGB.predict_scores(c.model, data.x_val, "classification"),
    )


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_round() -> None:
    data = make_data("classification", 2, noise=1.5)  # noisy: deep trees overfit quickly
    stopper = EarlyStopper("val_loss", patience=3)
    ctx = LocalContext(seed=0, early_stopping=stopper)
    params = {"n_estimators": 200, "max_depth": 6, "learning_rate": 0.5}
    result = XGB.fit("gradient_boosting", params, data, ctx)
    assert result.extra["stopped_early"] is True
    assert result.epochs_run < 200
    assert result.best_epoch == stopper.best_epoch >= 0
    assert result.epochs_run == result.best_epoch + 1 + 3  # patience rounds after the best
    # the model is cut back to the best round, whose val loss the metrics reproduce
    assert result.model.num_boosted_rounds() == result.best_epoch + 1
    best_loss = ctx.reports[result.best_epoch][1]["val_loss"]
    assert result.metrics["log_loss"] == pytest.approx(best_loss, rel=1e-3)


@pytest.mark.parametrize(("task", "k"), [("classification", 3), ("regression", 0)])
def test_resume_continues_at_the_next_round_exactly(task: str, k: int) -> None:
    data = make_data(task, k)
    params = PARAMS  # no sampling: resumed trees are bit-identical (see the module docstring)
    first = LocalContext(seed=11)
    part = XGB.fit("gradient_boosting", {**params, "n_estimators": 3}, data, first)
    assert part.epochs_run == 3 and [c.epoch for c in first.checkpoints] == [0, 1, 2]

    resumed = LocalContext(seed=11)
    resumed.checkpoints = list(first.checkpoints)
    result = XGB.fit("gradient_boosting", {**params, "n_estimators": 8}, data, resumed)
    assert result.epochs_run == 8 and result.resumed_from_epoch == 2
    assert [e for e, _ in resumed.reports] == [3, 4, 5, 6, 7]
    assert result.model.num_boosted_rounds() == 8

    whole = XGB.fit("gradient_boosting", {**params, "n_estimators": 8}, data, LocalContext(seed=11))
    np.testing.assert_array_equal(
        XGB.predict_scores(result.model, data.x_val, data.task),
        XGB.predict_scores(whole.model, data.x_val, data.task),
    )
    # best-so-far travels in the checkpoint: the resumed run knows rounds 0..2
    all_losses = [m["val_loss"] for _, m in first.reports] + [
        m["val_loss"] for _, m in resumed.reports
    ]
    assert result.best_epoch == int(np.argmin(all_losses))
    # the curve travels in the checkpoint too: all 8 rounds, not only the resumed ones
    assert [e["epoch"] for e in result.history] == [float(i) for i in range(1, 9)]
    assert [e["val_loss"] for e in result.history] == all_losses
    assert result.history == whole.history


class _PruneAt(LocalContext):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        if epoch == self.at:
            raise Pruned(f"pruned at {epoch}")
        return super().report(epoch, metrics)


class _CancelAfter(LocalContext):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def should_stop(self) -> bool:
        return len(self.reports) > self.after


def test_pruning_and_cancellation_end_the_run() -> None:
    data = make_data("regression")
    with pytest.raises(Pruned):
        XGB.fit("gradient_boosting", PARAMS, data, _PruneAt(4))
    ctx = _CancelAfter(2)
    with pytest.raises(CancelledError, match="after round 2"):
        XGB.fit("gradient_boosting", PARAMS, data, ctx)
    assert len(ctx.reports) == 3


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n_trees": 5}, "unknown param 'n_trees'"),
        ({"objective": "reg:absoluteerror"}, "param 'objective' .* is set by the trainer"),
        ({"random_state": 1}, "param 'random_state'"),
        ({"n_estimators": 0}, "'n_estimators' .* positive integer"),
        ({"n_estimators": 2.5}, "'n_estimators'"),
        ({"max_depth": -1}, "max_depth"),
    ],
)
def test_bad_params_name_the_param(params: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        XGB.fit("gradient_boosting", params, make_data("classification", 2), LocalContext())


def test_unknown_estimator() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown xgboost estimator 'mlp'"):
        XGB.fit("mlp", {}, make_data("regression"), LocalContext())


def test_resume_with_sampling_is_deterministic_and_still_learns() -> None:
    data = make_data("classification", 2)
    params = {**PARAMS, "subsample": 0.8, "colsample_bytree": 0.8}
    first = LocalContext(seed=2)
    XGB.fit("gradient_boosting", {**params, "n_estimators": 5}, data, first)
    runs = []
    for _ in range(2):
        ctx = LocalContext(seed=2)
        ctx.checkpoints = list(first.checkpoints)
        runs.append(XGB.fit("gradient_boosting", {**params, "n_estimators": 30}, data, ctx))
    assert runs[0].native == runs[1].native
    assert runs[0].resumed_from_epoch == 4 and runs[0].epochs_run == 30
    assert runs[0].metrics["auc"] > 0.95


def test_a_foreign_checkpoint_is_refused() -> None:
    ctx = LocalContext()
    ctx.checkpoints = [Checkpoint(epoch=4, state=b"not a checkpoint")]
    with pytest.raises(FailedPreconditionError, match="round 4 is not an xgboost"):
        XGB.fit("gradient_boosting", PARAMS, make_data("regression"), ctx)
