"""The PyTorch trainer: a standardized MLP, trained in one process or data-parallel via torchrun.

Estimator ``mlp``: ``Linear`` layers of ``hidden`` widths with ReLU between them. The model keeps
the training split's feature mean/std as buffers and standardizes its input itself, so the
served model takes raw features; regression targets are standardized for training and
un-scaled inside the model the same way. Heads: binary → 1 logit (BCE-with-logits, served
score = sigmoid), k classes → k logits (cross-entropy, score = softmax), regression → 1 output
(MSE on the standardized target, score in label units).

Params (``model.params``): ``epochs`` (20), ``batch_size`` (64), ``lr`` (1e-3), ``hidden``
([64, 32]), ``weight_decay`` (0.0), ``optimizer`` ("adam" | "sgd"), ``momentum`` (0.0, SGD
only), ``threads`` (1: torch intra-op threads while training), ``standardize_target`` (True).

Determinism: weights are initialized after ``torch.manual_seed(ctx.seed)``; epoch ``e``'s row
order is a permutation drawn from a generator seeded with ``(ctx.seed, e)``, so a resumed run
sees exactly the batches an uninterrupted one would, and its checkpoints (model, optimizer, RNG
and best-so-far state) give bit-identical final weights.

Distributed data parallel (:func:`fit_distributed`)::

    fit_distributed(estimator, params, data, ctx, *, nproc_per_node, nnodes=1,
                    backend=None, gpus=0, timeout_s=3600.0, env=None) -> FitResult

launches (through :mod:`.launch`, so it ends with the worker) ``python -m torch.distributed.run
--nproc_per_node=N --nnodes=1 --rdzv-backend=c10d
--rdzv-endpoint=127.0.0.1:<free port> -m carrara.training.frameworks.torch_ddp <workdir>``
(the worker calls it instead of ``TRAINER.fit`` when ``resources.processes_per_node > 1``, with
``nproc_per_node=processes_per_node, gpus=resources.gpus``; only ``nnodes=1`` so far). Each
global batch of the epoch permutation is split across ranks (rank ``r`` takes rows
``r::world``), and each rank's loss is scaled so DDP's gradient average equals the
single-process mean over the whole global batch: a distributed run is the same computation as
:meth:`TorchTrainer.fit` up to float reduction order. Rank 0 relays per-epoch metrics and
checkpoints through the workdir; the caller's process passes them to ``ctx.report`` /
``ctx.save_checkpoint`` and answers each epoch with a ``decision-<epoch>`` file (continue /
stop / cancel / prune) that rank 0 waits for and all-reduces to every rank, so early stopping
and cancellation stop all ranks after the same epoch, exactly as in one process. A failed rank
raises :class:`FailedPreconditionError` with that rank's traceback.

Preemption: the loop polls ``ctx.preempting()`` after every step (no I/O). Under torchrun the
launcher writes a ``preempt`` file into the workdir once ``ctx.preempting()``; every rank
checks it after each step and the ranks agree with one MAX all-reduce of a one-element
tensor, so all stop after the same step; rank 0 relays a mid-epoch checkpoint (epoch in
progress, steps done, model, optimizer, RNG, best, history, the partial loss sum) that the
launcher passes to ``ctx.checkpoint_now``, and the fit raises :class:`Preempted`. Resuming
from it skips the steps already done, so the final model equals an uninterrupted run's
(bit-identical in one process).
"""

# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from carrara.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from carrara.ports import free_port

from .base import (
    FitResult,
    Preempted,
    Pruned,
    RankFailedError,
    Task,
    TrainContext,
    TrainData,
    bound_history,
    evaluate_scores,
    history_entry,
)
from .parity import DEFAULT_OPSET

__all__ = [
    "NATIVE_FORMAT",
    "TRAINER",
    "MLPConfig",
    "MLPParams",
    "NodeGroup",
    "TorchTrainer",
    "fit_distributed",
    "parse_params",
    "run_node",
]

log = logging.getLogger(__name__)

NATIVE_FORMAT = "torch-state-dict"
Decision = Literal["continue", "stop", "cancel", "prune"]


class MLPParams(msgspec.Struct, frozen=True, kw_only=True):
    """The ``mlp`` estimator's hyperparameters after validation (:func:`parse_params`)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    hidden: list[int] = msgspec.field(default_factory=lambda: [64, 32])
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.0
    threads: int = 1
    standardize_target: bool = True


class MLPConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to rebuild the network; stored next to the state dict."""

    n_features: int
    hidden: list[int]
    n_outputs: int
    task: Task
    n_classes: int = 0


