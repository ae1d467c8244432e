"""The training job spec: what a data scientist submits (YAML or JSON).

::

    model_name: churn
    dataset:
      features: ["trips:t0", "rating:stars"]
      label_source: labels.parquet      # entity id column, event_timestamp, label column
      label_column: churned
      entity_column: driver_id
      start: "2026-01-01T00:00:00Z"
      end: "2026-02-01T00:00:00Z"
      validation_fraction: 0.2
    model:
      framework: sklearn
      estimator: logistic_regression
      task: classification
      params: {C: 1.0}
    resources: {cpus: 1, gpus: 0}
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from carrara.errors import InvalidArgumentError, PermissionDeniedError

if TYPE_CHECKING:
    from carrara.feature_cache.service import FeatureService

__all__ = [
    "ESTIMATORS",
    "FRAMEWORKS",
    "PARAMS",
    "CheckpointSpec",
    "DatasetSpec",
    "EarlyStoppingSpec",
    "JobSpec",
    "ModelSpec",
    "ParamRange",
    "Resources",
    "SearchSpec",
    "check_label_source",
    "with_absolute_label_source",
    "label_file_problems",
    "load_spec",
    "param_problems",
    "parse_spec",
    "validate_spec",
]

Task = Literal["classification", "regression"]

#: Frameworks this build trains, and each one's estimators by task (None: either task). Kept
#: here, not read from the trainers, so validating a spec never imports a heavy framework; a
#: test checks it equals each trainer's own ``estimators``.
FRAMEWORKS: tuple[str, ...] = ("sklearn", "xgboost", "pytorch", "tensorflow")
ESTIMATORS: dict[str, dict[str, Task | None]] = {
    "sklearn": {
        "logistic_regression": "classification",
        "ridge": "regression",
        "gradient_boosting": None,  # classifier or regressor by task
        "random_forest": None,
    },
    "xgboost": {"gradient_boosting": None},
    "pytorch": {"mlp": None},
    "tensorflow": {"mlp": None},  # Keras on TensorFlow
}

#: The ``model.params`` (and ``search.space``) names each estimator accepts, by framework.
#: sklearn: the estimator classes' ``get_params()`` (union of the classifier and regressor);
#: xgboost: the trainer's booster params plus ``n_estimators``/``n_jobs``; pytorch:
#: ``MLPParams``; tensorflow: the Keras trainer's defaults. Kept here for the same reason as
#: ESTIMATORS; a test checks it against the trainers. The worker checks again (per task).
PARAMS: dict[str, dict[str, frozenset[str]]] = {
    "sklearn": {
        "logistic_regression": frozenset(
            [
                "C",
                "class_weight",
                "dual",
                "fit_intercept",
                "intercept_scaling",
                "l1_ratio",
                "max_iter",
                "n_jobs",
                "penalty",
                "random_state",
                "solver",
                "tol",
                "verbose",
                "warm_start",
            ]
        ),
        "ridge": frozenset(
            [
                "alpha",
                "copy_X",
                "fit_intercept",
                "max_iter",
                "positive",
                "random_state",
                "solver",
                "tol",
            ]
        ),
        "gradient_boosting": frozenset(
            [
                "alpha",
                "ccp_alpha",
                "criterion",
                "init",
                "learning_rate",
                "loss",
                "max_depth",
                "max_features",
                "max_leaf_nodes",
                "min_impurity_decrease",
                "min_samples_leaf",
                "min_samples_split",
                "min_weight_fraction_leaf",
                "n_estimators",
                "n_iter_no_change",
                "random_state",
                "subsample",
                "tol",
                "validation_fraction",
                "verbose",
                "warm_start",
            ]
        ),
        "random_forest": frozenset(
            [
                "bootstrap",
                "ccp_alpha",
                "class_weight",
                "criterion",
                "max_depth",
                "max_features",
                "max_leaf_nodes",
                "max_samples",
                "min_impurity_decrease",
                "min_samples_leaf",
                "min_samples_split",
                "min_weight_fraction_leaf",
                "monotonic_cst",
                "n_estimators",
                "n_jobs",
                "oob_score",
                "random_state",
                "verbose",
                "warm_start",
            ]
        ),
    },
    "xgboost": {
        "gradient_boosting": frozenset(
            [
                "max_depth",
                "max_leaves",
                "max_bin",
                "grow_policy",
                "learning_rate",
                "tree_method",
                "gamma",
                "min_child_weight",
                "max_delta_step",
                "subsample",
                "sampling_method",
                "colsample_bytree",
                "colsample_bylevel",
                "colsample_bynode",
                "reg_alpha",
                "reg_lambda",
                "scale_pos_weight",
                "base_score",
                "num_parallel_tree",
                "max_cat_to_onehot",
                "n_estimators",
                "n_jobs",
            ]
        )
    },
    "pytorch": {
        "mlp": frozenset(
            [
                "epochs",
                "batch_size",
                "lr",
                "hidden",
                "weight_decay",
                "optimizer",
                "momentum",
                "threads",
                "standardize_target",
            ]
        )
    },
    "tensorflow": {"mlp": frozenset(("epochs", "batch_size", "lr", "hidden"))},
}
#: Params that must be whole numbers >= the bound (when set to a number; ``None`` passes,
#: e.g. sklearn's unlimited ``max_depth``), and params that must be numbers > 0.
_POSITIVE_INTS: dict[str, int] = {
    "epochs": 1,
    "n_estimators": 1,
    "max_depth": 1,
    "batch_size": 1,
    "max_iter": 1,
    "threads": 1,
}
_POSITIVE_FLOATS: tuple[str, ...] = ("lr", "learning_rate", "C")

_MODEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")


class DatasetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    features: list[str]
    label_source: str
    label_column: str
    entity_column: str
    start: datetime | None = None
    end: datetime | None = None
    timestamp_column: str = "event_timestamp"
    validation_fraction: float = 0.2


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    framework: str = "sklearn"
    estimator: str
    task: Task = "classification"
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cpus: int = 1
    #: Whole GPUs per node (an integer, admitted all at once — a gang — or not at all), or a
    #: share of one GPU (a fraction in (0, 1), in thousandths: ``0.25``).
    gpus: float = 0
    #: One MIG instance of this profile (``1g.10gb``) instead of ``gpus``.
    mig: str = ""
    #: > 1: torchrun across that many nodes, each with ``gpus`` and ``processes_per_node``.
    nodes: int = 1
    processes_per_node: int = 1  # > 1: torchrun data-parallel ranks (PyTorch only)

    @property
    def whole_gpus(self) -> int:
        """Whole GPUs per node (0 for a share of one GPU or a MIG instance)."""
        return int(self.gpus) if self.gpus >= 1 else 0

    @property
    def gpu_share_milli(self) -> int:
        """A fractional request in thousandths of a GPU (0 when whole GPUs or none)."""
        return round(self.gpus * 1000) if 0 < self.gpus < 1 else 0


class ParamRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One hyperparameter's search range: ``float``/``int`` between ``low`` and ``high``
    (``log`` for a log scale) or ``categorical`` over ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] = msgspec.field(default_factory=list)


class SearchSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An Optuna study over ``model.params``: each trial overrides the ranged ones."""

    space: dict[str, ParamRange]
    n_trials: int = 10
    metric: str = ""  # validation metric to optimize; default auc (classif.) / rmse (regr.)
    direction: Literal["minimize", "maximize", "auto"] = "auto"
    pruner: Literal["median", "none"] = "median"
    timeout_s: float | None = None


class EarlyStoppingSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta: float = 0.0


class CheckpointSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    every_epochs: int = 1  # 0 disables checkpoints
    keep: int = 2  # newest checkpoints kept in the artifact store


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model_name: str
    dataset: DatasetSpec
    model: ModelSpec
    resources: Resources = msgspec.field(default_factory=Resources)
    search: SearchSpec | None = None
    early_stopping: EarlyStoppingSpec | None = None
    checkpoint: CheckpointSpec = msgspec.field(default_factory=CheckpointSpec)
    seed: int = 0

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def parse_spec(data: bytes | str, *, format: Literal["yaml", "json"] = "yaml") -> JobSpec:
    """Decode a spec from YAML or JSON text (structure and types are checked here)."""
    import yaml

    try:
        if format == "json":
            return msgspec.json.decode(data, type=JobSpec)
        # Through builtins so quoted timestamps ("2026-01-01T00:00:00Z") parse as datetimes.
        return msgspec.convert(yaml.safe_load(data), JobSpec)
    except msgspec.ValidationError as exc:
        raise InvalidArgumentError(f"invalid training job spec: {exc}") from exc
    except (msgspec.DecodeError, yaml.YAMLError) as exc:
        raise InvalidArgumentError(f"training job spec is not valid {format}: {exc}") from exc


