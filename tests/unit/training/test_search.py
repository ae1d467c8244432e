"""Search specs are validated; the Optuna study is seeded, pruned, resumable and quiet."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from carrara.errors import InvalidArgumentError
from carrara.training.frameworks.base import Pruned
from carrara.training.search import (
    ATTEMPT_ATTR,
    RETRY_ATTR,
    metric_and_direction,
    open_study,
    optuna_storage_url,
    run_search,
    study_name,
    trial_records,
)
from carrara.training.spec import (
    CheckpointSpec,
    DatasetSpec,
    EarlyStoppingSpec,
    JobSpec,
    ModelSpec,
    ParamRange,
    SearchSpec,
    validate_spec,
)
from carrara.training.worker import WorkerContext

SPACE = {
    "lr": ParamRange(type="float", low=1e-4, high=1.0, log=True),
    "depth": ParamRange(type="int", low=1, high=8),
    "act": ParamRange(type="categorical", choices=["relu", "tanh"]),
}


def make_spec(search: SearchSpec | None = None, task: Any = "classification", **kw: Any) -> JobSpec:
    return JobSpec(
        model_name="m",
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(framework="pytorch", estimator="mlp", task=task),
        search=search,
        seed=3,
        **kw,
    )


def problems_of(spec: JobSpec) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        validate_spec(spec)
    return str(info.value)


def test_search_problems_name_every_mistake() -> None:
    valid = {
        "lr": SPACE["lr"],
        "batch_size": ParamRange(type="int", low=16, high=128),
        "optimizer": ParamRange(type="categorical", choices=["adam", "sgd"]),
    }
    validate_spec(make_spec(SearchSpec(space=valid, n_trials=3)))  # a valid one passes
    # Searched names are the estimator's params too (SPACE's depth/act are not pytorch's).
    assert "search.space: unknown param 'depth' for pytorch/mlp" in problems_of(
        make_spec(SearchSpec(space=SPACE, n_trials=3))
    )
    bad = SearchSpec(
        space={
            "a": ParamRange(type="float", low=1.0, high=1.0),
            "b": ParamRange(type="float", low=0.0, high=1.0, log=True),
            "c": ParamRange(type="categorical"),
            "d": ParamRange(type="int", low=1),
            "e": ParamRange(type="bogus", low=0, high=1),  # type: ignore[arg-type]
            "f": ParamRange(type="int", low=0.5, high=3),
            "g": ParamRange(type="categorical", choices=[[1, 2]]),
        },
        n_trials=0,
        metric="rmse",
        timeout_s=-1,
    )
    text = problems_of(
        make_spec(
            bad,
            early_stopping=EarlyStoppingSpec(metric="r2", patience=0),
            checkpoint=CheckpointSpec(every_epochs=-1, keep=0),
        )
    )
    for expected in (
        "search.space.a: low (1) must be < high (1)",
        "search.space.b: a log scale needs low > 0, got 0",
        "search.space.c: categorical needs a non-empty 'choices' list",
        "search.space.d: int needs both 'low' and 'high'",
        "search.space.e: unknown type 'bogus'",
        "search.space.f: int bounds must be whole numbers",
        "search.space.g: choices must be numbers, strings, booleans or null",
        "search.n_trials must be >= 1, got 0",
        "search.timeout_s must be > 0",
        "search.metric 'rmse' is not a classification metric; use one of auc, accuracy, log_loss",
        "early_stopping.patience must be >= 1, got 0",
        "early_stopping.metric 'r2' is not reported for classification",
        "checkpoint.every_epochs must be >= 0",
        "checkpoint.keep must be >= 1, got 0",
    ):
        assert expected in text, expected
    assert "search.space is empty" in problems_of(make_spec(SearchSpec(space={})))


def test_metric_direction_and_storage_urls(tmp_path: Path) -> None:
    assert metric_and_direction(make_spec(SearchSpec(space=SPACE))) == ("auc", "maximize")
    assert metric_and_direction(make_spec(SearchSpec(space=SPACE), task="regression")) == (
        "rmse",
        "minimize",
    )
    s = SearchSpec(space=SPACE, metric="log_loss", direction="maximize")
    assert metric_and_direction(make_spec(s)) == ("log_loss", "maximize")
    assert study_name("abc") == "carrara-abc"
    assert (
        optuna_storage_url("postgresql://u@127.0.0.1:5432/db")
        == "postgresql+psycopg://u@127.0.0.1:5432/db"
    )
    assert optuna_storage_url(f"sqlite:///{tmp_path}/reg.db") == f"sqlite:///{tmp_path}/optuna.db"
    assert optuna_storage_url("sqlite://") is None and optuna_storage_url(None) is None


def quadratic(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
    depth = trial.suggest_int("depth", 1, 8)
    act = trial.suggest_categorical("act", ["relu", "tanh"])
    return 1.0 - (math.log10(lr) + 2) ** 2 / 10 - (depth - 4) ** 2 / 50 + (act == "tanh") * 0.05


def test_in_memory_search_is_seeded_and_respects_n_trials(
    recwarn: pytest.WarningsRecorder,
) -> None:
    spec = make_spec(SearchSpec(space=SPACE, n_trials=6, pruner="none"))
    outcomes = []
    for _ in range(2):
        with open_study(spec, "job", None) as study:
            outcomes.append(run_search(spec, study, quadratic))
            assert len(study.trials) == 6
            assert all(t.user_attrs[ATTEMPT_ATTR] == 1 for t in study.trials)
    a, b = outcomes
    assert a.best_params == b.best_params and a.best_value == b.best_value  # seeded
    assert (a.n_trials, a.n_complete, a.n_pruned, a.trials_this_attempt) == (6, 6, 0, 6)
    assert a.study_name == "carrara-job" and a.metric == "auc" and a.direction == "maximize"
    assert a.best_value == max(t.value for t in study.trials if t.value is not None)
    # every trial is listed, by number, with its params inside the declared ranges
    assert [(t.number, t.state) for t in a.trials] == [(i, "COMPLETE") for i in range(6)]
    for t in a.trials:
        assert 1e-4 <= t.params["lr"] <= 1.0 and t.params["depth"] in range(1, 9)
        assert t.params["act"] in ("relu", "tanh") and set(t.params) == set(SPACE)
        assert t.value == quadratic(optuna.trial.FixedTrial(t.params))
    assert a.best_value == max(t.value for t in a.trials if t.value is not None)
    assert a.trials[a.best_trial].params == a.best_params
    assert a.trials == b.trials  # seeded
    # capped: the latest trials, the best one always kept
    latest = trial_records(study, limit=3)
    want = [3, 4, 5] if a.best_trial >= 3 else [a.best_trial, 4, 5]
    assert [t.number for t in latest] == want and trial_records(study, limit=0) == []
    assert not recwarn.list  # Optuna stays quiet (no ExperimentalWarning etc.)


def test_median_pruner_stops_bad_trials_through_the_worker_context() -> None:
    spec = make_spec(SearchSpec(space=SPACE, n_trials=8, pruner="median"))
    epochs_seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        trial.suggest_int("depth", 1, 8)
        trial.suggest_categorical("act", ["relu", "tanh"])
        ctx = WorkerContext(trial=trial, prune_metric="auc", maximize=True)
        quality = 1.0 - abs(math.log10(lr) + 2) / 4  # best near lr=1e-2
        try:
            for epoch in range(10):
                # The pruner gets the study's own metric (auc), never the loss.
                auc = 0.5 + quality * (epoch + 1) / 20
                ctx.report(epoch, {"val_loss": 1.0 - quality * (epoch + 1) / 10, "auc": auc})
                epochs_seen.append(epoch)
        except Pruned as exc:
            raise optuna.TrialPruned(str(exc)) from exc
        return quality

    with open_study(spec, "prune", None) as study:
        outcome = run_search(spec, study, objective)
    states = [t.state for t in study.trials]
    assert outcome.n_pruned >= 1 and outcome.n_complete + outcome.n_pruned == 8
    assert states.count(optuna.trial.TrialState.PRUNED) == outcome.n_pruned
    pruned = next(t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    assert max(pruned.intermediate_values) < 9  # stopped before its last epoch
    assert all(0 <= v <= 1 for v in pruned.intermediate_values.values())  # auc, not a loss
    assert pruned.value is None or 0 <= pruned.value <= 1
    assert len(epochs_seen) < 8 * 10
    assert [t.state for t in outcome.trials] == [t.state.name for t in study.trials]
    assert all(t.value is None for t in outcome.trials if t.state == "PRUNED")


def test_an_auc_study_never_records_negative_losses() -> None:
    """A trainer that reports only losses per epoch (XGBoost, Keras) in a maximize-AUC study:
    no intermediate value is reported (a negated val_loss used to be, and Optuna stored
    pruned trials with it), so every recorded value is an AUC."""
    spec = make_spec(SearchSpec(space=SPACE, n_trials=6, pruner="median"))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        trial.suggest_int("depth", 1, 8)
        trial.suggest_categorical("act", ["relu", "tanh"])
        ctx = WorkerContext(trial=trial, prune_metric="auc", maximize=True)
        quality = 1.0 - abs(math.log10(lr) + 2) / 4
        try:
            for epoch in range(5):
                ctx.report(epoch, {"val_loss": 1.0 - quality * (epoch + 1) / 5, "loss": 0.3})
        except Pruned as exc:
            raise optuna.TrialPruned(str(exc)) from exc
        return 0.5 + quality / 2

    with open_study(spec, "auc-only-losses", None) as study:
        run_search(spec, study, objective)
    for t in study.trials:
        assert all(v >= 0 for v in t.intermediate_values.values()), t
        assert t.value is None or 0 <= t.value <= 1, t


def test_the_pruner_takes_the_trainers_val_metric_spelling() -> None:
    reported: list[tuple[float, int]] = []

    class Trial:
        number = 0

        def report(self, value: float, step: int) -> None:
            reported.append((value, step))

        def should_prune(self) -> bool:
            return False

    ctx = WorkerContext(trial=Trial(), prune_metric="rmse")  # type: ignore[arg-type]
    ctx.report(0, {"val_loss": 0.25, "val_rmse": 0.5})
    ctx.report(1, {"val_loss": 0.25})  # no rmse this epoch: nothing reported
    assert reported == [(0.5, 0)]


def test_resumed_search_continues_the_study_and_retries_a_dead_trial(tmp_path: Path) -> None:
    url = optuna_storage_url(f"sqlite:///{tmp_path}/registry.db")
    spec = make_spec(SearchSpec(space=SPACE, n_trials=5, pruner="none"))
    with open_study(spec, "job7", url) as study:
        first = run_search(spec, study, quadratic, attempt=1)
    assert first.trials_this_attempt == 5
    # A worker of attempt 2 (of a 7-trial search) dies inside trial 5: left RUNNING.
    longer = make_spec(SearchSpec(space=SPACE, n_trials=7, pruner="none"))
    with open_study(longer, "job7", url) as study:
        dead = study.ask()
        dead.set_user_attr(ATTEMPT_ATTR, 2)
        dead_params = {"lr": dead.suggest_float("lr", 1e-4, 1.0, log=True)}
        dead_params["depth"] = dead.suggest_int("depth", 1, 8)
        dead_params["act"] = dead.suggest_categorical("act", ["relu", "tanh"])

    seen: list[tuple[int, dict[str, Any], Any]] = []

    def recording(trial: optuna.Trial) -> float:
        value = quadratic(trial)
        seen.append((trial.number, dict(trial.params), trial.user_attrs.get(RETRY_ATTR)))
        return value

    # Attempt 3 (a new worker) loads the same study: completed trials are not rerun.
    with open_study(longer, "job7", url) as study:
        resumed = run_search(longer, study, recording, attempt=3)
        states = [t.state.name for t in study.trials]
    assert resumed.retried_trials == [dead.number] == [5]
    assert resumed.trials_this_attempt == 2  # the retried trial + one new one (5 + 2 = 7)
    assert seen[0] == (6, dead_params, 5)  # same params, marked as a retry of trial 5
    assert states == ["COMPLETE"] * 5 + ["FAIL"] + ["COMPLETE"] * 2
    assert resumed.n_trials == 7 and resumed.best_value >= first.best_value
    # the outcome lists the study's trials of every attempt, the failed one included
    assert [t.state for t in resumed.trials] == states
    assert resumed.trials[5].value is None and resumed.trials[6].params == dead_params
    assert [t.value for t in resumed.trials[:5]] == [t.value for t in first.trials]
