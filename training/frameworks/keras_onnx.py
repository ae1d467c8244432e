# mypy: disable-error-code="import-untyped"
"""A small ONNX exporter for the Keras models :mod:`.keras_trainer` builds.

tf2onnx cannot be installed next to current protobuf, and the trainer builds only plain
feed-forward Sequential models, so this walks the layers and writes the equivalent ONNX graph
with :mod:`onnx.helper`, reading the weights from the Keras model:

- ``Normalization`` (mean/variance, not inverted): ``(x - mean) / max(sqrt(var), eps)``, the
  same float32 arithmetic Keras does;
- ``Dense``: ``MatMul`` + ``Add`` (bias), then its activation;
- ``Activation`` layers and Dense activations: ``linear``, ``relu``, ``sigmoid``, ``softmax``;
- ``Rescaling``: ``x * scale + offset`` (the regression head's de-standardization).

Any other layer or activation is refused with :class:`FailedPreconditionError` rather than
exported wrongly. Input ``features: [batch, d]`` float32; output ``score: [batch, units]``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from carrara.errors import FailedPreconditionError

from .parity import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME

__all__ = ["SUPPORTED_ACTIVATIONS", "SUPPORTED_LAYERS", "export_sequential", "tf_numpy_compat"]

SUPPORTED_LAYERS = ("InputLayer", "Normalization", "Dense", "Activation", "Rescaling")
SUPPORTED_ACTIVATIONS = ("linear", "relu", "sigmoid", "softmax")


@contextlib.contextmanager
def tf_numpy_compat() -> Iterator[None]:
    """Silence one known, harmless warning: TensorFlow's variables implement ``__array__``
    without numpy 2's ``copy`` keyword, so ``np.array(variable)`` (Keras' get_weights and
    saving) warns and falls back to a copy, which is what Keras wants anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"__array__ implementation doesn't accept a copy keyword",
            category=DeprecationWarning,
        )
        yield


def _activation_name(fn: Any) -> str:
    import keras

    name = keras.activations.serialize(fn)
    if isinstance(name, dict):  # a configured activation object
        name = name.get("config", {}).get("name", name.get("class_name", "?"))
    return str(name)


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.current = INPUT_NAME
        self.count = 0

    def const(self, name: str, value: Any) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> None:
        from onnx import helper

        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(
            helper.make_node(op_type, [self.current, *inputs], [out], name=out, **attrs)
        )
        self.current = out

    def activation(self, name: str, layer: str) -> None:
        if name == "linear":
            return
        if name == "relu":
            self.op("Relu")
        elif name == "sigmoid":
            self.op("Sigmoid")
        elif name == "softmax":
            self.op("Softmax", axis=-1)
        else:
            raise FailedPreconditionError(
                f"layer {layer!r} uses activation {name!r}, which the Keras ONNX exporter does "
                f"not support; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )


def export_sequential(model: Any, n_features: int, *, opset: int = DEFAULT_OPSET) -> bytes:
    """The serialized ONNX model of a Keras Sequential built from the supported layers."""
    with tf_numpy_compat():
        return _export(model, n_features, opset)


def _export(model: Any, n_features: int, opset: int) -> bytes:
    import keras
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    width = n_features
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind == "Normalization":
            if getattr(layer, "invert", False) or tuple(np.atleast_1d(layer.axis)) != (-1,):
                raise FailedPreconditionError(
                    f"layer {layer.name!r}: only a non-inverted Normalization over the last "
                    "axis is exportable"
                )
            mean = keras.ops.convert_to_numpy(layer.mean).astype(np.float32).reshape(1, -1)
            var = keras.ops.convert_to_numpy(layer.variance).astype(np.float32).reshape(1, -1)
            denom = np.maximum(np.sqrt(var), np.float32(keras.backend.epsilon()))
            g.op("Sub", g.const(f"{layer.name}_mean", mean))
            g.op("Div", g.const(f"{layer.name}_denom", denom.astype(np.float32)))
        elif kind == "Dense":
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            g.op("MatMul", g.const(f"{layer.name}_kernel", kernel))
            if layer.use_bias:
                g.op("Add", g.const(f"{layer.name}_bias", keras.ops.convert_to_numpy(layer.bias)))
            g.activation(_activation_name(layer.activation), layer.name)
            width = int(kernel.shape[1])
        elif kind == "Activation":
            g.activation(_activation_name(layer.activation), layer.name)
        elif kind == "Rescaling":
            g.op("Mul", g.const(f"{layer.name}_scale", np.float32(layer.scale)))
            g.op("Add", g.const(f"{layer.name}_offset", np.float32(layer.offset)))
        else:
            raise FailedPreconditionError(
                f"layer {layer.name!r} is a {kind}, which the Keras ONNX exporter does not "
                f"support; supported: {', '.join(SUPPORTED_LAYERS)}"
            )
    if not g.nodes:
        raise FailedPreconditionError("the Keras model has no exportable layers")
    g.nodes.append(helper.make_node("Identity", [g.current], [OUTPUT_NAME], name="score_out"))
    graph = helper.make_graph(
        g.nodes,
        "carrara_keras_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, width])],
        initializer=g.initializers,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="carrara"
    )
    # Keep the IR version ONNX Runtime accepts for this opset (onnx may default newer).
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    return data
