"""ONNX parity: the exported serving artifact must score like the native model it came from.

:func:`check_parity` runs the ONNX model in ONNX Runtime and compares its ``score`` output with
:meth:`Trainer.predict_scores` row by row, within the trainer's own stated tolerance
(``parity_atol`` + ``parity_rtol`` * |native|). :func:`attach_score_output` rewires a converter's
outputs (skl2onnx, onnxmltools) into the serving shape of :mod:`.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import FailedPreconditionError

if TYPE_CHECKING:
    import onnx

    from .base import Task, Trainer

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "Parity",
    "attach_score_output",
    "check_parity",
    "onnx_scores",
]

INPUT_NAME = "features"
OUTPUT_NAME = "score"
#: ONNX default-domain opset our exporters target (ONNX Runtime 1.2x supports it fully).
DEFAULT_OPSET = 17


class Parity(msgspec.Struct, frozen=True, kw_only=True):
    max_abs_diff: float
    atol: float
    rtol: float
    rows: int
    ok: bool


def onnx_scores(onnx_model: bytes, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """The ``score`` output of ``onnx_model`` on ``x`` through ONNX Runtime (CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    return np.asarray(out, np.float32)


def check_parity(
    trainer: Trainer,
    model: Any,
    onnx_bytes: bytes,
    x: NDArray[np.float32],
    task: Task,
    *,
    raise_on_failure: bool = True,
) -> Parity:
    """ONNX Runtime's scores vs ``trainer.predict_scores(model, x, task)``: every value must
    satisfy ``|onnx - native| <= trainer.parity_atol + trainer.parity_rtol * |native|``.
    Raises :class:`FailedPreconditionError` on a mismatch unless ``raise_on_failure`` is off."""
    atol, rtol = float(trainer.parity_atol), float(trainer.parity_rtol)
    x = np.ascontiguousarray(x, np.float32)
    if len(x) == 0:
        return Parity(max_abs_diff=0.0, atol=atol, rtol=rtol, rows=0, ok=True)
    got = onnx_scores(onnx_bytes, x).astype(np.float64)
    want = np.asarray(trainer.predict_scores(model, x, task), np.float64)
    if got.shape == want.shape:
        diff = np.abs(got - want)
        max_diff = float(np.max(diff))
        ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
    else:
        max_diff, ok = float("inf"), False
    parity = Parity(max_abs_diff=max_diff, atol=atol, rtol=rtol, rows=len(x), ok=ok)
    if raise_on_failure and not parity.ok:
        raise FailedPreconditionError(
            f"the ONNX export does not match the {trainer.framework} model: max |diff| "
            f"{max_diff:.3g} exceeds atol {atol:g} + rtol {rtol:g} * |value| on {len(x)} rows "
            f"(shapes {got.shape} vs {want.shape}); the model cannot be served as trained"
        )
    return parity


def attach_score_output(
    proto: onnx.ModelProto, source: str, task: Task, n_classes: int
) -> onnx.ModelProto:
    """Make ``score`` the first output of ``proto`` (in place; also returned), computed from
    the converter's output ``source``: class probabilities ``[batch, k]`` for classification
    (binary keeps column 1 only) or the prediction for regression (reshaped to ``[batch, 1]``).
    The converter's own outputs follow ``score``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    outputs = list(graph.output)
    if task == "classification" and n_classes == 2:
        index = numpy_helper.from_array(np.array([1], np.int64), name="score_positive_index")
        graph.initializer.append(index)
        graph.node.append(
            helper.make_node(
                "Gather", [source, index.name], [OUTPUT_NAME], axis=1, name="score_gather"
            )
        )
        width = 1
    elif task == "classification":
        graph.node.append(
            helper.make_node("Identity", [source], [OUTPUT_NAME], name="score_identity")
        )
        width = n_classes
    else:
        shape = numpy_helper.from_array(np.array([-1, 1], np.int64), name="score_shape")
        graph.initializer.append(shape)
        graph.node.append(
            helper.make_node("Reshape", [source, shape.name], [OUTPUT_NAME], name="score_2d")
        )
        width = 1
    # Converters for ML-domain models may import only "ai.onnx.ml"; Gather/Reshape/Identity
    # need the default domain.
    if not any(op.domain in ("", "ai.onnx") for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("", DEFAULT_OPSET))
    score = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, width])
    del graph.output[:]
    graph.output.extend([score, *outputs])
    onnx.checker.check_model(proto)
    return proto
