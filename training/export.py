# mypy: disable-error-code="import-untyped"
"""ONNX export of fitted scikit-learn models (skl2onnx) in the shape the gateway serves.

The exported model has one float32 input ``features: [batch, d]`` and its FIRST output is
``score`` (float32): for a binary classifier ``[batch, 1]``, the probability of the positive
class (``classes_[1]``); for a multi-class one ``[batch, k]``, the class probabilities in
``classes_`` order; for a regressor ``[batch, 1]``, the prediction. skl2onnx's own outputs
(``label``, ``probabilities``) follow. :func:`check_parity` compares ONNX Runtime with sklearn.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import FailedPreconditionError

from .trainers import predict_scores

__all__ = ["PARITY_ATOL", "PARITY_RTOL", "Parity", "check_parity", "export_onnx"]

#: Largest absolute difference allowed between ONNX Runtime and sklearn scores (probabilities
#: or regression outputs) on the validation rows. ONNX runs in float32, sklearn in float64.
PARITY_ATOL = 1e-4
#: Relative part of the tolerance for regression outputs (0 for classifier probabilities).
PARITY_RTOL = 1e-5
INPUT_NAME = "features"
OUTPUT_NAME = "score"


def _final_estimator(model: Any) -> Any:
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


def export_onnx(model: Any, n_features: int, task: str, *, target_opset: int = 17) -> bytes:
    """Convert a fitted estimator; returns the serialized ONNX model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    final = _final_estimator(model)
    options = {type(final): {"zipmap": False}} if task == "classification" else None
    proto = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options=options,
        target_opset=target_opset,
    )
    graph = proto.graph
    outputs = list(graph.output)
    if task == "classification":
        prob = next(o for o in outputs if o.type.tensor_type.elem_type == TensorProto.FLOAT)
        k = len(final.classes_)
        if k == 2:
            index = numpy_helper.from_array(np.array([1], np.int64), name="score_positive_index")
            graph.initializer.append(index)
            graph.node.append(
                helper.make_node(
                    "Gather", [prob.name, index.name], [OUTPUT_NAME], axis=1, name="score_gather"
                )
            )
            width = 1
        else:
            graph.node.append(
                helper.make_node("Identity", [prob.name], [OUTPUT_NAME], name="score_identity")
            )
            width = k
    else:
        (pred,) = outputs
        graph.node.append(
            helper.make_node("Reshape", [pred.name, "score_shape"], [OUTPUT_NAME], name="score_2d")
        )
        graph.initializer.append(
            numpy_helper.from_array(np.array([-1, 1], np.int64), name="score_shape")
        )
        width = 1
    score = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, width])
    del graph.output[:]
    graph.output.extend([score, *outputs])
    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    return data


class Parity(msgspec.Struct, frozen=True, kw_only=True):
    max_abs_diff: float
    atol: float
    rtol: float
    rows: int
    ok: bool


def onnx_scores(onnx_model: bytes, x: NDArray[np.float32]) -> NDArray[np.float32]:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    return np.asarray(out, np.float32)


def check_parity(
    model: Any,
    onnx_model: bytes,
    x: NDArray[np.float32],
    task: str,
    *,
    atol: float = PARITY_ATOL,
    rtol: float | None = None,
    raise_on_failure: bool = True,
) -> Parity:
    """ONNX Runtime scores vs sklearn's on ``x`` (float32 for both): every row must satisfy
    ``|onnx - sklearn| <= atol + rtol * |sklearn|``. ``rtol`` defaults to 0 for classifiers
    (probabilities: absolute only) and :data:`PARITY_RTOL` for regressors (float32 outputs of
    large targets carry relative rounding)."""
    if rtol is None:
        rtol = 0.0 if task == "classification" else PARITY_RTOL
    x = np.ascontiguousarray(x, np.float32)
    if len(x) == 0:
        return Parity(max_abs_diff=0.0, atol=atol, rtol=rtol, rows=0, ok=True)
    got = onnx_scores(onnx_model, x).astype(np.float64)
    want = predict_scores(model, x, task)
    if got.shape == want.shape:
        diff = np.abs(got - want)
        max_diff = float(np.max(diff))
        ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
    else:
        max_diff, ok = float("inf"), False
    parity = Parity(max_abs_diff=max_diff, atol=atol, rtol=rtol, rows=len(x), ok=ok)
    if raise_on_failure and not parity.ok:
        raise FailedPreconditionError(
            f"ONNX export does not match the sklearn model: max |diff| {max_diff:.3g} exceeds "
            f"atol {atol:g} + rtol {rtol:g} * |value| on {len(x)} rows "
            f"(shapes {got.shape} vs {want.shape})"
        )
    return parity