def _as_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"pytorch mlp param {name!r} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidArgumentError(f"pytorch mlp param {name!r} must be an integer, got {value!r}")
    if int(value) < low:
        raise InvalidArgumentError(f"pytorch mlp param {name!r} must be >= {low}, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any, low: float, *, strict: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"pytorch mlp param {name!r} must be a number, got {value!r}")
    v = float(value)
    if (v <= low if strict else v < low) or v >= high:
        bound = f"> {low}" if strict else f">= {low}"
        extra = f" and < {high}" if math.isfinite(high) else ""
        raise InvalidArgumentError(f"pytorch mlp param {name!r} must be {bound}{extra}, got {v}")
    return v


def parse_params(params: Mapping[str, Any]) -> MLPParams:
    """Validate ``model.params`` for the ``mlp`` estimator; unknown or bad values raise
    :class:`InvalidArgumentError` naming the fix."""
    known = set(MLPParams.__struct_fields__)
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidArgumentError(
            f"unknown pytorch mlp params {unknown}; known: {', '.join(sorted(known))}"
        )
    out: dict[str, Any] = {}
    for name in ("epochs", "batch_size", "threads"):
        if name in params:
            out[name] = _as_int(name, params[name], 1)
    if "lr" in params:
        out["lr"] = _as_float("lr", params["lr"], 0.0, strict=True)
    if "weight_decay" in params:
        out["weight_decay"] = _as_float("weight_decay", params["weight_decay"], 0.0, strict=False)
    if "momentum" in params:
        out["momentum"] = _as_float("momentum", params["momentum"], 0.0, strict=False, high=1.0)
    if "hidden" in params:
        hidden = params["hidden"]
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = [hidden]
        if not isinstance(hidden, list | tuple):
            raise InvalidArgumentError(
                f"pytorch mlp param 'hidden' must be a list of layer widths, got {hidden!r}"
            )
        out["hidden"] = [_as_int("hidden", h, 1) for h in hidden]
    if "optimizer" in params:
        if params["optimizer"] not in ("adam", "sgd"):
            got = params["optimizer"]
            raise InvalidArgumentError(
                f"pytorch mlp param 'optimizer' must be 'adam' or 'sgd', got {got!r}"
            )
        out["optimizer"] = params["optimizer"]
    if "standardize_target" in params:
        if not isinstance(params["standardize_target"], bool):
            raise InvalidArgumentError(
                "pytorch mlp param 'standardize_target' must be true or false, "
                f"got {params['standardize_target']!r}"
            )
        out["standardize_target"] = params["standardize_target"]
    return MLPParams(**out)


class MLP(nn.Module):
    """Input standardization (buffers) → Linear/ReLU stack → raw head (logits or the
    standardized regression output). :meth:`score` maps the head to the served ``score``."""

    x_mean: torch.Tensor
    x_inv_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_features
        self.register_buffer("x_mean", torch.zeros(d))
        self.register_buffer("x_inv_std", torch.ones(d))
        self.register_buffer("y_mean", torch.zeros(1))
        self.register_buffer("y_std", torch.ones(1))
        layers: list[nn.Module] = []
        width = d
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, config.n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.x_mean) * self.x_inv_std)
        return out

    def score(self, x: torch.Tensor) -> torch.Tensor:
        z = self.forward(x)
        if self.config.task == "regression":
            return z * self.y_std + self.y_mean
        if self.config.n_outputs == 1:
            return torch.sigmoid(z)
        return torch.softmax(z, dim=1)


