"""Small ONNX models built from weights with the ``onnx`` helper API (no framework needed).

Used by tests, benchmarks and the demo; trained models come from ``carrara.training``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["write_linear_model"]


def write_linear_model(
    path: str | Path,
    weights: ArrayLike,
    bias: ArrayLike = 0.0,
    *,
    sigmoid: bool = False,
    input_name: str = "features",
    output_name: str = "score",
) -> Path:
    """Write ``y = x @ W + b`` (optionally ``sigmoid``) for float32 ``x: [batch, d]``.

    ``weights`` is ``[d]`` (one output) or ``[d, k]``. Returns the path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 1:
        w = w[:, None]
    b = np.broadcast_to(np.asarray(bias, dtype=np.float32), (w.shape[1],)).copy()
    d, k = w.shape
    nodes = [
        helper.make_node("MatMul", [input_name, "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits" if sigmoid else output_name]),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logits"], [output_name]))
    graph = helper.make_graph(
        nodes,
        "carrara_linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", k])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
