"""Hyperparameter search for a training job: one Optuna study per job, shared by workers.

The study is named ``carrara-{job_id}``. Its storage follows the registry: on PostgreSQL it is
Optuna's RDB storage in the same database (schema ``optuna``, so Optuna's own tables and
migration marker never mix with Carrara's), through the psycopg 3 driver, so several workers
(or a worker resuming after a crash) share one study; on an SQLite registry it is an SQLite
file next to the registry database; ad-hoc runs keep it in memory. A resumed job continues the
same study: finished trials are not rerun; a trial the dead worker left RUNNING is marked FAIL
and enqueued again with the same parameters (its checkpoints let it resume mid-way).

The outcome (:class:`SearchOutcome`) lists the study's trials (:class:`TrialRecord`: number,
state, value, searched params), at most :data:`MAX_TRIAL_RECORDS`, for the job result and the
version's ``training.search`` tag.

Sampler: TPE seeded with the job's seed (plus the number of trials already in the study, so a
resumed or joining worker does not replay the first proposals). Pruner: Optuna's
``MedianPruner`` fed by :meth:`TrainContext.report`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from carrara.errors import FailedPreconditionError, InvalidArgumentError

if TYPE_CHECKING:
    import optuna

    from .spec import JobSpec, ParamRange, SearchSpec

__all__ = [
    "MAX_TRIAL_RECORDS",
    "METRIC_DIRECTIONS",
    "SearchOutcome",
    "TrialRecord",
    "metric_and_direction",
    "close_storage",
    "open_storage",
    "open_study",
    "optuna_storage_url",
    "run_search",
    "study_name",
    "suggest_params",
    "trial_records",
]

log = logging.getLogger(__name__)

Direction = Literal["minimize", "maximize"]

#: Validation metrics a search may optimize, per task, with their natural direction.
METRIC_DIRECTIONS: dict[str, dict[str, Direction]] = {
    "classification": {"auc": "maximize", "accuracy": "maximize", "log_loss": "minimize"},
    "regression": {"rmse": "minimize", "mae": "minimize", "r2": "maximize"},
}
DEFAULT_METRIC = {"classification": "auc", "regression": "rmse"}
OPTUNA_SCHEMA = "optuna"
#: user attribute naming the job attempt that ran a trial (stale RUNNING trials are retried)
ATTEMPT_ATTR = "carrara.attempt"
RETRY_ATTR = "carrara.retry_of"


TrialStateName = Literal["COMPLETE", "PRUNED", "FAIL", "RUNNING"]
#: The most trials :attr:`SearchOutcome.trials` lists.
MAX_TRIAL_RECORDS = 500


class TrialRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One trial of the study, as the job result and the version's lineage list it."""

    number: int
    state: TrialStateName
    value: float | None  # the search metric of a COMPLETE trial; None otherwise
    params: dict[str, Any]  # the searched params' values (not the spec's fixed ones)


class SearchOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a search found; recorded in the job result and the version's lineage."""

    study_name: str
    metric: str
    direction: Direction
    n_trials: int  # finished trials in the study (complete + pruned), all workers
    n_complete: int
    n_pruned: int
    trials_this_attempt: int
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    retried_trials: list[int] = msgspec.field(default_factory=list)
    #: every trial of the study (all workers, all attempts) by number, but trials still
    #: WAITING in the queue; at most MAX_TRIAL_RECORDS: the latest ones plus the best
    trials: list[TrialRecord] = msgspec.field(default_factory=list)


def study_name(job_id: str) -> str:
    return f"carrara-{job_id}"


def metric_and_direction(spec: JobSpec) -> tuple[str, Direction]:
    """The metric a search optimizes and which way (auc/maximize or rmse/minimize default)."""
    task = spec.model.task
    s = spec.search
    metric = (s.metric if s is not None else "") or DEFAULT_METRIC[task]
    known = METRIC_DIRECTIONS[task]
    if metric not in known:
        raise InvalidArgumentError(
            f"search.metric {metric!r} is not a {task} metric; use one of {', '.join(known)}"
        )
    direction = s.direction if s is not None else "auto"
    return metric, known[metric] if direction == "auto" else direction


def optuna_storage_url(registry_url: str | None) -> str | None:
    """Optuna's storage for a registry: ``postgresql+psycopg://`` for a PostgreSQL registry,
    ``sqlite:///<registry folder>/optuna.db`` for an SQLite file, None (in memory) otherwise."""
    if not registry_url:
        return None
    for prefix in ("postgresql://", "postgres://"):
        if registry_url.startswith(prefix):
            return "postgresql+psycopg://" + registry_url.removeprefix(prefix)
    if registry_url.startswith("sqlite:///") and registry_url != "sqlite:///:memory:":
        path = Path(registry_url.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = Path.cwd() / path
        return f"sqlite:///{path.parent / 'optuna.db'}"
    return None


#: PostgreSQL advisory lock key held while Optuna creates its schema, tables and a study:
#: Optuna's table creation is not safe against a concurrent creator (duplicate type errors).
_PG_LOCK_KEY = 0x6361_7272_6F70_7475  # "carroptu"


@contextmanager
def _setup_lock(url: str | None) -> Iterator[None]:
    """Serialize storage setup across workers (PostgreSQL only; SQLite locks the file)."""
    if url is None or not url.startswith("postgresql+psycopg://"):
        yield
        return
    import psycopg

    plain = "postgresql://" + url.removeprefix("postgresql+psycopg://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_PG_LOCK_KEY,))
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}")
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK_KEY,))


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """Optuna storage at ``url`` (from :func:`optuna_storage_url`; None: in memory). Close it
    with :func:`close_storage` (the RDB storage holds a connection pool)."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    with warnings.catch_warnings(), _setup_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if url.startswith("postgresql+psycopg://"):
            engine = {
                "pool_pre_ping": True,
                "connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"},
            }
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        # SQLite: concurrent workers wait for the file lock rather than fail at once.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    import optuna

    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


@contextmanager
def open_study(spec: JobSpec, job_id: str, storage_url: str | None) -> Iterator[optuna.Study]:
    """The job's study, created or loaded (quiet: Optuna logs at WARNING and up only); its
    storage is closed when the block ends."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = spec.search
    if s is None:
        raise InvalidArgumentError("the job has no search section")
    _, direction = metric_and_direction(spec)
    storage = open_storage(storage_url)
    try:
        with warnings.catch_warnings(), _setup_lock(storage_url):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            name = study_name(job_id)
            pruner: optuna.pruners.BasePruner = (
                optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
                if s.pruner == "median"
                else optuna.pruners.NopPruner()
            )
            # Seeded by the spec; offset by the trials already there so a resumed or joining
            # worker does not propose the same first points again.
            try:
                existing = len(optuna.load_study(study_name=name, storage=storage).trials)
            except KeyError:
                existing = 0
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=optuna.samplers.TPESampler(seed=spec.seed + existing),
                pruner=pruner,
                direction=direction,
                load_if_exists=True,
            )
        yield study
    finally:
        close_storage(storage)


