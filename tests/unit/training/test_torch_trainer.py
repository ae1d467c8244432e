"""The PyTorch MLP trainer: metrics on easy data, ONNX parity, native round trip, early
stopping keeps the best weights, resume gives the same weights as an uninterrupted run,
cancellation, determinism and parameter validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from carrara.errors import CancelledError, InvalidArgumentError  # noqa: E402
from carrara.gateway.backends import OnnxBackend  # noqa: E402
from carrara.training.frameworks import get_trainer  # noqa: E402
from carrara.training.frameworks.base import (  # noqa: E402
    EarlyStopper,
    LocalContext,
    Pruned,
    TrainData,
)
from carrara.training.frameworks.parity import (  # noqa: E402
    DEFAULT_OPSET,
    check_parity,
    onnx_scores,
)
from carrara.training.frameworks.torch_trainer import MLP, TRAINER  # noqa: E402
from carrara.training.spec import ESTIMATORS  # noqa: E402

rng = np.random.default_rng(0)
N, D = 400, 4
# Raw features far from zero mean / unit scale: the model's own standardization must cope.
X = (rng.normal(size=(N, D)) * [1.0, 5.0, 0.1, 20.0] + [3.0, -50.0, 1.0, 100.0]).astype(np.float32)
Z = (X - X.mean(axis=0)) / X.std(axis=0)
Y_BIN = (Z[:, 0] - Z[:, 1] + 0.3 * rng.normal(size=N) > 0).astype(np.int64)
Y_MULTI = np.digitize(Z[:, 0] + Z[:, 2], [-0.6, 0.6]).astype(np.int64)
Y_REG = (Z @ np.array([1.0, -2.0, 0.5, 3.0]) * 1000.0 + 5e4 + 100.0 * rng.normal(size=N)).astype(
    np.float64
)
FAST = {"epochs": 8, "batch_size": 32, "lr": 0.01, "hidden": [16]}


def make_data(y: np.ndarray, task: Any, classes: list[Any] | None = None) -> TrainData:
    return TrainData(
        x_train=X[:300], y_train=y[:300], x_val=X[300:], y_val=y[300:],
        feature_names=[f"f{i}" for i in range(D)], task=task, classes=classes or [],
    )  # fmt: skip


BIN = make_data(Y_BIN, "classification", ["no", "yes"])
MULTI = make_data(Y_MULTI, "classification", ["a", "b", "c"])
REG = make_data(Y_REG, "regression")


def test_registered_and_versioned() -> None:
    assert get_trainer("pytorch") is TRAINER
    assert dict(TRAINER.estimators) == ESTIMATORS["pytorch"]
    assert TRAINER.framework_version() == torch.__version__


@pytest.mark.parametrize(
    ("data", "width"), [(BIN, 1), (MULTI, 3), (REG, 1)], ids=["binary", "multiclass", "regression"]
)
def test_metrics_and_onnx_parity(data: TrainData, width: int) -> None:
    ctx = LocalContext(seed=3)
    result = TRAINER.fit("mlp", FAST, data, ctx)
    assert result.native_format == "torch-state-dict"
    assert (result.n_train, result.n_validation, result.epochs_run) == (300, 100, 8)
    assert [e for e, _ in ctx.reports] == list(range(8))
    assert all({"loss", "val_loss"} <= set(m) for _, m in ctx.reports)
    # The learning curve: one entry per epoch (1-based), the loop's metrics renamed val_*;
    # the last epoch's model is the returned one, so its metrics are the reported ones.
    h = result.history
    assert [e["epoch"] for e in h] == [float(e) for e in range(1, 9)]
    assert [e["loss"] for e in h] == [m["loss"] for _, m in ctx.reports]
    assert [e["val_loss"] for e in h] == [m["val_loss"] for _, m in ctx.reports]
    for name, value in result.metrics.items():
        key = name if name.startswith("val_") else f"val_{name}"
        assert h[-1][key] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    if data.task == "classification":
        assert result.metrics["auc"] > 0.9 and result.metrics["accuracy"] > 0.8
        # training improved the fit: the loss went down from the first epoch
        assert ctx.reports[-1][1]["loss"] < ctx.reports[0][1]["loss"]
    else:
        # RMSE well below the label's spread (labels in the tens of thousands, not standardized)
        assert result.metrics["rmse"] < 0.3 * float(np.std(data.y_val))
        assert result.metrics["r2"] > 0.9
    scores = TRAINER.predict_scores(result.model, data.x_val, data.task)
    assert scores.shape == (100, width) and scores.dtype == np.float64
    if width == 3:
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)

    onnx_model = TRAINER.export_onnx(result, data)
    parity = check_parity(TRAINER, result.model, onnx_model, X, data.task)
    assert parity.ok and parity.rows == N
    assert parity.max_abs_diff <= TRAINER.parity_atol + TRAINER.parity_rtol * float(
        np.max(np.abs(scores))
    )
    got = onnx_scores(onnx_model, X[:7])  # a batch size the export never saw
    assert got.shape == (7, width)
    opsets = {o.domain: o.version for o in onnx.load_from_string(onnx_model).opset_import}
    assert opsets[""] == DEFAULT_OPSET
    info = OnnxBackend(onnx_model).info  # the gateway serves it as is
    assert (info.input_name, info.input_dim, info.output_dim) == ("features", D, width)
    assert info.output_names[0] == "score"


def test_native_round_trip() -> None:
    result = TRAINER.fit("mlp", FAST, MULTI, LocalContext(seed=1))
    loaded = TRAINER.load_native(result.native, MULTI)
    assert isinstance(loaded, MLP)
    np.testing.assert_array_equal(
        TRAINER.predict_scores(loaded, X, "classification"),
        TRAINER.predict_scores(result.model, X, "classification"),
    )
    with pytest.raises(InvalidArgumentError, match="takes 4 features"):
        TRAINER.load_native(result.native, three_features(MULTI))
    with pytest.raises(InvalidArgumentError, match="not a Carrara PyTorch blob"):
        TRAINER.load_native(b"not torch", MULTI)


def three_features(d: TrainData) -> TrainData:
    return TrainData(
        x_train=d.x_train[:, :3], y_train=d.y_train, x_val=d.x_val[:, :3], y_val=d.y_val,
        feature_names=d.feature_names[:3], task=d.task, classes=d.classes,
    )  # fmt: skip


def state(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: Any, b: Any) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_deterministic_given_seed() -> None:
    a = TRAINER.fit("mlp", FAST, BIN, LocalContext(seed=7))
    b = TRAINER.fit("mlp", FAST, BIN, LocalContext(seed=7))
    c = TRAINER.fit("mlp", FAST, BIN, LocalContext(seed=8))
    assert_same_weights(a.model, b.model)
    assert not torch.equal(state(a.model)["net.0.weight"], state(c.model)["net.0.weight"])


def test_early_stopping_restores_best_weights() -> None:
    # Validate on the flipped labels: the better the model learns, the worse val_loss gets,
    # so epoch 0 is the best and early stopping (patience 2) stops after epoch 2.
    flipped = TrainData(
        x_train=BIN.x_train, y_train=BIN.y_train, x_val=BIN.x_val, y_val=1 - BIN.y_val,
        feature_names=BIN.feature_names, task="classification", classes=[0, 1],
    )  # fmt: skip
    ctx = LocalContext(seed=0, early_stopping=EarlyStopper("val_loss", patience=2))
    result = TRAINER.fit("mlp", {**FAST, "epochs": 50}, flipped, ctx)
    losses = [m["val_loss"] for _, m in ctx.reports]
    assert len(losses) == 3 and losses[0] < losses[1] < losses[2]
    assert (result.epochs_run, result.best_epoch) == (3, 0)
    assert result.extra["stopped_early"] is True
    # the returned model is epoch 0's, not epoch 2's
    assert result.metrics["val_loss"] == pytest.approx(losses[0], rel=1e-6)
    assert len(ctx.checkpoints) == 3
    assert [e["epoch"] for e in result.history] == [1.0, 2.0, 3.0]  # all epochs run
    assert [e["val_loss"] for e in result.history] == losses


class CrashAfter(LocalContext):
    """Dies (like a killed worker) right after checkpointing ``epoch``."""

    def __init__(self, epoch: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.crash_epoch = epoch

    def save_checkpoint(self, epoch: int, state: bytes) -> None:
        super().save_checkpoint(epoch, state)
        if epoch == self.crash_epoch:
            raise KeyboardInterrupt("worker died")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_gives_the_same_weights(optimizer: str) -> None:
    params = {
        **FAST,
        "epochs": 6,
        "optimizer": optimizer,
        "momentum": 0.5 if optimizer == "sgd" else 0.0,
    }
    full_ctx = LocalContext(seed=5)
    full = TRAINER.fit("mlp", params, BIN, full_ctx)

    crashed = CrashAfter(2, seed=5)
    with pytest.raises(KeyboardInterrupt):
        TRAINER.fit("mlp", params, BIN, crashed)
    again = LocalContext(seed=5)
    again.checkpoints = list(crashed.checkpoints)  # a new worker finds epoch 2's checkpoint
    resumed = TRAINER.fit("mlp", params, BIN, again)

    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 6
    assert [e for e, _ in again.reports] == [3, 4, 5]
    assert_same_weights(resumed.model, full.model)
    assert again.reports == full_ctx.reports[3:]
    assert resumed.metrics == full.metrics
    # the curve of the resumed run holds every epoch, the ones before the crash included
    assert len(resumed.history) == 6 and resumed.history == full.history


def test_cancel_raises_cancelled_after_the_epoch() -> None:
    class CancelAt(LocalContext):
        def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
            self.cancelled = epoch == 1
            return super().report(epoch, metrics)

    ctx = CancelAt(seed=0)
    with pytest.raises(CancelledError, match="after epoch 1"):
        TRAINER.fit("mlp", FAST, BIN, ctx)
    assert [c.epoch for c in ctx.checkpoints] == [0, 1]

    done = LocalContext(seed=0)
    done.cancelled = True
    with pytest.raises(CancelledError):
        TRAINER.fit("mlp", FAST, BIN, done)


def test_pruned_trial_propagates() -> None:
    class PruneAt(LocalContext):
        def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
            if epoch == 2:
                raise Pruned("trial 3 pruned at epoch 2")
            return super().report(epoch, metrics)

    with pytest.raises(Pruned):
        TRAINER.fit("mlp", FAST, BIN, PruneAt(seed=0))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epochs": 0}, "'epochs' must be >= 1"),
        ({"epochs": 2.5}, "'epochs' must be an integer"),
        ({"batch_size": True}, "'batch_size' must be an integer"),
        ({"lr": -0.1}, "'lr' must be > 0"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"hidden": [8, 0]}, "'hidden' must be >= 1"),
        ({"hidden": "8,4"}, "'hidden' must be a list"),
        ({"weight_decay": -1}, "'weight_decay' must be >= 0"),
        ({"momentum": 1.0}, "'momentum' must be >= 0.0 and < 1.0"),
        ({"optimizer": "rmsprop"}, "'optimizer' must be 'adam' or 'sgd'"),
        ({"dropout": 0.1}, r"unknown pytorch mlp params \['dropout'\]; known: .*epochs"),
    ],
)
def test_bad_params(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        TRAINER.fit("mlp", params, BIN, LocalContext())


def test_bad_estimator_and_data() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown pytorch estimator 'cnn'; known: mlp"):
        TRAINER.fit("cnn", {}, BIN, LocalContext())
    one_class = make_data(np.zeros(N, np.int64), "classification", [0])
    with pytest.raises(InvalidArgumentError, match="at least 2 classes"):
        TRAINER.fit("mlp", FAST, one_class, LocalContext())
    nan = make_data(Y_BIN, "classification", [0, 1])
    nan.x_train = nan.x_train.copy()
    nan.x_train[0, 0] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        TRAINER.fit("mlp", FAST, nan, LocalContext())


def test_hidden_int_and_linear_model() -> None:
    linear = TRAINER.fit("mlp", {**FAST, "hidden": []}, REG, LocalContext())
    assert [k for k in linear.model.state_dict() if k.startswith("net.")] == [
        "net.0.weight",
        "net.0.bias",
    ]
    one = TRAINER.fit("mlp", {**FAST, "hidden": 4, "epochs": 1}, BIN, LocalContext())
    assert one.model.state_dict()["net.0.weight"].shape == (4, D)
