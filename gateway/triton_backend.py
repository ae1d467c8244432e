"""Remote model execution on NVIDIA Triton over gRPC (KServe v2).

``TritonBackend`` checks the model with ``tritonclient`` when it is loaded (readiness, one FP32
``[-1, d]`` input); on the serving path the engine calls Triton through
``native_executor()`` — a C++ gRPC client with the variant's timeout as deadline, no Python per
request. ``infer`` (the same call through ``tritonclient``) serves tools and tests. A GPU fleet
behind a Kubernetes Service looks the same as one local server.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from carrara.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from carrara.gateway.backends import BackendInfo, check_input

__all__ = ["TritonBackend"]


class TritonBackend:
    """A model on a Triton server with one FP32 ``[batch, d]`` input and an FP32 output."""

    runs_in_process = False

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        model_version: str = "",
        output: str | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        self._triton = triton
        self._error = InferenceServerException
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_s = timeout_s
        self._client: Any = triton.InferenceServerClient(url)
        try:
            if not self._client.is_model_ready(model_name, model_version):
                raise NotFoundError(f"Triton at {url} has no ready model {model_name!r}")
            meta = self._client.get_model_metadata(model_name, model_version)
        except InferenceServerException as exc:
            self._client.close()
            raise UnavailableError(f"cannot reach Triton at {url}: {exc}") from exc
        if len(meta.inputs) != 1:
            self._client.close()
            raise InvalidArgumentError(f"Triton model {model_name!r} must have one input")
        inp = meta.inputs[0]
        dims = list(inp.shape)
        if inp.datatype != "FP32" or len(dims) != 2 or dims[1] < 1:
            self._client.close()
            raise InvalidArgumentError(
                f"Triton model {model_name!r} input {inp.name!r} is {inp.datatype} {dims}; "
                "Carrara needs FP32 [-1, d]"
            )
        outputs = {o.name: list(o.shape) for o in meta.outputs}
        self._output = output or meta.outputs[0].name
        if self._output not in outputs:
            self._client.close()
            raise InvalidArgumentError(
                f"Triton model {model_name!r} has no output {self._output!r}"
            )
        out_dims = outputs[self._output]
        self._input = inp.name
        self._info = BackendInfo(
            input_name=inp.name,
            input_dim=int(dims[1]),
            output_names=tuple(outputs),
            output_dim=int(out_dims[-1]) if len(out_dims) == 2 and out_dims[-1] > 0 else 1,
            platform=f"triton:{meta.platform}",
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def native_executor(self) -> Any:
        """The serving engine's executor for this model: ModelInfer over native gRPC
        (``carrara._native.TritonExecutor``), with no Python per request."""
        from carrara import _native

        return _native.TritonExecutor(
            self.url,
            self.model_name,
            model_version=self.model_version,
            output=self._output,
            timeout_s=self.timeout_s,
        )

    def infer(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        check_input(self._info, x)
        inp = self._triton.InferInput(self._input, list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        try:
            result = self._client.infer(
                self.model_name,
                [inp],
                model_version=self.model_version,
                outputs=[self._triton.InferRequestedOutput(self._output)],
                client_timeout=self.timeout_s,
            )
        except self._error as exc:
            if "Deadline" in str(exc) or "deadline" in str(exc):
                raise DeadlineExceededError(f"Triton {self.model_name!r}: {exc}") from exc
            raise UnavailableError(f"Triton {self.model_name!r} failed: {exc}") from exc
        out = np.asarray(result.as_numpy(self._output), dtype=np.float32)
        return out.reshape(len(x), -1)

    def close(self) -> None:
        self._client.close()