def suggest_params(trial: optuna.Trial, space: Mapping[str, ParamRange]) -> dict[str, Any]:
    """One trial's values for the ranged parameters (ranges checked by ``search_problems``)."""
    out: dict[str, Any] = {}
    for name, r in space.items():
        if r.type == "categorical":
            out[name] = trial.suggest_categorical(name, list(r.choices))
        elif r.type == "int":
            assert r.low is not None and r.high is not None
            out[name] = trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
        else:
            assert r.low is not None and r.high is not None
            out[name] = trial.suggest_float(name, float(r.low), float(r.high), log=r.log)
    return out


def trial_records(study: optuna.Study, limit: int = MAX_TRIAL_RECORDS) -> list[TrialRecord]:
    """The study's trials as :class:`TrialRecord` by number (WAITING ones left out). Beyond
    ``limit``, the latest ``limit`` are kept, the best trial always among them."""
    from optuna.trial import TrialState

    states: dict[TrialState, TrialStateName] = {
        TrialState.COMPLETE: "COMPLETE",
        TrialState.PRUNED: "PRUNED",
        TrialState.FAIL: "FAIL",
        TrialState.RUNNING: "RUNNING",
    }
    trials = sorted(
        (t for t in study.get_trials(deepcopy=False) if t.state in states),
        key=lambda t: t.number,
    )
    if len(trials) > limit:
        kept = trials[len(trials) - limit :] if limit > 0 else []
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if kept and complete:
            best = study.best_trial
            if all(t.number != best.number for t in kept):
                kept = [best, *kept[1:]]
        trials = kept
    return [
        TrialRecord(
            number=t.number,
            state=states[t.state],
            value=float(t.value)
            if t.state == TrialState.COMPLETE and t.value is not None
            else None,
            params=dict(t.params),
        )
        for t in trials
    ]


def _retry_stale(study: optuna.Study, attempt: int) -> list[int]:
    """Fail the trials an earlier attempt of this job left RUNNING (its worker died) and
    enqueue each again with the same parameters; returns their numbers."""
    from optuna.trial import TrialState

    retried: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if int(t.user_attrs.get(ATTEMPT_ATTR, attempt)) >= attempt:
            continue  # a live worker of this attempt (a shared study) owns it
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        origin = int(t.user_attrs.get(RETRY_ATTR, t.number))
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_ATTR: origin})
        retried.append(t.number)
    return retried


def run_search(
    spec: JobSpec,
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    attempt: int = 1,
    check_cancel: Callable[[], None] = lambda: None,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> SearchOutcome:
    """Run trials until the study holds ``search.n_trials`` finished (or running) ones, or
    ``search.timeout_s`` passes; returns the best trial. ``objective`` raises
    :class:`optuna.TrialPruned` for pruned trials; any other error ends the search."""
    import optuna
    from optuna.trial import TrialState

    s: SearchSpec | None = spec.search
    if s is None:
        raise InvalidArgumentError("the job has no search section")
    metric, direction = metric_and_direction(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    retried = _retry_stale(study, attempt)
    deadline = None if s.timeout_s is None else time.monotonic() + s.timeout_s
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    mine: list[int] = []

    def tagged(trial: optuna.Trial) -> float:
        trial.set_user_attr(ATTEMPT_ATTR, attempt)
        mine.append(trial.number)
        return objective(trial)

    while True:
        check_cancel()
        trials = study.get_trials(deepcopy=False, states=counted)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if waiting == 0 and len(trials) >= s.n_trials:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(tagged, n_trials=1, catch=(), gc_after_trial=False)
        if on_trial is not None and mine:
            on_trial(study.get_trials(deepcopy=False)[mine[-1]])

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if not complete:
        raise FailedPreconditionError(
            f"search of study {study.study_name!r} finished no trial ({len(finished)} pruned); "
            "raise search.n_trials or timeout_s, or use pruner: none"
        )
    best = study.best_trial
    assert best.value is not None
    return SearchOutcome(
        study_name=study.study_name,
        metric=metric,
        direction=direction,
        n_trials=len(finished),
        n_complete=len(complete),
        n_pruned=len(finished) - len(complete),
        trials_this_attempt=len(mine),
        best_trial=best.number,
        best_value=float(best.value),
        best_params=dict(best.params),
        retried_trials=retried,
        trials=trial_records(study),
    )
