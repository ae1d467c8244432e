# mypy: disable-error-code="import-untyped"
"""Run a training job: PIT training set -> fit (any framework) -> ONNX (parity) -> register.

Missing feature values (no row in the group's TTL window) are filled with the feature's mean
over the TRAINING split (0.0 when it has no value at all); the same number is the
``FeatureRef.default`` in the registered serving spec, so the gateway fills missing values
exactly as training did. Classification labels are encoded as class indices in sorted label
order; the labels are recorded in the version's ``training.classes`` tag.

A job is fitted through a :class:`WorkerContext`: cancellation, early stopping
(``spec.early_stopping``), search-trial pruning and checkpoints in the artifact store
(:mod:`.checkpoints`). A worker killed mid-job leaves its job RUNNING with a stale heartbeat;
the next worker to claim it resumes from the latest checkpoint, and registration is
idempotent per job (a version of the model whose ``run_id`` is the job id is reused), so the
model is registered exactly once. With ``spec.search`` the fit runs as an Optuna study
(:mod:`.search`) and the best trial's model is exported and registered.

Preemption (spot instances): SIGTERM, or a notice at ``preemption_notice`` (a file, or an
http(s) metadata URL polled by a side thread), sets :attr:`Worker.preempted`; the fit polls it
every step (``TrainContext.preempting``, no database read), writes a checkpoint at the step it
stopped after and raises :class:`Preempted`, and the worker hands the job back
(``queue.release``: QUEUED in its original place) and logs the notice-to-handback time.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from carrara.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)

from .checkpoints import CheckpointStore, checkpoint_root
from .frameworks.base import (
    Checkpoint,
    EarlyStopper,
    FitResult,
    Preempted,
    Pruned,
    RankFailedError,
    TrainData,
    bound_history,
)
from .gang import GANG, GangLink, run_follower
from .queue import Job, JobQueue
from .scheduler import MigDevice
from .spec import EarlyStoppingSpec, JobSpec, check_label_source, validate_spec

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from carrara.feature_cache.service import FeatureService
    from carrara.registry.auth import Principal
    from carrara.registry.registry import ModelRegistry
    from carrara.registry.types import ModelVersion, Signature

    from .frameworks.base import Trainer
    from .search import SearchOutcome

__all__ = [
    "Handback",
    "JobCancelledError",
    "Preempted",
    "Worker",
    "WorkerContext",
    "load_labels",
    "model_signature",
    "preemption_notice",
    "run_job",
]

log = logging.getLogger(__name__)

#: Progress lines: one every this many epochs (plus the first and resumed ones).
PROGRESS_EVERY_EPOCHS = 10


class JobCancelledError(CancelledError):
    """The job was cancelled while it ran."""


def default_actor() -> Principal:
    from carrara.registry.auth import Principal

    return Principal("training-worker", frozenset({"publisher"}))


def load_labels(spec: JobSpec, *, data_roots: Sequence[str] | None = None) -> pd.DataFrame:
    """The label rows in ``[start, end)``: entity column, timestamp (UTC), label. With
    ``data_roots`` the label source must lie under one of them (checked again here, right
    before reading, whatever the submitter checked)."""
    import pandas as pd

    d = spec.dataset
    if data_roots is not None:
        path = check_label_source(d.label_source, data_roots)
    else:
        path = Path(d.label_source)
    if not path.exists():
        raise InvalidArgumentError(f"label source {path} does not exist")
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = [c for c in (d.entity_column, d.timestamp_column, d.label_column) if c not in frame]
    if missing:
        raise InvalidArgumentError(
            f"label source {path} lacks column(s) {missing}; has {list(frame.columns)}"
        )
    frame = frame[[d.entity_column, d.timestamp_column, d.label_column]].copy()
    ts = frame[d.timestamp_column]
    if pd.api.types.is_integer_dtype(ts):
        frame[d.timestamp_column] = pd.to_datetime(ts, unit="us", utc=True)  # epoch µs
    else:
        frame[d.timestamp_column] = pd.to_datetime(ts, utc=True)
    if d.start is not None:
        frame = frame[frame[d.timestamp_column] >= pd.Timestamp(d.start)]
    if d.end is not None:
        frame = frame[frame[d.timestamp_column] < pd.Timestamp(d.end)]
    frame = frame[frame[d.label_column].notna()]
    if frame.empty:
        raise InvalidArgumentError(f"no label rows in {path} within the job's time range")
    return frame.reset_index(drop=True)


def encode_labels(y: np.ndarray[Any, Any], task: str) -> tuple[np.ndarray[Any, Any], list[Any]]:
    """Class indices (int64, labels sorted) and the labels in index order; regression targets
    as float64 with no classes."""
    if task != "classification":
        return np.asarray(y, np.float64), []
    classes, index = np.unique(np.asarray(y), return_inverse=True)
    return index.astype(np.int64).reshape(-1), [
        c.item() if hasattr(c, "item") else c for c in classes
    ]


class WorkerContext:
    """The :class:`TrainContext` a worker gives a trainer: cancellation, preemption, early
    stopping, search-trial pruning and checkpoints in the artifact store."""

    def __init__(
        self,
        *,
        seed: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
        early_stopping: EarlyStoppingSpec | None = None,
        store: CheckpointStore | None = None,
        every_epochs: int = 1,
        resume_from: CheckpointStore | None = None,
        trial: optuna.Trial | None = None,
        prune_metric: str = "",
        maximize: bool = False,
        progress: Callable[[str], None] | None = None,
        label: str = "",
        preempting: threading.Event | None = None,
    ) -> None:
        self.seed = seed
        self._should_stop = should_stop
        #: Set by the worker on a preemption notice or SIGTERM; read every training step.
        self._preempting = preempting or threading.Event()
        self.stopper = (
            EarlyStopper(
                early_stopping.metric,
                mode=early_stopping.mode,
                patience=early_stopping.patience,
                min_delta=early_stopping.min_delta,
            )
            if early_stopping is not None
            else None
        )
        self.store = store
        self.every_epochs = every_epochs
        self.resume_from = resume_from
        self.trial = trial
        self.prune_metric = prune_metric
        self.maximize = maximize
        self.progress = progress
        self.label = label
        self.resumed_from_epoch = -1
        self.epochs: list[int] = []  # epochs reported in THIS attempt
        self.last_metrics: dict[str, float] = {}
        self.checkpoints_written = 0
        #: (completed epoch, step) of the last checkpoint written, for the handback line.
        self.last_checkpoint: tuple[int, int] | None = None

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(f"{self.label}{message}")

    def should_stop(self) -> bool:
        return self._should_stop()

    def preempting(self) -> bool:
        return self._preempting.is_set()

    def _check_cancel(self, where: str) -> None:
        if self._should_stop():
            raise JobCancelledError(f"training cancelled {where}")

    def _prune_value(self, metrics: Mapping[str, float]) -> float | None:
        """The value reported to the pruner: the study's own metric (``auc``, or the
        trainer's ``val_auc`` spelling) when the trainer reports it per epoch, else None (no
        intermediate value). Never a stand-in such as a negated loss: Optuna stores a pruned
        trial with its last intermediate value, so that value must be in the study's metric
        and direction."""
        for name in (self.prune_metric, f"val_{self.prune_metric}"):
            if name and name in metrics:
                return float(metrics[name])
        return None

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self._check_cancel(f"after epoch {epoch}")
        self.epochs.append(epoch)
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        n = len(self.epochs)
        if n == 1 or (epoch + 1) % PROGRESS_EVERY_EPOCHS == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.last_metrics.items()))
            self._say(f"epoch {epoch + 1}: {shown}")
        stop = self.stopper.update(epoch, metrics) if self.stopper is not None else False
        if self.trial is not None:
            value = self._prune_value(metrics)
            if value is not None and math.isfinite(value):
                self.trial.report(value, epoch)
                if self.trial.should_prune():
                    raise Pruned(f"trial {self.trial.number} pruned after epoch {epoch}")
        if stop:
            assert self.stopper is not None
            self._say(
                f"early stopping after epoch {epoch + 1}: {self.stopper.metric} best "
                f"{self.stopper.best} at epoch {self.stopper.best_epoch + 1}"
            )
        return stop

    def resume(self) -> Checkpoint | None:
        found = None
        for store in (self.store, self.resume_from):
            if store is not None and (found := store.latest()) is not None:
                break
        if found is None:
            return None
        if self.stopper is not None and found.early_stopping is not None:
            self.stopper.restore(found.early_stopping)
        self.resumed_from_epoch = found.epoch
        if found.step:
            self._say(
                f"resuming from the checkpoint at epoch {found.epoch + 2} step {found.step} "
                "(taken when the previous worker was preempted)"
            )
        else:
            self._say(f"resuming from the checkpoint of epoch {found.epoch + 1}")
        return Checkpoint(epoch=found.epoch, state=found.state, step=found.step)

    def save_checkpoint(self, epoch: int, state: bytes) -> None:
        if self.store is None or self.every_epochs <= 0 or (epoch + 1) % self.every_epochs:
            return
        self.checkpoint_now(epoch, state)

    def checkpoint_now(self, epoch: int, state: bytes, *, step: int = 0) -> None:
        if self.store is None:
            return
        self.store.save(
            epoch,
            state,
            early_stopping=self.stopper.state() if self.stopper is not None else None,
            step=step,
        )
        self.checkpoints_written += 1
        self.last_checkpoint = (epoch, step)


#: The devices the queue leased to the job being run, as ``CUDA_VISIBLE_DEVICES`` takes them
#: (GPU ids, the GPU a share is on, or a MIG instance id); its ranks see only those devices.
_LEASED_GPUS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "carrara_leased_gpus", default=()
)


def _leased_devices(job: Job) -> tuple[str, ...]:
    return (job.mig_device,) if job.mig_device else tuple(str(g) for g in job.gpus)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _fit(
    trainer: Trainer,
    spec: JobSpec,
    params: Mapping[str, Any],
    data: TrainData,
    ctx: WorkerContext,
) -> FitResult:
    """One fit: data-parallel PyTorch across processes/nodes when the resources ask for it."""
    r = spec.resources
    gpus = _LEASED_GPUS.get()
    pytorch = spec.model.framework == "pytorch"
    # A one-process PyTorch job holding a GPU (whole, a share or a MIG instance) runs as one
    # torchrun rank that sees only that device; without CUDA it trains here on the CPU.
    on_gpu = pytorch and bool(gpus) and _cuda()
    if pytorch and (r.processes_per_node > 1 or r.nodes > 1 or on_gpu):
        from .frameworks import torch_trainer

        result: FitResult = torch_trainer.fit_distributed(
            spec.model.estimator,
            params,
            data,
            ctx,
            nproc_per_node=r.processes_per_node,
            nnodes=r.nodes,
            gpus=max(r.whole_gpus, 1 if on_gpu else 0),
            env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else None,
            nodes=GANG.get() if r.nodes > 1 else None,
        )
        return result
    return trainer.fit(spec.model.estimator, params, data, ctx)


def model_signature(onnx_model: bytes, features: Sequence[str]) -> Signature:
    """The version's signature: one input per feature, in the order of the columns of the
    model's input matrix (``group:feature``, float32 after the training defaults fill
    missing values, one value per row: shape ``[-1]``), and the ONNX graph's outputs (name,
    element dtype, shape with -1 for a dynamic size; a non-tensor output, such as a
    probability map, gets its kind as dtype and no shape)."""
    import onnx
    from onnx import helper

    from carrara.registry.types import Signature, TensorSpec

    graph = onnx.load_from_string(onnx_model).graph
    initializers = {t.name for t in graph.initializer}
    feeds = [i for i in graph.input if i.name not in initializers]
    dtype = "float32"
    if len(feeds) == 1 and feeds[0].type.HasField("tensor_type"):
        dtype = helper.tensor_dtype_to_np_dtype(feeds[0].type.tensor_type.elem_type).name
    outputs: list[TensorSpec] = []
    for out in graph.output:
        kind = out.type.WhichOneof("value")
        if kind != "tensor_type":
            outputs.append(TensorSpec(out.name, str(kind or "unknown").removesuffix("_type")))
            continue
        t = out.type.tensor_type
        shape = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim]
        outputs.append(
            TensorSpec(out.name, helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape)
        )
    return Signature(inputs=[TensorSpec(name, dtype, [-1]) for name in features], outputs=outputs)


def _json(value: Any) -> str:
    # enc_hook: trainers' lineage may hold str/number subclasses (torch's TorchVersion).
    return msgspec.json.encode(value, enc_hook=str).decode()


def _result_from_version(v: ModelVersion, run_id: str) -> dict[str, Any]:
    """The job result of a version an earlier attempt of the job already registered."""
    tags = v.tags

    def tag(name: str, default: Any) -> Any:
        return json.loads(tags[name]) if name in tags else default

    return {
        "model_name": v.model,
        "version": v.version,
        "metrics": dict(v.metrics),
        "snapshot_ref": v.training_dataset_ref,
        "feature_store_version": list(v.feature_store_version),
        "framework": v.framework,
        "run_id": run_id,
        "epochs_run": tag("training.epochs_run", 0),
        "best_epoch": tag("training.best_epoch", -1),
        "resumed_from_epoch": tag("training.resumed_from_epoch", -1),
        "history": tag("training.history", []),
        **({"search": tag("training.search", {})} if "training.search" in tags else {}),
        "reused_version": True,
    }


def run_job(
    job: Job | JobSpec,
    *,
    features: FeatureService,
    registry: ModelRegistry,
    actor: Principal | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[str], None] | None = None,
    data_roots: Sequence[str] | None = None,
    preempting: threading.Event | None = None,
) -> dict[str, Any]:
    """Run one job end to end; returns its result (registered version, metrics, lineage).
    ``data_roots``: the folders the label source must lie under (None: any). ``preempting``:
    once set, the fit checkpoints at its next step (or epoch) and :class:`Preempted` is
    raised; a fit that already finished is exported and registered all the same."""
    from carrara.core import AssemblerSpec, FeatureRef, GroupSchema, serving_spec

    from .frameworks import get_trainer
    from .frameworks.parity import check_parity

    spec = job.spec() if isinstance(job, Job) else job
    run_id = job.job_id if isinstance(job, Job) else f"adhoc-{uuid.uuid4().hex}"
    attempt = job.attempts if isinstance(job, Job) else 1
    _LEASED_GPUS.set(_leased_devices(job) if isinstance(job, Job) else ())
    validate_spec(spec, features=features)
    d = spec.dataset
    if data_roots is not None:  # before anything else: a refused source reads nothing
        check_label_source(d.label_source, data_roots)

    def say(message: str) -> None:
        log.info("training job %s: %s", run_id, message)
        if progress is not None:
            try:
                progress(message)
            except Exception as exc:  # a log line must never fail the job
                log.warning("training job %s: progress line not recorded: %s", run_id, exc)

    preempting = preempting or threading.Event()

    def check(stage: str) -> None:
        if should_stop():
            raise JobCancelledError(f"training job {run_id} cancelled before {stage}")
        # After the fit, finishing (export, register: seconds) beats redoing it elsewhere.
        if preempting.is_set() and stage in ("building the training set", "training"):
            raise Preempted(f"training job {run_id} preempted before {stage}")

    store = CheckpointStore(checkpoint_root(registry), run_id, keep=spec.checkpoint.keep)
    # A previous attempt may have registered and died before completing the job.
    done = registry.version_for_run(spec.model_name, run_id)
    if done is not None:
        say(f"already registered as {done.model} v{done.version} by an earlier attempt")
        store.delete_job()
        return _result_from_version(done, run_id)
    trainer = get_trainer(spec.model.framework)

    # 1. Point-in-time-correct training set, at pinned group versions.
    refs = [tuple(f.split(":", 1)) for f in d.features]
    group_names = list(dict.fromkeys(g for g, _ in refs))
    groups = {name: features.group(name) for name in group_names}
    labels = load_labels(spec, data_roots=data_roots)
    entity_df = labels.copy()
    for g in groups.values():
        if g.entity.key not in entity_df.columns:
            entity_df[g.entity.key] = entity_df[d.entity_column]
    entity_df["_row"] = np.arange(len(entity_df), dtype=np.int64)
    check("building the training set")
    training_set = features.get_training_set(
        entity_df,
        d.features,
        timestamp_column=d.timestamp_column,
        versions={name: g.version for name, g in groups.items()},
    )
    frame = training_set.to_pandas().sort_values([d.timestamp_column, "_row"], kind="stable")
    columns = [f"{g}__{f}" for g, f in refs]
    x_all = frame[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    y_all, classes = encode_labels(frame[d.label_column].to_numpy(), spec.model.task)

    # 2. Time-ordered split: the newest validation_fraction of rows validate.
    n = len(frame)
    n_val = min(n - 1, max(1, round(n * d.validation_fraction))) if n > 1 else 0
    n_train = n - n_val
    train_part = x_all[:n_train]
    with np.errstate(all="ignore"):
        counts = np.sum(~np.isnan(train_part), axis=0)
        sums = np.nansum(train_part, axis=0)
    defaults = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    x_filled = np.where(np.isnan(x_all), defaults[None, :], x_all).astype(np.float32)
    data = TrainData(
        x_train=x_filled[:n_train],
        y_train=y_all[:n_train],
        x_val=x_filled[n_train:],
        y_val=y_all[n_train:],
        feature_names=columns,
        task=spec.model.task,
        classes=classes,
    )
    say(
        f"training set built: {n} rows ({n_train} train, {n_val} validation), "
        f"{len(columns)} features, snapshot {training_set.snapshot_ref}"
    )

    # 3. Fit: one run, or an Optuna study whose best trial is kept.
    check("training")
    outcome: SearchOutcome | None = None
    params: dict[str, Any] = dict(spec.model.params)
    if spec.search is None:
        ctx = WorkerContext(
            seed=spec.seed,
            should_stop=should_stop,
            early_stopping=spec.early_stopping,
            store=store,
            every_epochs=spec.checkpoint.every_epochs,
            progress=say,
            preempting=preempting,
        )
        say(f"fitting {spec.model.framework}/{spec.model.estimator} (attempt {attempt})")
        result = _fit(trainer, spec, params, data, ctx)
        resumed_from = max(result.resumed_from_epoch, ctx.resumed_from_epoch)
        epochs_this_attempt = len(ctx.epochs)
    else:
        result, outcome, params = _search(
            trainer,
            spec,
            data,
            run_id,
            attempt,
            registry,
            store,
            should_stop,
            say,
            adhoc=not isinstance(job, Job),
            preempting=preempting,
        )
        resumed_from = result.resumed_from_epoch
        epochs_this_attempt = -1
    say(f"fitted: {', '.join(f'{k}={v:.4g}' for k, v in sorted(result.metrics.items()))}")

    # 4. ONNX export with a parity check on the validation rows (training rows if none).
    check("export")
    onnx_model = trainer.export_onnx(result, data)
    parity = check_parity(
        trainer,
        result.model,
        onnx_model,
        data.x_val if len(data.x_val) else data.x_train,
        spec.model.task,
    )

    # 5. Register (once per job) with lineage and the serving spec.
    check("registration")
    assembler = AssemblerSpec(
        groups=tuple(
            GroupSchema(name, g.version, tuple(g.definition.feature_names))
            for name, g in groups.items()
        ),
        features=tuple(FeatureRef(g, f, float(defaults[i])) for i, (g, f) in enumerate(refs)),
    )
    metrics = {k: float(v) for k, v in result.metrics.items() if math.isfinite(v)}
    metrics["onnx_parity_max_abs_diff"] = parity.max_abs_diff
    fsv = [f"{name}:{g.version}" for name, g in groups.items()]
    tags = {
        "training.estimator": spec.model.estimator,
        "training.task": spec.model.task,
        "training.label_column": d.label_column,
        "training.params": _json(params),
        "training.classes": _json(classes),
        "training.epochs_run": str(result.epochs_run),
        "training.best_epoch": str(result.best_epoch),
        "training.resumed_from_epoch": str(resumed_from),
        "training.attempt": str(attempt),
        "training.parity": _json(
            {
                "max_abs_diff": parity.max_abs_diff,
                "atol": parity.atol,
                "rtol": parity.rtol,
                "rows": parity.rows,
            }
        ),
    }
    if result.extra:
        tags["training.extra"] = _json(result.extra)
    tags["training.history"] = _json(result.history)  # "[]" for a fit without epochs
    if outcome is not None:
        tags["training.search"] = _json(outcome)
    existing = registry.version_for_run(spec.model_name, run_id)
    if existing is not None:
        version = existing
        say(f"already registered as {version.model} v{version.version}; reusing it")
    else:
        version = registry.register(
            spec.model_name,
            actor=actor or default_actor(),
            serving_artifact=onnx_model,
            native_artifact=result.native,
            native_format=result.native_format,
            framework=spec.model.framework,
            framework_version=trainer.framework_version(),
            metrics=metrics,
            feature_store_version=fsv,
            training_dataset_ref=training_set.snapshot_ref,
            run_id=run_id,
            tags=tags,
            serving_spec=serving_spec(assembler),
            signature=model_signature(onnx_model, [f"{g}:{f}" for g, f in refs]),
        )
        say(f"registered {version.model} v{version.version}")
    store.delete_job()  # the job is done: its checkpoints (and trial models) go
    out: dict[str, Any] = {
        "model_name": spec.model_name,
        "version": version.version,
        "metrics": metrics,
        "snapshot_ref": training_set.snapshot_ref,
        "feature_store_version": fsv,
        "framework": spec.model.framework,
        "run_id": run_id,
        "attempt": attempt,
        "columns": columns,
        "defaults": [float(v) for v in defaults],
        "classes": classes,
        "params": params,
        "n_train": result.n_train,
        "n_validation": result.n_validation,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": resumed_from,
        "parity_max_abs_diff": parity.max_abs_diff,
        "parity_atol": parity.atol,
        "parity_rtol": parity.rtol,
        "history": result.history,
    }
    if epochs_this_attempt >= 0:
        out["epochs_this_attempt"] = epochs_this_attempt
    if outcome is not None:
        out["search"] = msgspec.to_builtins(outcome)
    return out


def _search(
    trainer: Trainer,
    spec: JobSpec,
    data: TrainData,
    run_id: str,
    attempt: int,
    registry: ModelRegistry,
    store: CheckpointStore,
    should_stop: Callable[[], bool],
    say: Callable[[str], None],
    *,
    adhoc: bool,
    preempting: threading.Event | None = None,
) -> tuple[FitResult, SearchOutcome, dict[str, Any]]:
    """Run the job's Optuna study; returns the best trial's fit, the outcome and its params."""
    import optuna

    from .search import (
        RETRY_ATTR,
        metric_and_direction,
        open_study,
        optuna_storage_url,
        run_search,
        suggest_params,
    )

    assert spec.search is not None
    space = spec.search.space
    metric, direction = metric_and_direction(spec)
    storage = None if adhoc else optuna_storage_url(registry.db.url)
    fitted: dict[int, FitResult] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {**spec.model.params, **suggest_params(trial, space)}
        retry_of = trial.user_attrs.get(RETRY_ATTR)
        ctx = WorkerContext(
            seed=spec.seed,
            should_stop=should_stop,
            early_stopping=spec.early_stopping,
            store=store.scoped(f"trial-{trial.number}"),
            every_epochs=spec.checkpoint.every_epochs,
            resume_from=store.scoped(f"trial-{retry_of}") if retry_of is not None else None,
            trial=trial,
            prune_metric=metric,
            maximize=direction == "maximize",
            progress=say,
            label=f"trial {trial.number}: ",
            preempting=preempting,
        )
        try:
            result = _fit(trainer, spec, params, data, ctx)
        except Pruned as exc:
            raise optuna.TrialPruned(str(exc)) from exc
        except Preempted:
            # Optuna fails the trial; the job's next attempt retries it with the same params,
            # resuming from the checkpoint this trial just wrote.
            trial.study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number})
            raise
        if metric not in result.metrics:
            raise FailedPreconditionError(
                f"trial {trial.number} reported no {metric!r} (got {sorted(result.metrics)}); "
                "the validation split may hold one class only: widen the time range or pick "
                "another search.metric"
            )
        trial.set_user_attr("carrara.metrics", dict(result.metrics))
        trial.set_user_attr("carrara.epochs_run", result.epochs_run)
        trial.set_user_attr("carrara.best_epoch", result.best_epoch)
        trial.set_user_attr("carrara.native_format", result.native_format)
        # For a later attempt that loads this trial's model; thinner, as the study keeps it.
        trial.set_user_attr("carrara.history", bound_history(result.history, 200))
        if ctx.store is not None:
            ctx.store.save_model(result.native)
        fitted[trial.number] = result
        return float(result.metrics[metric])

    def on_trial(t: optuna.trial.FrozenTrial) -> None:
        value = "" if t.value is None else f" {metric}={t.value:.4g}"
        say(f"trial {t.number} {t.state.name.lower()}{value} params={_json(t.params)}")

    def check_cancel() -> None:
        if should_stop():
            raise JobCancelledError(f"training job {run_id} cancelled during the search")
        if preempting is not None and preempting.is_set():
            raise Preempted(f"training job {run_id} preempted between search trials")

    with open_study(spec, run_id, storage) as study:
        say(
            f"search: study {study.study_name}, {spec.search.n_trials} trials, {direction} {metric}"
        )
        outcome = run_search(
            spec, study, objective, attempt=attempt, check_cancel=check_cancel, on_trial=on_trial
        )
        best = study.trials[outcome.best_trial]
    best_params = {**spec.model.params, **outcome.best_params}
    say(
        f"search done: best trial {outcome.best_trial} {metric}={outcome.best_value:.4g} "
        f"of {outcome.n_trials} ({outcome.n_pruned} pruned)"
    )
    if outcome.best_trial in fitted:
        return fitted[outcome.best_trial], outcome, best_params
    # The best trial ran in an earlier attempt or on another worker: load its model.
    native = store.scoped(f"trial-{outcome.best_trial}").load_model()
    if native is not None:
        model = trainer.load_native(native, data)
        result = FitResult(
            model=model,
            metrics={k: float(v) for k, v in best.user_attrs.get("carrara.metrics", {}).items()},
            native=native,
            native_format=str(best.user_attrs.get("carrara.native_format", "")),
            n_train=len(data.x_train),
            n_validation=len(data.x_val),
            classes=list(data.classes),
            epochs_run=int(best.user_attrs.get("carrara.epochs_run", 0)),
            best_epoch=int(best.user_attrs.get("carrara.best_epoch", -1)),
            history=list(best.user_attrs.get("carrara.history", [])),
        )
        return result, outcome, best_params
    say(f"the model of trial {outcome.best_trial} is gone; refitting its params")
    ctx = WorkerContext(
        seed=spec.seed,
        should_stop=should_stop,
        early_stopping=spec.early_stopping,
        progress=say,
        label="refit: ",
        preempting=preempting,
    )
    return _fit(trainer, spec, best_params, data, ctx), outcome, best_params


class Handback(msgspec.Struct, frozen=True, kw_only=True):
    """A job a preempted worker handed back: where it was checkpointed (``epoch`` completed
    plus ``step`` steps; ``epoch`` None: nothing new was saved) and the notice-to-QUEUED time."""

    job_id: str
    notice: str
    epoch: int | None
    step: int
    ms: float


def preemption_notice(source: str, *, timeout_s: float = 2.0) -> str | None:
    """What a preemption notice says, or None while there is none. ``source``: a file path
    (``file://`` optional; a notice once it exists) or an http(s) URL: a notice once it
    answers 200 with a body other than ``FALSE`` (AWS spot ``.../spot/instance-action``
    answers 404 until then; GCP ``.../instance/preempted`` answers ``FALSE``/``TRUE`` and
    wants the ``Metadata-Flavor: Google`` header, which is sent). Errors and other statuses
    are no notice."""
    import urllib.error
    import urllib.request

    if not source.startswith(("http://", "https://")):
        path = Path(source.removeprefix("file://"))
        return f"notice file {path} exists" if path.exists() else None
    request = urllib.request.Request(source, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, body = int(response.status), response.read(4096)
    except urllib.error.HTTPError as exc:  # 404: no notice yet
        exc.close()
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.debug("preemption notice URL %s not answering: %s", source, exc)
        return None
    text = body.decode("utf-8", errors="replace").strip()
    if status != 200 or text.upper() == "FALSE":
        return None
    return f"{source} answered {text[:200] or '200'}"


class Worker:
    """Claims jobs from the queue and runs them, heartbeating from a side thread; hands the
    running job back at its next step when the machine is preempted (:meth:`preempt`)."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        features: FeatureService,
        registry: ModelRegistry,
        actor: Principal | None = None,
        worker_id: str | None = None,
        heartbeat_interval_s: float = 5.0,
        node: str | None = None,
        gpus: Sequence[int] = (),
        data_roots: Sequence[str] | None = None,
        preemption_notice: str | None = None,
        preemption_poll_s: float = 1.0,
        mig: Sequence[MigDevice] = (),
        address: str | None = None,
    ) -> None:
        self.queue = queue
        #: Folders label sources must lie under (None: any; ``carrara train worker`` passes
        #: the settings' ``data_roots``).
        self.data_roots = None if data_roots is None else tuple(data_roots)
        self.features = features
        self.registry = registry
        self.actor = actor
        self.worker_id = worker_id or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.node = node
        self.gpus = tuple(gpus)
        #: MIG instances of this node the worker may lease.
        self.mig = tuple(mig)
        #: Where other nodes reach this one when it holds node rank 0 of a multi-node job.
        self.address = address or socket.gethostname()
        #: Set by :meth:`shutdown` / :meth:`preempt` (SIGTERM, a preemption notice): the
        #: running job checkpoints at its next step and goes back to the queue (not
        #: CANCELLED), to be resumed from that checkpoint by another worker.
        self.preempted = threading.Event()
        #: Where preemption notices come from (a file path, or an http(s) URL polled by
        #: :meth:`run`): see :func:`preemption_notice`.
        self.preemption_notice = preemption_notice or None
        self.preemption_poll_s = preemption_poll_s
        self.notice = ""  # what told the worker to stop
        self._notice_at = 0.0  # time.monotonic() of the notice
        #: Jobs this worker handed back on preemption, with the handback time.
        self.handbacks: list[Handback] = []

    def shutdown(self) -> None:
        """Stop soon: hand the running job back to the queue and claim nothing more (what
        ``carrara train worker`` does on SIGTERM)."""
        self.preempt("SIGTERM / shutdown requested")

    def preempt(self, notice: str) -> None:
        """The machine is going away: the running job checkpoints at its next training step
        and is handed back; nothing more is claimed. Safe from a signal handler (no lock)."""
        if self.preempted.is_set():
            return
        self.notice, self._notice_at = notice, time.monotonic()
        self.preempted.set()

    def _watch_notice(self, stop: threading.Event) -> None:
        source = self.preemption_notice
        assert source is not None
        while not stop.is_set() and not self.preempted.is_set():
            found = preemption_notice(source, timeout_s=max(0.2, min(2.0, self.preemption_poll_s)))
            if found is not None:
                log.warning("preemption notice: %s; handing the running job back", found)
                self.preempt(found)
                return
            stop.wait(self.preemption_poll_s)

    def _progress(self, job: Job) -> Callable[[str], None]:
        record = getattr(self.queue, "log", None)

        def line(message: str) -> None:
            if record is not None:
                record(job.job_id, message)

        return line

    def _drop_checkpoints(self, job: Job) -> None:
        try:
            CheckpointStore(checkpoint_root(self.registry), job.job_id).delete_job()
        except Exception as exc:  # leftovers cost space only
            log.warning("training job %s: checkpoints not removed: %s", job.job_id, exc)

    def run_once(self) -> Job | None:
        """Claim and run one job; returns it in its final state, or None when idle."""
        if self.preempted.is_set():
            return None
        job = self.queue.claim(self.worker_id, node=self.node, gpus=self.gpus, mig=self.mig)
        if job is None:
            return None
        if job.node_rank > 0:  # another worker admitted this one to a multi-node job
            return run_follower(
                self.queue,
                job,
                root=checkpoint_root(self.registry),
                heartbeat_interval_s=self.heartbeat_interval_s,
                stopping=self.preempted,
                progress=self._progress(job),
            )
        gang = (
            GANG.set(
                GangLink(self.queue, job, root=checkpoint_root(self.registry), address=self.address)
            )
            if job.nodes > 1
            else None
        )
        try:
            return self._run_claimed(job)
        finally:
            if gang is not None:
                GANG.reset(gang)

    def _run_claimed(self, job: Job) -> Job:
        cancel = threading.Event()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_interval_s):
                try:
                    if self.queue.heartbeat(job):
                        cancel.set()
                except FailedPreconditionError as exc:  # lease lost: stop the run
                    log.warning("training job %s: %s; stopping", job.job_id, exc)
                    cancel.set()
                    return
                except Exception as exc:  # database trouble: keep the run, retry the beat
                    log.warning("heartbeat for training job %s failed: %s", job.job_id, exc)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.job_id[:8]}", daemon=True)
        thread.start()

        def should_stop() -> bool:
            if cancel.is_set():
                return True
            if self.queue.get(job.job_id).cancel_requested:
                cancel.set()
            return cancel.is_set()

        def settle(finish: Callable[[], Job]) -> Job:
            # A worker that lost its lease must not overwrite the job's new run.
            try:
                return finish()
            except FailedPreconditionError as exc:
                log.warning("training job %s: %s", job.job_id, exc)
                return self.queue.get(job.job_id)

        progress = self._progress(job)
        try:
            result = run_job(
                job,
                features=self.features,
                registry=self.registry,
                actor=self.actor,
                should_stop=should_stop,
                progress=progress,
                data_roots=self.data_roots,
                preempting=self.preempted,
            )
        except CancelledError as exc:
            done.set()
            thread.join()
            if self.preempted.is_set() and not cancel.is_set():
                return self._hand_back(job, exc, progress, settle)
            if isinstance(exc, Preempted) and job.nodes > 1 and not cancel.is_set():
                # Another node of the job was preempted: every rank stopped at the same step
                # and this one (rank 0) wrote the checkpoint; the job goes back to the queue.
                progress(f"a node of the job was preempted; {exc}; job requeued")
                return settle(lambda: self.queue.release(job, "a node was preempted; requeued"))
            final = settle(lambda: self.queue.cancelled(job))
            # Only a cancel that ended the job drops its checkpoints; a lost lease (also a
            # stop) leaves them to the worker that took the job over.
            if final.state == "CANCELLED" and final.worker == self.worker_id:
                self._drop_checkpoints(job)
            return final
        except Exception as exc:
            done.set()
            thread.join()
            log.exception("training job %s failed", job.job_id)
            error = f"{type(exc).__name__}: {exc}"
            try:
                progress(f"failed: {error}")
            except Exception:  # the failure itself is what matters
                log.warning("training job %s: failure line not recorded", job.job_id)
            if job.nodes > 1 and isinstance(exc, RankFailedError | DeadlineExceededError):
                # A node or rank was lost: this attempt failed; the job resumes from its
                # checkpoint on the next gang the queue forms.
                return self.queue.fail_attempt(job, error)
            return settle(lambda: self.queue.fail(job, error))
        done.set()
        thread.join()
        return settle(lambda: self.queue.complete(job, result))

    def _hand_back(
        self,
        job: Job,
        exc: CancelledError,
        progress: Callable[[str], None],
        settle: Callable[[Callable[[], Job]], Job],
    ) -> Job:
        """Requeue a preempted job (its checkpoint is written) and record how long it took."""
        epoch = exc.epoch if isinstance(exc, Preempted) else None
        step = exc.step if isinstance(exc, Preempted) else 0
        if epoch is None:
            where = "nothing new to checkpoint (it resumes from its last checkpoint)"
        elif step:
            where = f"checkpointed at epoch {epoch + 2} step {step}"
        else:
            where = f"checkpointed at the end of epoch {epoch + 1}"
        progress("worker shutting down; job requeued to resume from its checkpoint")
        back = settle(lambda: self.queue.release(job, f"preempted ({self.notice}); requeued"))
        ms = (time.monotonic() - self._notice_at) * 1000.0
        progress(f"preemption notice: {self.notice}; {where}; handed back in {ms:.0f} ms")
        self.handbacks.append(
            Handback(job_id=job.job_id, notice=self.notice, epoch=epoch, step=step, ms=ms)
        )
        return back

    def run(
        self,
        *,
        until_idle: bool = False,
        poll_interval_s: float = 2.0,
        stop: threading.Event | None = None,
    ) -> list[Job]:
        """Run jobs until ``stop`` is set (or, with ``until_idle``, the queue is empty), or
        the worker is preempted; with :attr:`preemption_notice` a side thread polls it."""
        finished: list[Job] = []
        stop = stop or threading.Event()
        watch_stop = threading.Event()
        watcher = None
        if self.preemption_notice is not None:
            watcher = threading.Thread(
                target=self._watch_notice, args=(watch_stop,), name="preemption-notice",
                daemon=True,
            )  # fmt: skip
            watcher.start()
        failures = 0
        try:
            while not stop.is_set() and not self.preempted.is_set():
                try:
                    job = self.run_once()
                except Exception as exc:
                    if until_idle:
                        raise
                    # The queue's database is unreachable or busy: a long-running worker waits
                    # and claims again (backing off up to 10 s) instead of exiting.
                    failures += 1
                    wait = min(poll_interval_s * 2 ** min(failures, 6), 10.0)
                    log.warning(
                        "worker %s: claiming a job failed (%s: %s); retrying in %.1f s",
                        self.worker_id, type(exc).__name__, exc, wait,
                    )  # fmt: skip
                    stop.wait(wait)
                    continue
                failures = 0
                if job is not None:
                    finished.append(job)
                    continue
                if until_idle:
                    break
                stop.wait(poll_interval_s)
        finally:
            watch_stop.set()
            if watcher is not None:
                watcher.join()
            leave = getattr(self.queue, "leave", None)
            if leave is not None:
                try:
                    leave(self.worker_id)  # no multi-node job may count on this worker now
                except Exception as exc:
                    log.warning("worker %s: leaving the queue failed: %s", self.worker_id, exc)
        return finished