def load_spec(path: str | Path) -> JobSpec:
    """Read a spec file; ``.json`` is JSON, anything else YAML. A relative ``label_source``
    path is made absolute against the spec file's folder (not the current one), so a spec
    next to its labels submits from anywhere."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"training job spec {p} does not exist")
    spec = parse_spec(p.read_bytes(), format="json" if p.suffix == ".json" else "yaml")
    # Relative to the spec file, not the current folder.
    return with_absolute_label_source(spec, p.resolve().parent)


def with_absolute_label_source(spec: JobSpec, base: str | Path) -> JobSpec:
    """``spec`` with a relative ``label_source`` path made absolute against ``base``: what
    the data-roots check and a worker running in another folder (or process) need. The SDK
    submits with ``base`` = the current folder, ``load_spec`` with the spec file's folder."""
    source = spec.dataset.label_source
    if not source or _SCHEME.match(source) or os.path.isabs(source):
        return spec
    absolute = os.path.normpath(os.path.join(os.path.abspath(base), source))
    dataset = msgspec.structs.replace(spec.dataset, label_source=absolute)
    return msgspec.structs.replace(spec, dataset=dataset)


#: URL schemes a label source may use: the workers read local files only.
LABEL_SOURCE_SCHEMES = ("file",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def check_label_source(source: str, roots: Sequence[str]) -> Path:
    """The file a label source names, once it is allowed: an absolute path or ``file://``
    URL that, with symlinks and ``..`` resolved, lies under one of ``roots`` (the settings'
    ``data_roots``). InvalidArgumentError for other schemes and relative paths,
    PermissionDeniedError for a path outside the roots; says nothing of whether it exists."""
    path_text = source
    scheme = _SCHEME.match(source)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name not in LABEL_SOURCE_SCHEMES:
            raise InvalidArgumentError(
                f"label_source {source!r}: the {name}:// scheme is not supported; use a path "
                "or a file:// URL under the platform's data roots"
            )
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgumentError(
                f"label_source {source!r}: a file:// URL must name a local file (no host)"
            )
        path_text = unquote(parts.path)
    if "\0" in path_text or not os.path.isabs(path_text):
        raise InvalidArgumentError(
            f"label_source {source!r} must be an absolute path (or file:// URL) under the "
            f"platform's data roots: {', '.join(roots)}"
        )
    resolved = Path(os.path.realpath(path_text))
    for root in roots:
        base = Path(os.path.realpath(root))
        if resolved == base or base in resolved.parents:
            return resolved
    raise PermissionDeniedError(
        f"label_source {source!r} is outside the folders training jobs may read "
        f"({', '.join(roots)}); put the labels there or add their folder to the "
        "data_roots setting"
    )


def validate_spec(spec: JobSpec, *, features: FeatureService | None = None) -> None:
    """Check a spec at submit time; raises :class:`InvalidArgumentError` listing every problem.

    With ``features`` the feature references are checked against the catalog.
    """
    problems: list[str] = []
    if not _MODEL_NAME.match(spec.model_name):
        problems.append(
            f"model_name {spec.model_name!r} must start with a letter and use letters, digits, "
            "'_', '.', '-' (at most 128)"
        )
    m = spec.model
    if m.framework not in ESTIMATORS:
        problems.append(f"unknown framework {m.framework!r}; known: {', '.join(FRAMEWORKS)}")
    else:
        known = ESTIMATORS[m.framework]
        if m.estimator not in known:
            problems.append(
                f"unknown estimator {m.estimator!r} for framework {m.framework!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        else:
            only = known[m.estimator]
            if only is not None and only != m.task:
                problems.append(
                    f"estimator {m.estimator!r} does {only}, but the task is {m.task!r}"
                )
            problems.extend(param_problems(spec))
    d = spec.dataset
    if not d.features:
        problems.append("dataset.features is empty; name at least one 'group:feature'")
    bad_refs = [f for f in d.features if f.count(":") != 1 or "" in f.split(":") or "*" in f]
    if bad_refs:
        problems.append(f"dataset.features {bad_refs} are not 'group:feature'")
    if len(set(d.features)) != len(d.features):
        problems.append("dataset.features has duplicates")
    if d.start is not None and d.end is not None and d.start >= d.end:
        problems.append(f"empty time range: start {d.start.isoformat()} >= end {d.end.isoformat()}")
    for name, value in (("start", d.start), ("end", d.end)):
        if value is not None and value.tzinfo is None:
            problems.append(f"dataset.{name} needs a time zone (e.g. '...Z')")
    if not 0.0 < d.validation_fraction < 1.0:
        problems.append(
            f"dataset.validation_fraction must be in (0, 1), got {d.validation_fraction}"
        )
    if not d.label_column or not d.entity_column:
        problems.append("dataset.label_column and dataset.entity_column are required")
    problems.extend(resource_problems(spec.resources, spec.model.framework))
    problems.extend(search_problems(spec))
    if features is not None and not bad_refs:
        from carrara.errors import NotFoundError

        for ref in d.features:
            group, _, feature = ref.partition(":")
            try:
                g = features.group(group)
            except NotFoundError:
                problems.append(f"unknown feature group {group!r} (in {ref!r})")
                continue
            if feature not in g.definition.feature_names:
                problems.append(
                    f"unknown feature {ref!r}; group {group!r} v{g.version} has: "
                    f"{', '.join(g.definition.feature_names)}"
                )
    if problems:
        raise InvalidArgumentError("invalid training job spec: " + "; ".join(problems))


def param_problems(spec: JobSpec) -> list[str]:
    """Unknown ``model.params``/``search.space`` names for the spec's estimator (with a
    "did you mean" when one is close) and out-of-range values of the common ones (epochs,
    n_estimators, max_depth, batch_size > 0; learning rates > 0)."""
    import difflib

    m = spec.model
    known = PARAMS.get(m.framework, {}).get(m.estimator)
    if known is None:
        return []
    problems: list[str] = []
    named = [("model.params", name) for name in m.params]
    if spec.search is not None:
        named += [("search.space", name) for name in spec.search.space]
    for where, name in named:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"{where}: unknown param {name!r} for {m.framework}/{m.estimator}; {hint}"
            f"known: {', '.join(sorted(known))}"
        )
    values = [(f"model.params.{name}", name, v) for name, v in m.params.items()]
    if spec.search is not None:
        for name, r in spec.search.space.items():
            where = f"search.space.{name}"
            if r.type == "categorical":
                values += [(f"{where} choice", name, c) for c in r.choices]
            elif r.low is not None:
                values.append((f"{where}.low", name, int(r.low) if r.type == "int" else r.low))
    for where, name, value in values:
        if value is None or name not in known:
            continue
        problem = _value_problem(name, value, m.framework)
        if problem is not None:
            problems.append(f"{where} must be {problem}, got {value!r}")
    return problems


def _value_problem(name: str, value: Any, framework: str) -> str | None:
    """What ``value`` must be for param ``name`` when it is out of range, else None."""
    low = _POSITIVE_INTS.get(name)
    if name == "max_depth" and framework == "xgboost":
        low = 0  # 0: no depth limit (lossguide)
    if low is not None:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < low:
            return f"a whole number >= {low}"
    elif name in _POSITIVE_FLOATS:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 0 < value < float("inf"):
            return "a number > 0"
    return None


def label_file_problems(path: Path, spec: JobSpec) -> list[str]:
    """Whether the label file at ``path`` (a local, already allowed path) exists, is
    readable, and has the spec's entity, timestamp and label columns. Reads only the
    Parquet schema or the CSV header line, never the data."""
    import csv

    d = spec.dataset
    if not path.is_file():
        return [f"label_source {d.label_source!r}: no such file {str(path)!r}"]
    if not os.access(path, os.R_OK):
        return [f"label_source {d.label_source!r}: file {str(path)!r} is not readable"]
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                columns = next(csv.reader(f), [])
        else:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]

            columns = list(pq.read_schema(path).names)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [f"label_source {d.label_source!r}: cannot read its columns: {exc}"]
    except Exception as exc:  # pyarrow's ArrowInvalid: not a Parquet file
        return [f"label_source {d.label_source!r} is not a readable Parquet file: {exc}"]
    missing = [
        f"{what} {name!r}"
        for what, name in (
            ("entity_column", d.entity_column),
            ("timestamp_column", d.timestamp_column),
            ("label_column", d.label_column),
        )
        if name not in columns
    ]
    if missing:
        return [
            f"label_source {d.label_source!r} lacks the column(s) {', '.join(missing)}; "
            f"it has: {', '.join(map(str, columns))}"
        ]
    return []


