"""The TensorFlow/Keras trainer and its ONNX exporter: metrics, parity, native round trip,
per-epoch reporting, early stopping with best-weight restore, checkpoint/resume and bad params.
Small data and few epochs: each fit takes a second or two on one core."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from carrara.errors import CancelledError, FailedPreconditionError, InvalidArgumentError
from carrara.gateway.backends import OnnxBackend
from carrara.training.frameworks import EarlyStopper, FitResult, LocalContext, TrainData
from carrara.training.frameworks.keras_onnx import export_sequential
from carrara.training.frameworks.keras_trainer import TRAINER as KERAS
from carrara.training.frameworks.parity import check_parity

from .conftest import make_data as _make_data


def make_data(
    task: str, k: int = 0, *, n: int = 2000, seed: int = 0, noise: float = 0.3
) -> TrainData:
    # unscaled, offset features: the model must standardize them itself
    return _make_data(
        task,
        k,
        n=n,
        seed=seed,
        noise=noise,
        scale=[1.0, 10.0, 0.1, 5.0, 1.0],
        offset=[0, 100, -3, 0, 7],
        target_scale=10.0,
    )


PARAMS = {"epochs": 6, "batch_size": 64, "lr": 0.01, "hidden": [16, 8]}


@pytest.mark.parametrize(
    ("task", "k"), [("classification", 2), ("classification", 3), ("regression", 0)]
)
def test_fit_metrics_parity_roundtrip(task: str, k: int) -> None:
    data = make_data(task, k, n=1500)
    ctx = LocalContext(seed=4)
    result = KERAS.fit("mlp", PARAMS, data, ctx)
    if task == "classification":
        # the noise caps 3-class accuracy near 0.87
        assert result.metrics["auc"] > 0.95 and result.metrics["accuracy"] > 0.8
    else:
        assert result.metrics["rmse"] < 0.2 * float(np.std(data.y_val)), result.metrics
    assert (result.n_train, result.n_validation) == (1200, 300)
    assert result.native_format == "keras" and result.native[:2] == b"PK"  # .keras zip
    assert result.epochs_run == 6 and result.resumed_from_epoch == -1
    assert [e for e, _ in ctx.reports] == list(range(6))
    assert [c.epoch for c in ctx.checkpoints] == list(range(6))
    assert set(ctx.reports[0][1]) == {"loss", "val_loss"}
    val_losses = [m["val_loss"] for _, m in ctx.reports]
    assert result.best_epoch == int(np.argmin(val_losses))
    assert val_losses[-1] < val_losses[0]
    assert result.history == [
        {"epoch": float(e + 1), "loss": m["loss"], "val_loss": m["val_loss"]}
        for e, m in ctx.reports
    ]

    onnx_bytes = KERAS.export_onnx(result, data)
    parity = check_parity(KERAS, result.model, onnx_bytes, data.x_val, data.task)
    assert parity.ok and parity.rows == 300 and (parity.atol, parity.rtol) == (1e-5, 1e-5)
    width = 3 if k == 3 else 1
    backend = OnnxBackend(onnx_bytes)
    assert backend.info.output_names == ("score",) and backend.info.output_dim == width
    scores = KERAS.predict_scores(result.model, data.x_val, data.task)
    assert scores.shape == (300, width) and scores.dtype == np.float64
    if task == "classification":
        assert np.all((scores >= 0) & (scores <= 1))
    loaded = KERAS.load_native(result.native, data)
    np.testing.assert_array_equal(KERAS.predict_scores(loaded, data.x_val, data.task), scores)


def test_deterministic_given_the_seed() -> None:
    data = make_data("classification", 2, n=600)
    params = {**PARAMS, "epochs": 2}
    a, b, c = (KERAS.fit("mlp", params, data, LocalContext(seed=s)) for s in (1, 1, 2))
    sa, sb, sc = (KERAS.predict_scores(r.model, data.x_val, "classification") for r in (a, b, c))
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(sa, sc)


def test_early_stopping_stops_on_a_plateau_and_restores_the_best_weights() -> None:
    # pure-noise labels: validation loss stops improving within a few epochs
    data = make_data("classification", 2, n=800, noise=50.0)
    stopper = EarlyStopper("val_loss", patience=2)
    ctx = LocalContext(seed=0, early_stopping=stopper)
    params = {"epochs": 40, "batch_size": 32, "lr": 0.05, "hidden": [32]}
    result = KERAS.fit("mlp", params, data, ctx)
    assert result.extra["stopped_early"] is True
    assert result.epochs_run < 40
    assert result.best_epoch == stopper.best_epoch >= 0
    assert result.epochs_run == result.best_epoch + 1 + 2
    # the returned model is the best epoch's: its log loss is that epoch's val_loss
    best_loss = ctx.reports[result.best_epoch][1]["val_loss"]
    assert result.metrics["log_loss"] == pytest.approx(best_loss, abs=1e-4)


def test_resume_continues_at_the_next_epoch_with_the_optimizer_state() -> None:
    data = make_data("regression", n=600)
    first = LocalContext(seed=9)
    part = KERAS.fit("mlp", {**PARAMS, "epochs": 3}, data, first)
    assert part.epochs_run == 3 and [c.epoch for c in first.checkpoints] == [0, 1, 2]

    resumed = LocalContext(seed=9)
    resumed.checkpoints = list(first.checkpoints)
    result = KERAS.fit("mlp", {**PARAMS, "epochs": 6}, data, resumed)
    assert result.epochs_run == 6 and result.resumed_from_epoch == 2
    assert [e for e, _ in resumed.reports] == [3, 4, 5]
    # Adam's step counter went on from the checkpoint: 6 epochs of ceil(480 / 64) = 8 steps
    assert int(result.model.optimizer.iterations.numpy()) == 6 * 8
    # training went on from the saved weights, not from scratch
    assert resumed.reports[0][1]["val_loss"] < first.reports[0][1]["val_loss"]
    assert result.metrics["rmse"] < 0.5 * float(np.std(data.y_val))
    # the curve covers all 6 epochs: the checkpoint carried epochs 1-3
    assert [e["epoch"] for e in result.history] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [e["val_loss"] for e in result.history] == [
        m["val_loss"] for _, m in first.reports + resumed.reports
    ]
    # nothing left to do: a checkpoint at the last epoch returns at once
    done = LocalContext(seed=9)
    done.checkpoints = list(first.checkpoints)
    again = KERAS.fit("mlp", {**PARAMS, "epochs": 3}, data, done)
    assert again.epochs_run == 3 and done.reports == []
    assert again.history == part.history and len(again.history) == 3


def test_cancellation_between_epochs() -> None:
    class CancelAfterTwo(LocalContext):
        def should_stop(self) -> bool:
            return len(self.reports) >= 2

    ctx = CancelAfterTwo()
    with pytest.raises(CancelledError, match="before epoch 2"):
        KERAS.fit("mlp", {**PARAMS, "epochs": 5}, make_data("regression", n=300), ctx)
    assert len(ctx.reports) == 2


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"layers": [8]}, "unknown param 'layers'"),
        ({"epochs": 0}, "'epochs' .* positive integer"),
        ({"batch_size": "big"}, "'batch_size'"),
        ({"lr": -0.1}, "'lr' .* positive number"),
        ({"hidden": 16}, "'hidden' .* list of layer widths"),
        ({"hidden": [16, 0]}, "'hidden'"),
    ],
)
def test_bad_params_name_the_param(params: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        KERAS.fit("mlp", params, make_data("regression", n=100), LocalContext())


def test_exporter_refuses_layers_it_cannot_translate() -> None:
    import keras

    dropout = keras.Sequential(
        [
            keras.Input(shape=(3,)),
            keras.layers.Dense(4),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1),
        ]
    )
    with pytest.raises(FailedPreconditionError, match="is a Dropout"):
        export_sequential(dropout, 3)
    tanh = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(2, activation="tanh")])
    with pytest.raises(FailedPreconditionError, match="activation 'tanh'"):
        export_sequential(tanh, 3)


def test_exporter_matches_a_hand_built_model() -> None:
    import keras

    data = make_data("classification", 3, n=200)
    model = keras.Sequential(
        [
            keras.Input(shape=(5,)),
            keras.layers.Normalization(mean=[0, 100, -3, 0, 7], variance=[1, 100, 0.01, 25, 1]),
            keras.layers.Dense(6),
            keras.layers.Activation("relu"),
            keras.layers.Dense(3),
            keras.layers.Activation("softmax"),
        ]
    )
    result = FitResult(
        model=model, metrics={}, native=b"", native_format="keras", n_train=0, n_validation=0
    )
    onnx_bytes = KERAS.export_onnx(result, data)
    assert check_parity(KERAS, model, onnx_bytes, data.x_val, "classification").ok


def test_a_checkpoint_of_another_architecture_is_refused() -> None:
    data = make_data("regression", n=100)
    first = LocalContext()
    KERAS.fit("mlp", {"epochs": 1, "hidden": [4]}, data, first)
    other = LocalContext()
    other.checkpoints = list(first.checkpoints)
    with pytest.raises(FailedPreconditionError, match="checkpoint of epoch 0 does not fit"):
        KERAS.fit("mlp", {"epochs": 2, "hidden": [8]}, data, other)