class _Served(nn.Module):
    """The export wrapper: ``forward`` is the served score."""

    def __init__(self, model: MLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.score(features)


def _n_classes(data: TrainData) -> int:
    if data.task == "regression":
        return 0
    k = data.n_classes
    if k == 0 and len(data.y_train):
        k = int(np.max(data.y_train)) + 1
    if k < 2:
        raise InvalidArgumentError(
            f"classification needs at least 2 classes, the training labels have {k}; "
            "check the label column or use task 'regression'"
        )
    return k


def build_model(config: MLPConfig, data: TrainData | None, seed: int) -> MLP:
    """A freshly initialized network (seeded); with ``data``, its standardization buffers
    come from the training split."""
    torch.manual_seed(seed)
    model = MLP(config)
    if data is not None:
        x = np.asarray(data.x_train, np.float64)
        mean = x.mean(axis=0) if len(x) else np.zeros(config.n_features)
        std = x.std(axis=0) if len(x) else np.ones(config.n_features)
        inv = np.where(std > 1e-12, 1.0 / np.where(std > 1e-12, std, 1.0), 1.0)
        with torch.no_grad():
            model.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            model.x_inv_std.copy_(torch.as_tensor(inv, dtype=torch.float32))
    return model


def _config_for(p: MLPParams, data: TrainData) -> MLPConfig:
    k = _n_classes(data)
    outputs = 1 if data.task == "regression" or k == 2 else k
    return MLPConfig(
        n_features=data.n_features, hidden=list(p.hidden), n_outputs=outputs, task=data.task,
        n_classes=k,
    )  # fmt: skip


def prepare(p: MLPParams, data: TrainData, seed: int, device: torch.device) -> tuple[MLP, Arrays]:
    """The seeded, standardized network on ``device`` and the training tensors."""
    model = build_model(_config_for(p, data), data, seed)
    _set_target_scale(model, p, data)
    model.to(device)
    return model, _arrays(model, data, device)


def _set_target_scale(model: MLP, p: MLPParams, data: TrainData) -> None:
    if data.task != "regression" or not p.standardize_target or len(data.y_train) == 0:
        return
    y = np.asarray(data.y_train, np.float64)
    std = float(y.std())
    with torch.no_grad():
        model.y_mean.fill_(float(y.mean()))
        model.y_std.fill_(std if std > 1e-12 else 1.0)


def _make_optimizer(p: MLPParams, model: nn.Module) -> torch.optim.Optimizer:
    if p.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Epoch ``epoch``'s row order: the same on every rank and after a resume."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


def _row_losses(model_out: torch.Tensor, y: torch.Tensor, config: MLPConfig) -> torch.Tensor:
    """Summed (not averaged) loss of a batch in training units."""
    if config.task == "regression":
        return nn.functional.mse_loss(model_out[:, 0], y, reduction="sum")
    if config.n_outputs == 1:
        return nn.functional.binary_cross_entropy_with_logits(model_out[:, 0], y, reduction="sum")
    return nn.functional.cross_entropy(model_out, y, reduction="sum")


class Arrays(msgspec.Struct, kw_only=True):
    """Training tensors in training units (targets standardized for regression)."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    y_val_raw: NDArray[Any]


def _arrays(model: MLP, data: TrainData, device: torch.device) -> Arrays:
    cfg = model.config

    def target(y: NDArray[Any]) -> torch.Tensor:
        if cfg.task == "regression":
            t = (np.asarray(y, np.float64) - float(model.y_mean)) / float(model.y_std)
            return torch.as_tensor(t, dtype=torch.float32, device=device)
        if cfg.n_outputs == 1:
            return torch.as_tensor(np.asarray(y) == 1, dtype=torch.float32, device=device)
        return torch.as_tensor(np.asarray(y, np.int64), device=device)

    def feats(x: NDArray[Any]) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x, np.float32), device=device)

    return Arrays(
        x_train=feats(data.x_train), y_train=target(data.y_train),
        x_val=feats(data.x_val), y_val=target(data.y_val), y_val_raw=np.asarray(data.y_val),
    )  # fmt: skip


def _validate(model: MLP, arrays: Arrays) -> dict[str, float]:
    """val_loss (training units, per row) plus the served-score metrics on the validation
    split."""
    if len(arrays.x_val) == 0:
        return {}
    with torch.no_grad():
        z = model(arrays.x_val)
        val_loss = float(_row_losses(z, arrays.y_val, model.config)) / len(arrays.x_val)
        scores = model.score(arrays.x_val).double().cpu().numpy()
    metrics = evaluate_scores(scores, arrays.y_val_raw, model.config.task, model.config.n_classes)
    metrics["val_loss"] = val_loss
    return metrics


class Distributed(msgspec.Struct, kw_only=True):
    """This process's place in a data-parallel group (None for a single process)."""

    rank: int
    world: int


#: Called by the loop's leader after each epoch: (epoch, metrics, checkpoint blob) → decision.
EpochHook = Callable[[int, dict[str, float], Callable[[], bytes]], Decision]
#: Called by the leader when the loop is preempted, before it raises :class:`Preempted`:
#: (completed epoch, steps done in the next one, mid-epoch checkpoint blob).
PreemptHook = Callable[[int, int, Callable[[], bytes]], None]


class LoopResult(msgspec.Struct, kw_only=True):
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    history: list[dict[str, float]]


def _checkpoint_blob(
    epoch: int,
    model: MLP,
    opt: torch.optim.Optimizer,
    best: dict[str, Any],
    history: list[dict[str, float]],
    *,
    step: int = 0,
    loss_sum: torch.Tensor | None = None,
) -> bytes:
    """The checkpoint after ``epoch`` (plus ``step`` steps of the next one, whose partial
    training-loss sum is ``loss_sum``: a preempted run's mid-epoch checkpoint)."""
    buf = io.BytesIO()
    torch.save(
        {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "best": best,
            "history": history,
            **({"step": step, "loss_sum": loss_sum} if step else {}),
        },
        buf,
    )
    return buf.getvalue()


def _agree(local: bool, dist: Distributed | None, device: torch.device) -> bool:
    """True on every rank when any rank's ``local`` flag is set (one tiny MAX all-reduce)."""
    if dist is None:
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def load_blob(blob: bytes) -> dict[str, Any]:
    """A checkpoint/native blob back (tensors and plain data only: ``weights_only``)."""
    try:
        out: dict[str, Any] = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArgumentError(f"not a Carrara PyTorch blob: {exc}") from exc
    return out


def train_loop(
    model: MLP,
    params: MLPParams,
    arrays: Arrays,
    *,
    seed: int,
    start_epoch: int,
    resume_state: Mapping[str, Any] | None,
    on_epoch: EpochHook | None,
    dist: Distributed | None = None,
    ddp_model: nn.Module | None = None,
    preempting: Callable[[], bool] | None = None,
    on_preempt: PreemptHook | None = None,
) -> LoopResult:
    """The epoch loop shared by :meth:`TorchTrainer.fit` and the torchrun ranks.

    With ``dist``, ``ddp_model`` is the DistributedDataParallel wrapper of ``model``; each
    global batch is split ``r::world`` across ranks and the leader's decision is broadcast.

    ``preempting`` is polled after every step (with ``dist``: on every rank, or on none; the
    ranks agree by a MAX all-reduce, so any rank's flag stops all after the same step). On
    preemption the leader passes the mid-epoch checkpoint to ``on_preempt`` and every rank
    raises :class:`Preempted`. A ``resume_state`` taken mid-epoch skips the steps it holds,
    so the resumed run trains exactly the steps an uninterrupted one would.
    """
    train_net: nn.Module = ddp_model if ddp_model is not None else model
    opt = _make_optimizer(params, train_net)
    best: dict[str, Any] = {"val_loss": None, "epoch": -1, "state": None}
    history: list[dict[str, float]] = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["rng"])
        best = dict(resume_state["best"])
        history = list(resume_state["history"])
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    device = arrays.x_train.device
    # A mid-epoch checkpoint: steps of start_epoch already done, and their loss sum (kept by
    # the leader only, as the epoch's all-reduce adds the other ranks' shares).
    skip = int(resume_state.get("step", 0)) if resume_state is not None else 0
    partial = resume_state.get("loss_sum") if resume_state is not None and rank == 0 else None
    n = len(arrays.x_train)
    bs = params.batch_size
    cfg = model.config
    stopped_early = False
    epoch = start_epoch - 1
    model.train()
    for epoch in range(start_epoch, params.epochs):
        perm = epoch_permutation(seed, epoch, n).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        first = 0
        if epoch == start_epoch and skip:
            first = skip * bs
            if partial is not None:
                loss_sum += partial.to(device=device, dtype=torch.float64)
        for start in range(first, n, bs):
            step_rows = perm[start : start + bs]
            local = step_rows[rank::world]
            opt.zero_grad(set_to_none=True)
            out = train_net(arrays.x_train[local])
            summed = _row_losses(out, arrays.y_train[local], cfg)
            # DDP averages gradients over ranks; scaling by world / global rows makes that
            # average the mean over the whole global batch, as in one process.
            torch.autograd.backward(summed * (world / len(step_rows)))
            opt.step()
            loss_sum += summed.detach().double()
            if preempting is not None and _agree(preempting(), dist, device):
                steps = start // bs + 1
                done = loss_sum.clone()
                if dist is not None:
                    torch.distributed.all_reduce(done)
                if rank == 0 and on_preempt is not None:
                    snap = best

                    def mid(
                        e: int = epoch,
                        s: dict[str, Any] = snap,
                        k: int = steps,
                        total: torch.Tensor = done,
                    ) -> bytes:
                        return _checkpoint_blob(
                            e - 1, model, opt, s, history, step=k, loss_sum=total.cpu()
                        )

                    on_preempt(epoch - 1, steps, mid)
                raise Preempted(
                    f"training preempted in epoch {epoch + 1} after step {steps}",
                    epoch=epoch - 1,
                    step=steps,
                )
        if dist is not None:
            torch.distributed.all_reduce(loss_sum)
        decision: Decision = "continue"
        if rank == 0:
            metrics = _validate(model, arrays)
            metrics["loss"] = float(loss_sum) / max(n, 1)
            history.append(metrics)
            val = metrics.get("val_loss", metrics["loss"])
            if best["val_loss"] is None or val < best["val_loss"]:
                best = {
                    "val_loss": val, "epoch": epoch,
                    "state": copy.deepcopy(model.state_dict()),
                }  # fmt: skip
            if on_epoch is not None:
                snapshot = best

                def blob(e: int = epoch, s: dict[str, Any] = snapshot) -> bytes:
                    return _checkpoint_blob(e, model, opt, s, history)

                decision = on_epoch(epoch, metrics, blob)
        if dist is not None:
            codes: dict[Decision, int] = {"continue": 0, "stop": 1, "cancel": 2, "prune": 3}
            flag = torch.tensor([codes[decision]], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            decision = next(d for d, c in codes.items() if c == int(flag.item()))
        if decision == "cancel":
            raise CancelledError(f"training cancelled after epoch {epoch}")
        if decision == "prune":
            raise Pruned(f"trial pruned after epoch {epoch}")
        if decision == "stop":
            stopped_early = True
            break
    if stopped_early and best["state"] is not None:
        model.load_state_dict(best["state"])  # early stopping keeps the best epoch's weights
    model.eval()
    return LoopResult(
        epochs_run=epoch + 1, best_epoch=int(best["epoch"]), stopped_early=stopped_early,
        history=history,
    )  # fmt: skip


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_data(data: TrainData) -> None:
    if len(data.x_train) == 0:
        raise InvalidArgumentError("the training split is empty; widen the dataset time range")
    if not np.all(np.isfinite(data.x_train)):
        raise InvalidArgumentError(
            "training features contain NaN/inf; fill missing values before the PyTorch trainer"
        )


def _native_blob(model: MLP, extra: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"config": msgspec.to_builtins(model.config), "state_dict": model.state_dict(), **extra},
        buf,
    )
    return buf.getvalue()