def resource_problems(
    r: Resources, framework: str, *, max_gpus_per_node: int | None = None
) -> list[str]:
    """What is impossible about ``r`` (the scheduler's rules, :mod:`.scheduler`). GPUs are
    checked against ``max_gpus_per_node`` only when it is given (the queue passes the largest
    known node inventory at submit)."""
    from .scheduler import MAX_CPUS, MIG_PROFILE, inventory_problem

    problems: list[str] = []
    if r.cpus < 1 or r.gpus < 0 or r.nodes < 1 or r.processes_per_node < 1:
        problems.append(
            f"impossible resources: cpus={r.cpus} (>= 1), gpus={r.gpus:g} (>= 0), "
            f"nodes={r.nodes} (>= 1), processes_per_node={r.processes_per_node} (>= 1)"
        )
        return problems
    if r.cpus > MAX_CPUS:
        problems.append(f"impossible resources: cpus={r.cpus}; at most {MAX_CPUS} per job")
    fractional = 0 < r.gpus < 1
    if fractional and abs(r.gpus * 1000 - round(r.gpus * 1000)) > 1e-6:
        problems.append(
            f"resources.gpus={r.gpus:g}: a share of a GPU is given in thousandths (e.g. 0.25)"
        )
    if r.gpus > 1 and r.gpus != int(r.gpus):
        problems.append(
            f"resources.gpus={r.gpus:g}: more than one GPU must be a whole number; a fraction "
            "is only for a share of one GPU (0 < gpus < 1)"
        )
    if r.mig:
        if not MIG_PROFILE.match(r.mig):
            problems.append(f"resources.mig={r.mig!r} is not a MIG profile (e.g. 1g.10gb)")
        if r.gpus:
            problems.append(
                f"resources.mig={r.mig!r} and gpus={r.gpus:g}: ask for one MIG instance or "
                "for GPUs, not both"
            )
    if (fractional or r.mig) and (r.nodes > 1 or r.processes_per_node > 1):
        problems.append(
            "a share of a GPU or a MIG instance runs one process on one node; use nodes: 1 "
            "and processes_per_node: 1 (multi-rank jobs take whole GPUs)"
        )
    if framework != "pytorch":
        if r.nodes > 1:
            problems.append(
                f"resources.nodes={r.nodes}: only framework 'pytorch' trains across nodes "
                "(torchrun); use nodes: 1"
            )
        if r.processes_per_node > 1:
            problems.append(
                f"resources.processes_per_node={r.processes_per_node}: only framework "
                "'pytorch' runs several ranks per node; use processes_per_node: 1"
            )
    if r.processes_per_node > 1 and r.gpus >= 1 and r.processes_per_node > r.gpus:
        problems.append(
            f"resources.processes_per_node={r.processes_per_node} exceeds gpus={r.gpus:g}: "
            "GPU ranks need one GPU each"
        )
    if max_gpus_per_node is not None:
        problem = inventory_problem(r.gpus, max_gpus_per_node)
        if problem is not None and not r.mig:
            problems.append(problem)
    return problems


