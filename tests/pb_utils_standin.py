"""A stand-in for `triton_python_backend_utils`, the module Triton's Python backend gives a model.py: its data types
only (Tensor, InferenceRequest, InferenceResponse, TritonError, the response sender, the final flag), so a model's
`initialize` / `execute` run against a bundle without a Triton server. It is not Triton: no scheduling, batching,
BLS calls or shared memory, and nothing here decides what a model answers."""

from __future__ import annotations

import threading

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    def __init__(self, message: str, code=None):
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    """As Triton's: BYTES tensors are numpy object arrays of bytes."""

    def __init__(self, name: str, array):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self._tensors, self._error = list(output_tensors), error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class ResponseSender:
    """A decoupled model's sender: responses kept in order; `done` is set by the final flag."""

    def __init__(self):
        self.responses: list[InferenceResponse] = []
        self.flags: list[int] = []
        self.done = threading.Event()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.done.is_set():
            raise RuntimeError("a response was sent after the final flag")
        if response is not None:
            self.responses.append(response)
        self.flags.append(flags)
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        return False


class InferenceRequest:
    def __init__(self, inputs: list[Tensor]):
        self._inputs = list(inputs)
        self._sender = ResponseSender()

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def get_response_sender(self) -> ResponseSender:
        return self._sender


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)
