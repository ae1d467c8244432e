"""Optuna on the registry's PostgreSQL: two workers share one study (in schema ``optuna``)."""

from __future__ import annotations

import threading
import time

import optuna
import psycopg
import pytest

from carrara.training.search import (
    ATTEMPT_ATTR,
    OPTUNA_SCHEMA,
    SearchOutcome,
    close_storage,
    open_storage,
    open_study,
    optuna_storage_url,
    run_search,
)
from carrara.training.spec import DatasetSpec, JobSpec, ModelSpec, ParamRange, SearchSpec

pytestmark = pytest.mark.integration

N_TRIALS = 8


def test_two_workers_share_one_study(postgres_url: str) -> None:
    spec = JobSpec(
        model_name="m",
        dataset=DatasetSpec(
            features=["g:a"], label_source="l.parquet", label_column="y", entity_column="id"
        ),
        model=ModelSpec(framework="xgboost", estimator="gradient_boosting", task="regression"),
        search=SearchSpec(
            space={"max_depth": ParamRange(type="int", low=1, high=10)},
            n_trials=N_TRIALS,
            pruner="none",
        ),
        seed=11,
    )
    storage = optuna_storage_url(postgres_url)
    assert storage is not None and storage.startswith("postgresql+psycopg://")
    by_worker: dict[str, list[int]] = {"w1": [], "w2": []}
    outcomes: dict[str, SearchOutcome] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        try:
            barrier.wait(timeout=30)  # both create/load the study at once

            def objective(trial: optuna.Trial) -> float:
                depth = trial.suggest_int("max_depth", 1, 10)
                trial.set_user_attr("worker", name)
                by_worker[name].append(trial.number)
                time.sleep(0.05)  # let the other worker interleave
                return float((depth - 6) ** 2)

            with open_study(spec, "shared-job", storage) as study:
                outcomes[name] = run_search(spec, study, objective, attempt=1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in by_worker]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    assert by_worker["w1"] and by_worker["w2"]  # both workers ran trials ...
    pg = open_storage(storage)
    try:
        study = optuna.load_study(study_name="carrara-shared-job", storage=pg)
        trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    finally:
        close_storage(pg)
    # ... into one study: every trial once, numbered 0..n-1, the budget shared (a race of
    # the two last checks may add one trial each at most).
    numbers = sorted(by_worker["w1"] + by_worker["w2"])
    assert numbers == [t.number for t in trials] == list(range(len(trials)))
    assert N_TRIALS <= len(trials) <= N_TRIALS + 1
    assert {t.user_attrs["worker"] for t in trials} == {"w1", "w2"}
    assert all(t.user_attrs[ATTEMPT_ATTR] == 1 for t in trials)
    best = min(t.value for t in trials if t.value is not None)
    for o in outcomes.values():
        assert o.study_name == "carrara-shared-job" and o.direction == "minimize"
        assert o.metric == "rmse" and o.best_value >= best
    # The worker that finished last saw every trial complete, so it knows the true best.
    assert min(o.best_value for o in outcomes.values()) == best
    assert sum(o.trials_this_attempt for o in outcomes.values()) == len(trials)

    # Optuna's tables live in their own schema, apart from Carrara's.
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'trials'"
        ).fetchall()
    assert rows == [(OPTUNA_SCHEMA,)]

    # A resumed attempt continues the study: nothing is rerun once the budget is met.
    with open_study(spec, "shared-job", storage) as study:
        again = run_search(spec, study, lambda t: 0.0, attempt=2)
    assert again.trials_this_attempt == 0 and again.n_trials == len(trials)