def search_problems(spec: JobSpec) -> list[str]:
    """What is wrong with the search, early-stopping and checkpoint sections."""
    problems: list[str] = []
    task_metrics = _TASK_METRICS.get(spec.model.task, ())
    s = spec.search
    if s is not None:
        if not s.space:
            problems.append("search.space is empty; name at least one model param to search")
        for name, r in s.space.items():
            problems.extend(_range_problems(name, r))
        if s.n_trials < 1:
            problems.append(f"search.n_trials must be >= 1, got {s.n_trials}")
        if s.timeout_s is not None and s.timeout_s <= 0:
            problems.append(f"search.timeout_s must be > 0 (or left out), got {s.timeout_s:g}")
        if s.metric and s.metric not in task_metrics:
            problems.append(
                f"search.metric {s.metric!r} is not a {spec.model.task} metric; "
                f"use one of {', '.join(task_metrics)}"
            )
    e = spec.early_stopping
    if e is not None:
        if e.patience < 1:
            problems.append(f"early_stopping.patience must be >= 1, got {e.patience}")
        if e.min_delta < 0:
            problems.append(f"early_stopping.min_delta must be >= 0, got {e.min_delta:g}")
        known = (*_EPOCH_METRICS, *task_metrics)
        if e.metric not in known:
            problems.append(
                f"early_stopping.metric {e.metric!r} is not reported for "
                f"{spec.model.task}; use one of {', '.join(known)}"
            )
    c = spec.checkpoint
    if c.every_epochs < 0:
        problems.append(
            f"checkpoint.every_epochs must be >= 0 (0 disables checkpoints), got {c.every_epochs}"
        )
    if c.keep < 1:
        problems.append(f"checkpoint.keep must be >= 1, got {c.keep}")
    return problems


