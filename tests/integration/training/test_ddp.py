"""Data-parallel PyTorch training through real torchrun ranks (gloo, CPU).

The reference is the single-process :meth:`TorchTrainer.fit` with the same seed, params and
global batch: each global batch is split ``r::world`` across ranks and the per-rank losses are
scaled so DDP's gradient average is the single-process batch mean, so the two runs are the same
computation up to float reduction order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from carrara.errors import CancelledError, FailedPreconditionError  # noqa: E402
from carrara.training.frameworks.base import (  # noqa: E402
    EarlyStopper,
    LocalContext,
    Pruned,
    TrainData,
)
from carrara.training.frameworks.torch_ddp import FAULT_ENV, TEARDOWN_FAULT_ENV  # noqa: E402
from carrara.training.frameworks.torch_trainer import TRAINER, fit_distributed  # noqa: E402

# Weights after a few epochs agree to float32 rounding of differently ordered sums.
ATOL = 1e-5

rng = np.random.default_rng(11)
N_TRAIN, N_VAL, D = 289, 80, 5  # 289 = 9 * 32 + 1: the last global batch is one row, so
X = rng.normal(size=(N_TRAIN + N_VAL, D)).astype(np.float32) * 4 + 2  # rank 1 gets none of it
Y_MULTI = np.digitize(X[:, 0] - X[:, 3], [-2.0, 2.0]).astype(np.int64)
Y_BIN = (X[:, 1] + X[:, 2] > 4).astype(np.int64)
PARAMS = {"epochs": 4, "batch_size": 32, "lr": 0.02, "hidden": [12, 6]}


def data(y: np.ndarray, *, flip_val: bool = False) -> TrainData:
    y_val = 1 - y[N_TRAIN:] if flip_val else y[N_TRAIN:]
    return TrainData(
        x_train=X[:N_TRAIN], y_train=y[:N_TRAIN], x_val=X[N_TRAIN:], y_val=y_val,
        feature_names=[f"f{i}" for i in range(D)], task="classification",
        classes=sorted(set(y.tolist())),
    )  # fmt: skip


def assert_same_model(a: Any, b: Any, x: np.ndarray) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=ATOL, rtol=0.0, msg=k)
    np.testing.assert_allclose(
        TRAINER.predict_scores(a, x, "classification"),
        TRAINER.predict_scores(b, x, "classification"),
        atol=ATOL,
    )


def assert_same_reports(a: list[tuple[int, dict[str, float]]], b: list[Any]) -> None:
    assert [e for e, _ in a] == [e for e, _ in b]
    for (_, ma), (_, mb) in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], abs=ATOL), k


def test_two_ranks_match_one_process() -> None:
    d = data(Y_MULTI)
    local_ctx = LocalContext(seed=4)
    local = TRAINER.fit("mlp", PARAMS, d, local_ctx)
    ddp_ctx = LocalContext(seed=4)
    ddp = fit_distributed("mlp", PARAMS, d, ddp_ctx, nproc_per_node=2, timeout_s=90)

    assert ddp.extra["world_size"] == 2 and ddp.extra["backend"] == "gloo"
    assert (ddp.epochs_run, ddp.n_train, ddp.classes) == (4, N_TRAIN, [0, 1, 2])
    assert_same_model(ddp.model, local.model, X)
    # per-epoch metrics relayed to the context, and checkpoints offered after every epoch
    assert_same_reports(ddp_ctx.reports, local_ctx.reports)
    assert [c.epoch for c in ddp_ctx.checkpoints] == [0, 1, 2, 3]
    assert ddp.metrics.keys() == local.metrics.keys()
    for k, v in local.metrics.items():
        assert ddp.metrics[k] == pytest.approx(v, abs=ATOL)
    assert ddp.metrics["accuracy"] > 0.8
    # the learning curve comes back from rank 0 as in one process
    assert [h["epoch"] for h in ddp.history] == [1.0, 2.0, 3.0, 4.0]
    for hd, hl in zip(ddp.history, local.history, strict=True):
        assert hd.keys() == hl.keys() >= {"loss", "val_loss", "val_auc", "val_accuracy"}
        for k in hd:
            assert hd[k] == pytest.approx(hl[k], abs=ATOL), k


def test_ddp_resumes_a_single_process_checkpoint_and_early_stops() -> None:
    # Checkpoints are one format: a distributed run continues a local run's epoch-1 state.
    d = data(Y_BIN)
    full_ctx = LocalContext(seed=2)
    full = TRAINER.fit("mlp", PARAMS, d, full_ctx)
    ctx = LocalContext(seed=2)
    ctx.checkpoints = [full_ctx.checkpoints[1]]
    resumed = fit_distributed("mlp", PARAMS, d, ctx, nproc_per_node=2, timeout_s=90)
    assert (resumed.resumed_from_epoch, resumed.epochs_run) == (1, 4)
    assert [e for e, _ in ctx.reports] == [2, 3]
    assert_same_model(resumed.model, full.model, X)
    # the resumed curve holds the local run's epochs 1-2 (from the checkpoint) and its own 3-4
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    assert resumed.history[:2] == full.history[:2]

    # Early stopping decided by the caller's context stops every rank at the same epoch and
    # keeps the best (first) epoch's weights: validating on flipped labels, val_loss rises.
    flipped = data(Y_BIN, flip_val=True)
    stop_ctx = LocalContext(seed=2, early_stopping=EarlyStopper("val_loss", patience=2))
    stopped = fit_distributed(
        "mlp", {**PARAMS, "epochs": 30}, flipped, stop_ctx, nproc_per_node=2, timeout_s=90
    )
    losses = [m["val_loss"] for _, m in stop_ctx.reports]
    assert len(losses) == 3 and losses[0] < losses[2]
    assert (stopped.epochs_run, stopped.best_epoch, stopped.extra["stopped_early"]) == (3, 0, True)
    assert stopped.metrics["val_loss"] == pytest.approx(losses[0], abs=ATOL)


def test_rank_failure_is_reported_with_its_traceback() -> None:
    with pytest.raises(FailedPreconditionError) as info:
        fit_distributed(
            "mlp", PARAMS, data(Y_BIN), LocalContext(), nproc_per_node=2, timeout_s=90,
            env={FAULT_ENV: "1"},
        )  # fmt: skip
    message = str(info.value)
    assert "distributed training failed" in message and "2 ranks" in message
    assert "error-rank1" in message and "injected failure on rank 1" in message


def test_a_crash_in_teardown_after_every_rank_finished_keeps_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gloo can abort a rank at exit after the work is done ("terminate called without an
    active exception"): the fit stands when every rank passed the final barrier."""
    with caplog.at_level("WARNING", logger="carrara.training.frameworks.torch_trainer"):
        result = fit_distributed(
            "mlp", PARAMS, data(Y_BIN), LocalContext(), nproc_per_node=2, timeout_s=90,
            env={TEARDOWN_FAULT_ENV: "1"},
        )  # fmt: skip
    assert result.extra["world_size"] == 2 and result.epochs_run == PARAMS["epochs"]
    assert any(
        "exited with code" in r.message and "all 2 local ranks finished" in r.message
        for r in caplog.records
    ), [r.message for r in caplog.records]


@pytest.mark.parametrize("outcome", ["cancel", "prune"])
def test_cancel_and_prune_stop_all_ranks(outcome: str) -> None:
    class StopAt(LocalContext):
        def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
            if outcome == "prune" and epoch == 1:
                raise Pruned("trial pruned at epoch 1")
            self.cancelled = epoch == 1
            return super().report(epoch, metrics)

    ctx = StopAt(seed=0)
    error = CancelledError if outcome == "cancel" else Pruned
    with pytest.raises(error):
        fit_distributed(
            "mlp", {**PARAMS, "epochs": 50}, data(Y_BIN), ctx, nproc_per_node=2, timeout_s=90
        )
    # a pruning report raises before LocalContext records it; a cancel is seen after epoch 1
    assert [e for e, _ in ctx.reports] == ([0] if outcome == "prune" else [0, 1])
    assert [c.epoch for c in ctx.checkpoints] == ([0] if outcome == "prune" else [0, 1])