def _curve(history: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """The loop's per-epoch metrics as :attr:`FitResult.history`: ``loss``, ``val_loss`` and
    the validation metrics renamed ``val_<name>`` (``auc`` -> ``val_auc``)."""
    return bound_history(
        [
            history_entry(
                epoch,
                {k if k == "loss" or k.startswith("val_") else f"val_{k}": v for k, v in m.items()},
            )
            for epoch, m in enumerate(history)
        ]
    )


def _result(
    model: MLP,
    p: MLPParams,
    data: TrainData,
    loop: LoopResult,
    resumed_from: int,
    extra: Mapping[str, Any],
) -> FitResult:
    metrics = _validate(model, _arrays(model, data, _cpu()))
    return FitResult(
        model=model,
        metrics=metrics,
        native=_native_blob(model, {}),
        native_format=NATIVE_FORMAT,
        n_train=len(data.x_train),
        n_validation=len(data.x_val),
        classes=list(data.classes),
        epochs_run=loop.epochs_run,
        best_epoch=loop.best_epoch,
        resumed_from_epoch=resumed_from,
        history=_curve(loop.history),
        extra={
            "params": msgspec.to_builtins(p),
            "stopped_early": loop.stopped_early,
            "torch_version": torch.__version__,
            **extra,
        },
    )


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _cpu() -> torch.device:
    return torch.device("cpu")


class TorchTrainer:
    """PyTorch MLPs behind the :class:`~carrara.training.frameworks.base.Trainer` contract."""

    framework = "pytorch"
    estimators: Mapping[str, Task | None] = {"mlp": None}
    # float32 both ways; the exported graph computes the same ops in a different order.
    parity_atol = 1e-5
    parity_rtol = 1e-4

    def framework_version(self) -> str:
        return str(torch.__version__)

    def _check_estimator(self, estimator: str) -> None:
        if estimator not in self.estimators:
            raise InvalidArgumentError(
                f"unknown pytorch estimator {estimator!r}; known: {', '.join(self.estimators)}"
            )

    def fit(
        self, estimator: str, params: Mapping[str, Any], data: TrainData, ctx: TrainContext
    ) -> FitResult:
        self._check_estimator(estimator)
        p = parse_params(params)
        _check_data(data)
        with _threads(p.threads):
            model, arrays = prepare(p, data, ctx.seed, _cpu())
            checkpoint = ctx.resume()
            state = load_blob(checkpoint.state) if checkpoint is not None else None
            start = checkpoint.epoch + 1 if checkpoint is not None else 0

            def on_epoch(
                epoch: int, metrics: dict[str, float], blob: Callable[[], bytes]
            ) -> Decision:
                stop = ctx.report(epoch, metrics)
                ctx.save_checkpoint(epoch, blob())
                return "stop" if stop else "continue"

            def on_preempt(epoch: int, step: int, blob: Callable[[], bytes]) -> None:
                ctx.checkpoint_now(epoch, blob(), step=step)

            if ctx.should_stop():
                raise CancelledError("training cancelled before it started")
            loop = train_loop(
                model, p, arrays, seed=ctx.seed, start_epoch=start, resume_state=state,
                on_epoch=_cancellable(ctx, on_epoch), preempting=ctx.preempting,
                on_preempt=on_preempt,
            )  # fmt: skip
            return _result(
                model, p, data, loop, checkpoint.epoch if checkpoint else -1, {"world_size": 1}
            )

    def predict_scores(self, model: Any, x: NDArray[np.float32], task: Task) -> NDArray[np.float64]:
        if not isinstance(model, MLP):
            raise InvalidArgumentError(
                f"expected a Carrara PyTorch MLP, got {type(model).__name__}"
            )
        model.eval()
        with torch.no_grad():
            t = torch.as_tensor(np.ascontiguousarray(x, np.float32))
            p = next(model.parameters())
            out = model.score(t.to(p.device)).double().cpu().numpy()
        return np.asarray(out, np.float64)

    def export_onnx(self, result: FitResult, data: TrainData) -> bytes:
        model = result.model
        if not isinstance(model, MLP):
            raise InvalidArgumentError(
                f"expected a Carrara PyTorch MLP, got {type(model).__name__}"
            )
        served = _Served(copy.deepcopy(model).cpu()).eval()
        example = torch.zeros(2, model.config.n_features)
        batch = torch.export.Dim("batch")
        with warnings.catch_warnings(), _quiet_logger("torch.onnx"), _quiet_logger("onnxscript"):
            # The torch.export-based exporter emits deprecation notices from its own
            # dependencies (pytree) and logs the torchvision ops it skips and its fallback opset
            # conversion (to DEFAULT_OPSET, which every trainer targets); none of it is about
            # our model.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                served,
                (example,),
                input_names=["features"],
                output_names=["score"],
                dynamic_shapes={"features": {0: batch}},
                dynamo=True,
                verbose=False,
                opset_version=DEFAULT_OPSET,
            )
        if program is None:
            raise FailedPreconditionError("torch.onnx.export returned no program")
        return bytes(program.model_proto.SerializeToString())

    def load_native(self, native: bytes, data: TrainData) -> Any:
        blob = load_blob(native)
        if "config" not in blob or "state_dict" not in blob:
            raise InvalidArgumentError(
                f"not a {NATIVE_FORMAT} artifact (needs 'config' and 'state_dict'); "
                f"got keys {sorted(blob)}"
            )
        config = msgspec.convert(blob["config"], MLPConfig)
        if config.n_features != data.n_features:
            raise InvalidArgumentError(
                f"the model takes {config.n_features} features, the data has {data.n_features}"
            )
        model = MLP(config)
        model.load_state_dict(blob["state_dict"])
        return model.eval()


