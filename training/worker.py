# mypy: disable-error-code="import-untyped"
"""Run a training job: PIT training set -> train -> evaluate -> ONNX (parity) -> register.

Missing feature values (no row in the group's TTL window) are filled with the feature's mean
over the TRAINING split (0.0 when it has no value at all); the same number is the
``FeatureRef.default`` in the registered serving spec, so the gateway fills missing values
exactly as training did.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carrara.errors import CarraraError, FailedPreconditionError, InvalidArgumentError

from .export import PARITY_ATOL, check_parity, export_onnx
from .queue import Job, JobQueue
from .spec import JobSpec, validate_spec
from .trainers import train_sklearn

if TYPE_CHECKING:
    import pandas as pd

    from carrara.feature_cache.service import FeatureService
    from carrara.registry.auth import Principal
    from carrara.registry.registry import ModelRegistry

__all__ = ["JobCancelledError", "Worker", "load_labels", "run_job"]

log = logging.getLogger(__name__)


class JobCancelledError(CarraraError):
    """The job was cancelled while it ran."""


def default_actor() -> Principal:
    from carrara.registry.auth import Principal

    return Principal("training-worker", frozenset({"publisher"}))


def load_labels(spec: JobSpec) -> pd.DataFrame:
    """The label rows in ``[start, end)``: entity column, timestamp (UTC), label."""
    import pandas as pd

    d = spec.dataset
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


def run_job(
    job: Job | JobSpec,
    *,
    features: FeatureService,
    registry: ModelRegistry,
    actor: Principal | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    parity_atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Run one job end to end; returns its result (registered version, metrics, lineage)."""
    import joblib
    import sklearn

    from carrara.core import AssemblerSpec, FeatureRef, GroupSchema
    from carrara.gateway.registry_source import serving_spec

    spec = job.spec() if isinstance(job, Job) else job
    run_id = job.job_id if isinstance(job, Job) else f"adhoc-{uuid.uuid4().hex}"
    validate_spec(spec, features=features)
    d = spec.dataset

    def checkpoint(stage: str) -> None:
        if should_stop():
            raise JobCancelledError(f"training job {run_id} cancelled before {stage}")

    # 1. Point-in-time-correct training set, at pinned group versions.
    refs = [tuple(f.split(":", 1)) for f in d.features]
    group_names = list(dict.fromkeys(g for g, _ in refs))
    groups = {name: features.group(name) for name in group_names}
    labels = load_labels(spec)
    entity_df = labels.copy()
    for g in groups.values():
        if g.entity.key not in entity_df.columns:
            entity_df[g.entity.key] = entity_df[d.entity_column]
    entity_df["_row"] = np.arange(len(entity_df), dtype=np.int64)
    checkpoint("building the training set")
    training_set = features.get_training_set(
        entity_df,
        d.features,
        timestamp_column=d.timestamp_column,
        versions={name: g.version for name, g in groups.items()},
    )
    frame = training_set.to_pandas().sort_values([d.timestamp_column, "_row"], kind="stable")
    columns = [f"{g}__{f}" for g, f in refs]
    x_all = frame[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    y_all = frame[d.label_column].to_numpy()
    if spec.model.task == "regression":
        y_all = y_all.astype(np.float64)

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
    x_train, x_val = x_filled[:n_train], x_filled[n_train:]
    y_train, y_val = y_all[:n_train], y_all[n_train:]

    # 3. Train and evaluate.
    checkpoint("training")
    result = train_sklearn(spec.model, x_train, y_train, x_val, y_val, seed=spec.seed)

    # 4. ONNX export with a parity check on the validation rows (training rows if none).
    checkpoint("export")
    onnx_model = export_onnx(result.model, len(columns), spec.model.task)
    parity = check_parity(
        result.model,
        onnx_model,
        x_val if len(x_val) else x_train,
        spec.model.task,
        atol=parity_atol,
    )
    native = io.BytesIO()
    joblib.dump(result.model, native)

    # 5. Register with lineage and the serving spec.
    checkpoint("registration")
    assembler = AssemblerSpec(
        groups=tuple(
            GroupSchema(name, g.version, tuple(g.definition.feature_names))
            for name, g in groups.items()
        ),
        features=tuple(FeatureRef(g, f, float(defaults[i])) for i, (g, f) in enumerate(refs)),
    )
    metrics = dict(result.metrics)
    metrics["onnx_parity_max_abs_diff"] = parity.max_abs_diff
    version = registry.register(
        spec.model_name,
        actor=actor or default_actor(),
        serving_artifact=onnx_model,
        native_artifact=native.getvalue(),
        native_format="joblib",
        framework="sklearn",
        framework_version=sklearn.__version__,
        metrics=metrics,
        feature_store_version=[f"{name}:{g.version}" for name, g in groups.items()],
        training_dataset_ref=training_set.snapshot_ref,
        run_id=run_id,
        tags={
            "training.estimator": spec.model.estimator,
            "training.task": spec.model.task,
            "training.label_column": d.label_column,
        },
        serving_spec=serving_spec(assembler),
    )
    return {
        "model_name": spec.model_name,
        "version": version.version,
        "metrics": metrics,
        "snapshot_ref": training_set.snapshot_ref,
        "feature_store_version": [f"{name}:{g.version}" for name, g in groups.items()],
        "columns": columns,
        "defaults": [float(v) for v in defaults],
        "n_train": result.n_train,
        "n_validation": result.n_validation,
        "parity_max_abs_diff": parity.max_abs_diff,
        "parity_atol": parity.atol,
        "parity_rtol": parity.rtol,
    }


class Worker:
    """Claims jobs from the queue and runs them, heartbeating from a side thread."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        features: FeatureService,
        registry: ModelRegistry,
        actor: Principal | None = None,
        worker_id: str | None = None,
        heartbeat_interval_s: float = 5.0,
    ) -> None:
        self.queue = queue
        self.features = features
        self.registry = registry
        self.actor = actor
        self.worker_id = worker_id or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_interval_s = heartbeat_interval_s

    def run_once(self) -> Job | None:
        """Claim and run one job; returns it in its final state, or None when idle."""
        job = self.queue.claim(self.worker_id)
        if job is None:
            return None
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

        try:
            result = run_job(
                job,
                features=self.features,
                registry=self.registry,
                actor=self.actor,
                should_stop=should_stop,
            )
        except JobCancelledError:
            done.set()
            thread.join()
            return settle(lambda: self.queue.cancelled(job))
        except Exception as exc:
            done.set()
            thread.join()
            log.exception("training job %s failed", job.job_id)
            error = f"{type(exc).__name__}: {exc}"
            return settle(lambda: self.queue.fail(job, error))
        done.set()
        thread.join()
        return settle(lambda: self.queue.complete(job, result))

    def run(
        self,
        *,
        until_idle: bool = False,
        poll_interval_s: float = 2.0,
        stop: threading.Event | None = None,
    ) -> list[Job]:
        """Run jobs until ``stop`` is set (or, with ``until_idle``, the queue is empty)."""
        finished: list[Job] = []
        stop = stop or threading.Event()
        while not stop.is_set():
            job = self.run_once()
            if job is not None:
                finished.append(job)
                continue
            if until_idle:
                break
            stop.wait(poll_interval_s)
        return finished
