"""The model the chaos cases serve, and the facts to check answers against.

``m``: ``y = 2 x + 1 y + BIAS`` on group ``u`` (version 1, features ``x``, ``y``); entity ``e{i}``
is stored as ``x = i, y = i % 3``. A degraded answer (store down or hung, entity unknown)
uses the defaults ``x = -5, y = 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carrara.core import encode_feature_vector
from carrara.gateway.onnx_models import write_linear_model

__all__ = [
    "DEFAULT_VALUE",
    "MODEL",
    "NAMESPACE",
    "feature_rows",
    "gateway_config",
    "seed_redis",
    "value",
    "write_model",
]

MODEL = "m"
NAMESPACE = "ns"
W = np.array([[2.0], [1.0]], np.float32)
BIAS = 1.0


def value(i: int, weights: np.ndarray = W, bias: float = BIAS) -> float:
    """The model's answer for entity ``e{i}`` read from the store (float32 arithmetic)."""
    x = np.array([[float(i), float(i % 3)]], np.float32)
    return float((x @ weights + np.float32(bias))[0, 0])


DEFAULT_VALUE = float((np.array([[-5.0, 0.0]], np.float32) @ W + np.float32(BIAS))[0, 0])


def feature_rows(n: int, start: int = 0) -> dict[str, bytes]:
    return {
        f"{NAMESPACE}:u:1:e{i}": encode_feature_vector(f"e{i}", "u", 1, [float(i), float(i % 3)])
        for i in range(start, start + n)
    }


def seed_redis(port: int, n: int) -> None:
    import redis

    client = redis.Redis(port=port)
    try:
        rows = feature_rows(n)
        items = list(rows.items())
        for k in range(0, len(items), 1000):
            client.mset(dict(items[k : k + 1000]))
    finally:
        client.close()


def write_model(directory: Path, weights: np.ndarray = W, bias: float = BIAS) -> Path:
    return write_linear_model(directory / "m.onnx", weights, bias)


def gateway_config(directory: Path, **settings: Any) -> dict[str, Any]:
    """A ``carrara serve`` config serving ``m`` v1 from ``directory/m.onnx`` (written here),
    plus ``settings`` (online store, event log, limits)."""
    model = write_model(directory)
    return {
        **settings,
        "models": [
            {
                "name": MODEL,
                "policy": {"variants": [{"name": "v1", "weight_bp": 10_000}]},
                "variants": [
                    {
                        "name": "v1",
                        "version": 1,
                        "artifact": str(model),
                        "features": {
                            "groups": [{"name": "u", "version": 1, "features": ["x", "y"]}],
                            "features": [
                                {"group": "u", "feature": "x", "default": -5.0},
                                {"group": "u", "feature": "y", "default": 0.0},
                            ],
                        },
                    }
                ],
            }
        ],
    }