def _cancellable(ctx: TrainContext, hook: EpochHook) -> EpochHook:
    def wrapped(epoch: int, metrics: dict[str, float], blob: Callable[[], bytes]) -> Decision:
        decision = hook(epoch, metrics, blob)
        return "cancel" if ctx.should_stop() else decision

    return wrapped


TRAINER = TorchTrainer()


# --- torchrun launcher ---------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _rank_errors(workdir: Path, launcher_log: Path) -> str:
    parts = []
    for f in sorted(workdir.glob("error-rank*.txt")):
        text = f.read_text(errors="replace")
        parts.append(f"{f.stem}:\n{text[-3000:]}")
    if not parts and launcher_log.exists():
        parts.append("torchrun output:\n" + launcher_log.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def fit_distributed(
    estimator: str,
    params: Mapping[str, Any],
    data: TrainData,
    ctx: TrainContext,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    backend: Literal["gloo", "nccl"] | None = None,
    gpus: int = 0,
    timeout_s: float = 3600.0,
    env: Mapping[str, str] | None = None,
    nodes: NodeGroup | None = None,
) -> FitResult:
    """Train ``estimator`` data-parallel on ``nproc_per_node`` torchrun ranks of this machine.

    Same result as :meth:`TorchTrainer.fit` (same seed, same global batches) up to float
    reduction order. ``backend`` defaults to ``nccl`` when ``gpus > 0`` and CUDA is available,
    else ``gloo``. ``ctx`` sees every epoch's metrics and checkpoints as in a local fit; a
    checkpoint from ``ctx.resume()`` is continued. Raises :class:`FailedPreconditionError`
    with the failing rank's traceback when a rank fails, :class:`DeadlineExceededError` after
    ``timeout_s``. ``env`` adds variables for the ranks.

    With ``nodes`` (``nnodes > 1``), this is node rank 0 of a multi-node fit: the ranks'
    inputs go to ``nodes.publish`` (which tells the other nodes where to meet, see
    :mod:`carrara.training.gang`) and torchrun runs with a static rendezvous on this node's
    store; the other nodes run :func:`run_node`. Each global batch is split across all
    ``nnodes x nproc_per_node`` ranks. A failed rank on any node raises
    :class:`RankFailedError`.
    """
    TRAINER._check_estimator(estimator)
    p = parse_params(params)
    _check_data(data)
    config = _config_for(p, data)
    if nproc_per_node < 1:
        raise InvalidArgumentError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if nnodes != (1 if nodes is None else nodes.nnodes):
        raise InvalidArgumentError(
            f"nnodes={nnodes}: a multi-node fit needs its node group (``nodes``), which the "
            "queue gives the worker holding node rank 0"
        )
    use_cuda = gpus > 0 and torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise InvalidArgumentError(
            "backend 'nccl' needs CUDA GPUs (gpus > 0 and torch.cuda.is_available()); "
            "use 'gloo' on CPU"
        )
    if use_cuda and nproc_per_node > torch.cuda.device_count():
        raise InvalidArgumentError(
            f"{nproc_per_node} ranks per node but only {torch.cuda.device_count()} CUDA devices"
        )
    checkpoint = ctx.resume()
    if ctx.should_stop():
        raise CancelledError("training cancelled before it started")
    with tempfile.TemporaryDirectory(prefix="carrara-ddp-") as tmp:
        workdir = Path(tmp)
        np.savez(
            workdir / "data.npz",
            x_train=np.ascontiguousarray(data.x_train, np.float32),
            y_train=np.asarray(data.y_train),
            x_val=np.ascontiguousarray(data.x_val, np.float32),
            y_val=np.asarray(data.y_val),
        )
        job = {
            "estimator": estimator,
            "params": msgspec.to_builtins(p),
            "config": msgspec.to_builtins(config),
            "task": data.task,
            "classes": list(range(config.n_classes)),  # ranks need only the count
            "feature_names": list(data.feature_names),
            "seed": int(ctx.seed),
            "backend": backend,
            "cuda": use_cuda,
            "timeout_s": float(timeout_s),
            "resume_epoch": checkpoint.epoch if checkpoint is not None else -1,
            "nproc_per_node": nproc_per_node,  # the launcher counts its ranks' preempted markers
        }
        (workdir / "job.json").write_text(json.dumps(job))
        if checkpoint is not None:
            (workdir / "resume.pt").write_bytes(checkpoint.state)
        if nodes is not None:
            master_addr, master_port = nodes.publish(workdir)
            cmd = _torchrun_cmd(
                workdir, nproc_per_node, nnodes=nnodes, node_rank=0,
                master=(master_addr, master_port),
            )  # fmt: skip
        else:
            cmd = _torchrun_cmd(workdir, nproc_per_node)
        child_env = dict(os.environ)
        child_env["OMP_NUM_THREADS"] = str(p.threads)  # torchrun warns when it has to pick
        child_env.update(env or {})
        launcher_log = workdir / "torchrun.log"
        deadline = time.monotonic() + timeout_s
        with launcher_log.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
            )
            try:
                failure = _relay(proc, workdir, ctx, deadline)
            finally:
                _stop(proc)
        if nodes is not None:
            nodes.cleanup()
        if failure is not None:
            raise failure
        rc = proc.returncode
        final_path = workdir / "final.pt"
        if _finished_despite(rc, workdir, nproc_per_node, "node rank 0"):
            rc = 0
        if rc != 0 or not final_path.exists():
            raise RankFailedError(
                f"distributed training failed (torchrun exit code {rc}, {nnodes} node(s) x "
                f"{nproc_per_node} ranks):\n{_rank_errors(workdir, launcher_log)}"
            )
        final = load_blob(final_path.read_bytes())
    model = MLP(config)
    model.load_state_dict(final["state_dict"])
    model.eval()
    loop = LoopResult(
        epochs_run=int(final["epochs_run"]), best_epoch=int(final["best_epoch"]),
        stopped_early=bool(final["stopped_early"]), history=list(final["history"]),
    )  # fmt: skip
    resumed = checkpoint.epoch if checkpoint is not None else -1
    return _result(
        model, p, data, loop, resumed,
        {"world_size": int(final["world_size"]), "backend": backend},
    )  # fmt: skip


