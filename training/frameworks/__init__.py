"""Framework trainers behind one contract (:mod:`.base`). Heavy frameworks are imported only
when their trainer is asked for: :func:`get_trainer` raises ``FailedPreconditionError`` naming
the extra to install when one is missing."""

from __future__ import annotations

import importlib

from carrara.errors import FailedPreconditionError, InvalidArgumentError

from .base import (
    Checkpoint,
    EarlyStopper,
    FitResult,
    LocalContext,
    Preempted,
    Pruned,
    TrainContext,
    TrainData,
    Trainer,
    evaluate_scores,
)

__all__ = [
    "TRAINER_MODULES",
    "Checkpoint",
    "EarlyStopper",
    "FitResult",
    "LocalContext",
    "Preempted",
    "Pruned",
    "TrainContext",
    "TrainData",
    "Trainer",
    "evaluate_scores",
    "get_trainer",
]

#: framework name -> (module under this package, the pip distribution it needs)
TRAINER_MODULES: dict[str, tuple[str, str]] = {
    "sklearn": ("sklearn_trainer", "scikit-learn"),
    "xgboost": ("xgboost_trainer", "xgboost"),
    "pytorch": ("torch_trainer", "torch"),
    "tensorflow": ("keras_trainer", "tensorflow-cpu"),
}


def get_trainer(framework: str) -> Trainer:
    """The trainer for ``framework`` (one of :data:`TRAINER_MODULES`)."""
    if framework not in TRAINER_MODULES:
        raise InvalidArgumentError(
            f"unknown framework {framework!r}; known: {', '.join(TRAINER_MODULES)}"
        )
    module_name, dist = TRAINER_MODULES[framework]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise FailedPreconditionError(
            f"the {framework} trainer needs {dist}: pip install 'carrara[training]' ({exc})"
        ) from exc
    trainer: Trainer = module.TRAINER
    return trainer