# -- helpers of search_problems ------------------------------------------------------------

#: Validation metrics per task (what the trainers' ``evaluate_scores`` reports).
_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("auc", "accuracy", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}
#: Per-epoch metrics epoch-based trainers report besides the task metrics.
_EPOCH_METRICS: tuple[str, ...] = ("val_loss", "loss")
_CATEGORICAL_TYPES = (bool, int, float, str, type(None))


def _range_problems(name: str, r: ParamRange) -> list[str]:
    where = f"search.space.{name}"
    if r.type not in ("float", "int", "categorical"):
        return [f"{where}: unknown type {r.type!r}; use float, int or categorical"]
    if r.type == "categorical":
        if not r.choices:
            return [f"{where}: categorical needs a non-empty 'choices' list"]
        bad = [c for c in r.choices if not isinstance(c, _CATEGORICAL_TYPES)]
        if bad:
            return [f"{where}: choices must be numbers, strings, booleans or null; got {bad}"]
        return []
    if r.choices:
        return [f"{where}: 'choices' is for type categorical; {r.type} takes low/high"]
    if r.low is None or r.high is None:
        return [f"{where}: {r.type} needs both 'low' and 'high'"]
    problems: list[str] = []
    if r.low >= r.high:
        problems.append(f"{where}: low ({r.low:g}) must be < high ({r.high:g})")
    if r.log and r.low <= 0:
        problems.append(f"{where}: a log scale needs low > 0, got {r.low:g}")
    if r.type == "int" and (r.low != int(r.low) or r.high != int(r.high)):
        problems.append(f"{where}: int bounds must be whole numbers, got {r.low:g}..{r.high:g}")
    return problems