class NodeGroup(Protocol):
    """Node rank 0's link to the other nodes of a multi-node fit."""

    nnodes: int

    def publish(self, workdir: Path) -> tuple[str, int]:
        """Make the ranks' inputs in ``workdir`` available to the other nodes and say where
        to meet; returns rank 0's store address and port."""
        ...

    def cleanup(self) -> None:
        """The fit is over: drop what :meth:`publish` stored."""
        ...


def _torchrun_cmd(
    workdir: Path,
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master: tuple[str, int] | None = None,
) -> list[str]:
    """torchrun for one node: a local c10d rendezvous when alone, else a static one on node
    rank 0's store (``--nnodes N --node-rank r --master-addr A --master-port P``)."""
    if master is None:
        rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port('127.0.0.1')}"]
    else:
        rdzv = [
            "--rdzv-backend=static", f"--node-rank={node_rank}",
            f"--master-addr={master[0]}", f"--master-port={master[1]}",
        ]  # fmt: skip
    # Through `launch`: torchrun gets SIGTERM (and stops its ranks) if this process dies.
    return [
        sys.executable, "-m", "carrara.training.frameworks.launch", str(os.getpid()),
        "torch.distributed.run",
        f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}", *rdzv, "--max-restarts=0",
        "-m", "carrara.training.frameworks.torch_ddp", str(workdir),
    ]  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a torchrun that is still running: SIGTERM to its process group, SIGKILL after 10 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_node(
    workdir: Path,
    *,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    nproc_per_node: int,
    gpus: Sequence[int] = (),
    should_stop: Callable[[], bool] = lambda: False,
    preempting: Callable[[], bool] = lambda: False,
) -> None:
    """Run node ``node_rank`` (> 0) of a multi-node fit whose inputs (from node rank 0's
    ``publish``) are in ``workdir``, until its ranks exit. ``preempting`` makes every rank stop
    after its current step (rank 0 then checkpoints and hands the job back; this raises
    :class:`Preempted`); ``should_stop`` kills the ranks (CancelledError). A failed rank
    raises :class:`RankFailedError`."""
    job = json.loads((workdir / "job.json").read_text())
    cmd = _torchrun_cmd(
        workdir, nproc_per_node, nnodes=nnodes, node_rank=node_rank,
        master=(master_addr, master_port),
    )  # fmt: skip
    child_env = dict(os.environ)
    child_env["OMP_NUM_THREADS"] = str(int(job["params"].get("threads", 1)))
    if gpus:
        child_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    deadline = time.monotonic() + float(job["timeout_s"])
    launcher_log = workdir / "torchrun.log"
    preempt_sent = False
    with launcher_log.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )
        try:
            while proc.poll() is None:
                if not preempt_sent and preempting():
                    _write_atomic(workdir / "preempt", b"preempt")
                    preempt_sent = True
                if should_stop():
                    raise CancelledError(f"node rank {node_rank}: stopped")
                if time.monotonic() > deadline:
                    raise DeadlineExceededError(
                        f"node rank {node_rank} ran past its timeout; raise timeout_s"
                    )
                time.sleep(0.01)
        finally:
            _stop(proc)
    if any(workdir.glob("preempted-rank*")):
        raise Preempted(f"node rank {node_rank}: ranks stopped for a preemption")
    if proc.returncode != 0 and not _finished_despite(
        proc.returncode, workdir, nproc_per_node, f"node rank {node_rank}"
    ):
        raise RankFailedError(
            f"node rank {node_rank}: torchrun exit code {proc.returncode} "
            f"({nproc_per_node} ranks):\n{_rank_errors(workdir, launcher_log)}"
        )


