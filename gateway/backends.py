"""Model backends: where an assembled float32 [n, d] tensor becomes predictions.

``OnnxBackend`` runs the model in-process with ONNX Runtime (its ``run`` releases the GIL);
``TritonBackend`` (``triton_backend.py``) sends the same tensor to a Triton server. Artifacts are
checked against their registered sha256 before they are loaded; the serving path never unpickles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from carrara.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

__all__ = ["Backend", "BackendInfo", "OnnxBackend", "check_input", "file_sha256"]


class BackendInfo(msgspec.Struct, frozen=True):
    """What a loaded model expects and returns (for metadata endpoints and validation)."""

    input_name: str
    input_dim: int
    output_names: tuple[str, ...]
    output_dim: int
    platform: str


class Backend(Protocol):
    """A loaded model version."""

    @property
    def info(self) -> BackendInfo: ...

    #: True when ``infer`` runs in the caller's process and needs no deadline enforcement
    #: by a separate thread (the engine then calls it inline).
    runs_in_process: bool

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """[n, input_dim] float32 -> [n, output_dim] float32."""
        ...

    def close(self) -> None: ...


def check_input(info: BackendInfo, x: NDArray[np.float32]) -> None:
    """Refuse a tensor that is not [n, input_dim] before it reaches a model."""
    if x.ndim != 2 or x.shape[1] != info.input_dim:
        raise InvalidArgumentError(
            f"model expects float32 [n, {info.input_dim}], got {x.dtype} {list(x.shape)}"
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxBackend:
    runs_in_process = True

    """An ONNX model in ONNX Runtime, for one float32 input of shape [batch, d].

    ``providers`` lists execution providers by short name in preference order ("tensorrt",
    "cuda", "cpu"); those not installed are skipped, and CPU is always the last resort.
    The first output (or ``output``) is returned; a 1-D output becomes a column.
    """

    def __init__(
        self,
        source: str | Path | bytes,
        *,
        sha256: str | None = None,
        providers: Sequence[str] = ("cpu",),
        output: str | None = None,
        intra_op_threads: int = 1,
        name: str | None = None,
    ) -> None:
        """``source`` is an ONNX file or the model's bytes (e.g. read from the artifact store);
        ``name`` labels the model in error messages."""
        import onnxruntime as ort

        if isinstance(source, bytes):
            data = source
            path: str | Path = name or "<in-memory model>"
        else:
            path = Path(source)
            if not path.is_file():
                raise NotFoundError(f"model artifact {path} does not exist")
            data = path.read_bytes()
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise FailedPreconditionError(
                    f"model artifact {path} has sha256 {actual}, but {sha256} was registered; "
                    "it was modified after registration and will not be loaded"
                )
        unknown = [p for p in providers if p not in _EXECUTION_PROVIDERS]
        if unknown:
            raise InvalidArgumentError(
                f"unknown execution provider(s) {unknown}; known: {sorted(_EXECUTION_PROVIDERS)}"
            )
        available = set(ort.get_available_providers())
        chosen = [
            _EXECUTION_PROVIDERS[p] for p in providers if _EXECUTION_PROVIDERS[p] in available
        ]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        # One thread per session: the gateway gets its parallelism from concurrent requests,
        # and oversubscribing 2 cores with intra-op threads hurts tail latency.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        try:
            self._session: Any = ort.InferenceSession(data, sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InvalidArgumentError(f"cannot load ONNX model {path}: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            input_names = [i.name for i in inputs]
            raise InvalidArgumentError(
                f"model {path} has inputs {input_names}; Carrara feeds exactly one"
            )
        inp = inputs[0]
        if inp.type != "tensor(float)" or len(inp.shape) != 2 or not isinstance(inp.shape[1], int):
            raise InvalidArgumentError(
                f"model {path} input {inp.name!r} is {inp.type} {inp.shape}; "
                "Carrara needs a float32 [batch, d] input with a fixed d"
            )
        outputs = self._session.get_outputs()
        names = tuple(o.name for o in outputs)
        self._output = output or names[0]
        if self._output not in names:
            raise InvalidArgumentError(f"model {path} has no output {self._output!r}; has {names}")
        out_meta = outputs[names.index(self._output)]
        out_dim = (
            out_meta.shape[1]
            if len(out_meta.shape) == 2 and isinstance(out_meta.shape[1], int)
            else 1
        )
        self._input_name = inp.name
        self._info = BackendInfo(
            input_name=inp.name,
            input_dim=int(inp.shape[1]),
            output_names=names,
            output_dim=int(out_dim),
            platform="onnxruntime_onnx",
        )
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self._closed = False

    @property
    def info(self) -> BackendInfo:
        return self._info

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        check_input(self._info, x)
        if self._closed:
            raise FailedPreconditionError("model backend was closed (a newer version replaced it)")
        (out,) = self._session.run(
            [self._output], {self._input_name: x.astype(np.float32, copy=False)}
        )
        result = np.asarray(out, dtype=np.float32)
        return result.reshape(len(x), -1)

    def close(self) -> None:
        self._closed = True
