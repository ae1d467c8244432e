"""Shared data for the framework trainer tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from carrara.training.frameworks import TrainData


def make_data(
    task: str,
    k: int = 0,
    *,
    n: int = 1500,
    seed: int = 0,
    noise: float = 0.3,
    scale: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    target_scale: float = 1.0,
    class_names: Sequence[Any] | None = None,
) -> TrainData:
    """Separable-ish data over 5 features, 80 % train / 20 % validation by row order.

    ``scale``/``offset`` distort the raw features (the model must standardize them itself);
    labels depend on the undistorted values. ``target_scale`` multiplies the regression
    weights and intercept."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    sc = np.asarray(scale if scale is not None else [1.0] * 5)
    off = np.asarray(offset if offset is not None else [0.0] * 5)
    x = (z * sc + off).astype(np.float32)
    if scale is None and offset is None:
        z = x.astype(np.float64)  # labels from exactly what the model sees
    eps = rng.normal(size=n) * noise
    if task == "regression":
        y: Any = (z @ np.array([1.0, -2.0, 3.0, 0.5, 0.0]) + 50.0) * target_scale + eps
    elif k == 2:
        y = (z[:, 0] - z[:, 1] + eps > 0).astype(np.int64)
    else:
        y = np.digitize(z[:, 0] + 0.5 * z[:, 2] + eps, [-0.6, 0.6]).astype(np.int64)
    cut = int(n * 0.8)
    return TrainData(
        x_train=x[:cut],
        y_train=y[:cut],
        x_val=x[cut:],
        y_val=y[cut:],
        feature_names=[f"f{i}" for i in range(5)],
        task=task,  # type: ignore[arg-type]
        classes=list(class_names) if class_names is not None else list(range(k)),
    )