def _marked_ranks(workdir: Path, marker: str) -> int:
    """How many ranks left a ``<marker>-rank<r>`` file here (temp files not counted):
    ``done`` (passed the final barrier), ``preempted`` (stopped for a preemption)."""
    prefix = f"{marker}-rank"
    return sum(1 for f in workdir.glob(f"{prefix}*") if f.name[len(prefix) :].isdigit())


def _finished_despite(rc: int | None, workdir: Path, ranks: int, where: str) -> bool:
    """True when torchrun's non-zero exit came after every one of this node's ``ranks`` ranks
    finished (a crash in teardown, after the result was written): the result stands."""
    if rc == 0 or ranks <= 0 or _marked_ranks(workdir, "done") < ranks:
        return False
    log.warning(
        "%s: torchrun exited with code %s after all %d local ranks finished; keeping the result",
        where, rc, ranks,
    )  # fmt: skip
    return True


#: How long a stop may wait for the ranks' next epoch before they are ended.
STOP_GRACE_S = 5.0


def _relay(
    proc: subprocess.Popen[bytes], workdir: Path, ctx: TrainContext, deadline: float
) -> BaseException | None:
    """Pass rank 0's epoch events to ``ctx`` and answer each with a decision file, until the
    launcher exits. Returns the error to raise (pruned, preempted, timeout), if any.

    Once ``ctx.preempting()``, a ``preempt`` file tells this node's ranks to stop after their
    current step; rank 0's ``preempt`` event carries the mid-epoch checkpoint, passed to
    ``ctx.checkpoint_now``, and each rank leaves a ``preempted-rank<r>`` marker. When every
    local rank has (``job.json``'s ``nproc_per_node``), torchrun's teardown is cut short."""
    events = workdir / "events.jsonl"
    offset = 0
    failure: BaseException | None = None
    preempt_sent = False
    handback: tuple[int, int] | None = None  # (epoch, step) of the mid-epoch checkpoint
    ranks = int(json.loads((workdir / "job.json").read_text()).get("nproc_per_node", 0))
    # A stop (cancel, or the job's lease lost: another node failed or was preempted) normally
    # takes effect at the next epoch's decision; ranks that make no progress (waiting for a
    # node that will not come) are ended once it has stood for STOP_GRACE_S.
    next_look = time.monotonic() + 1.0
    stop_seen: float | None = None
    while True:
        # Handed back once the checkpoint is saved and every local rank has stopped training:
        # no need to wait for torchrun's own teardown (seconds); the caller stops it.
        # (Rank 0 appends its preempt event before its marker: read below in this pass.)
        stopped = ranks > 0 and _marked_ranks(workdir, "preempted") >= ranks
        if stopped and proc.poll() is None:
            # Every local rank stopped training and left its marker; what is left is process
            # teardown (~1 s here) that a machine being preempted should not wait for.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finished = proc.poll() is not None
        if not preempt_sent and ctx.preempting():
            _write_atomic(workdir / "preempt", b"preempt")
            preempt_sent = True
        if events.exists():
            with events.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            lines = chunk.split(b"\n")
            complete, rest = lines[:-1], lines[-1]
            offset += len(chunk) - len(rest)
            for line in complete:
                event = json.loads(line)
                epoch = int(event["epoch"])
                if event.get("preempt"):
                    step = int(event["step"])
                    ctx.checkpoint_now(
                        epoch, (workdir / event["checkpoint"]).read_bytes(), step=step
                    )
                    handback = (epoch, step)
                    continue
                decision: Decision = "continue"
                try:
                    stop = ctx.report(epoch, event["metrics"])
                    ctx.save_checkpoint(epoch, (workdir / event["checkpoint"]).read_bytes())
                    decision = "stop" if stop else "continue"
                except Pruned as exc:
                    failure, decision = exc, "prune"
                if ctx.should_stop():
                    decision = "cancel"
                _write_atomic(workdir / f"decision-{epoch}", decision.encode())
                with contextlib.suppress(FileNotFoundError):
                    (workdir / event["checkpoint"]).unlink()
        if finished:
            break
        now = time.monotonic()
        if now >= next_look:
            next_look = now + 1.0
            if ctx.should_stop():
                stop_seen = stop_seen or now
                if now - stop_seen >= STOP_GRACE_S:
                    _stop(proc)
                    return CancelledError("distributed training stopped (cancelled or lease lost)")
            else:
                stop_seen = None
        if now > deadline:
            return DeadlineExceededError(
                "distributed training ran past its timeout; raise timeout_s or train less"
            )
        time.sleep(0.01)
    if failure is None and _marked_ranks(workdir, "preempted"):
        at_epoch, at_step = handback if handback is not None else (None, 0)
        where = f" after step {at_step} of epoch {at_epoch + 2}" if at_epoch is not None else ""
        failure = Preempted(f"distributed training preempted{where}", epoch=at_epoch, step=at_step)
    if failure is None and (workdir / "cancelled").exists():
        failure = CancelledError("training cancelled")
    return failure
