"""The Open Inference Protocol (KServe V2) as data: Triton's datatypes, infer requests in, infer responses out.

No HTTP here: runtime/serve.py routes /v2 to these functions and answers their `TensorError`s as 400s in the
protocol's `{"error": message}` shape. Both tensor encodings are read and written:
- JSON: an input's `data` is its elements in row-major order, flat or nested (any regular nesting whose element
  count is the shape's); outputs come back flat, as Triton writes them.
- The binary tensor data extension (Triton's docs/protocol/extension_binary_data.md; tritonclient and perf_analyzer
  use it by default): the body is the JSON header, `Inference-Header-Content-Length` bytes long, then each binary
  input's raw little-endian bytes in the order the inputs are listed, each `parameters.binary_data_size` long
  (BYTES elements: a 4-byte little-endian length, then the bytes). Outputs come back binary when the output asks
  (`parameters.binary_data`) or, for outputs that do not say, when the request asks (`binary_data_output`, which
  tritonclient.http sets when it names no outputs).

Every check of a request names the input or output at fault and what to send instead: a request is refused whole
before any of it reaches a model.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from medc.errors import MedcError
from medc.specs import TensorSpec

VERSION = "1"  # a bundle is one model version; a new build is a new bundle

# Triton's datatype names -> numpy. BF16 has no numpy type (tritonclient needs ml_dtypes for it): refused by name.
DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64), ("FP16", np.float16),
    ("FP32", np.float32), ("FP64", np.float64), ("BYTES", np.object_))}
_BY_NUMPY = {dt.name: name for name, dt in DATATYPES.items() if name != "BYTES"}
# The JSON element kinds each datatype takes (numpy's dtype.kind of the parsed array): integers are valid floats,
# not the other way round (Triton's JSON parser refuses 1.5 for an INT64 too).
_JSON_KINDS = {"BOOL": "b", "BYTES": "U", **{n: "iu" for n in DATATYPES if n[0] in "IU"},
               **{n: "iuf" for n in ("FP16", "FP32", "FP64")}}
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}
# Extensions medc does not implement: silently ignoring them would answer something other than what was asked.
_UNSUPPORTED = {"shared_memory_region": "the shared-memory extension is not supported; send the tensor in the body",
                "classification": "the classification extension is not supported; ask for the output itself"}


class TensorError(MedcError):
    """A request the protocol or the model cannot take; the message names the tensor and the fix."""


def datatype(numpy_name: str) -> str:
    """A manifest dtype ("float32") as a V2 datatype ("FP32")."""
    if numpy_name not in _BY_NUMPY:
        raise MedcError(f"tensors of dtype {numpy_name!r} have no V2 datatype medc serves (BF16 has no numpy type); "
                        "rebuild the component with float32 or float16 inputs and outputs.")
    return _BY_NUMPY[numpy_name]


@dataclass(frozen=True)
class Tensor:
    """A graph input or output as V2 names it: shape with -1 for the batch axis, the only dynamic one."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> "Tensor":
        if not spec.shape or any(isinstance(d, str) for d in spec.shape[1:]):
            # Rows of different requests are stacked into one call: only the batch axis may differ between them.
            raise MedcError(f"{spec.name} has shape {list(spec.shape)}; the V2 routes serve graphs whose only "
                            "dynamic axis is the first (the batch).")
        return cls(spec.name, datatype(spec.dtype), tuple(-1 if isinstance(d, str) else int(d) for d in spec.shape))

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """What one V2 model takes and gives: a bundle component's graph inputs and outputs, by the graph's names."""

    name: str  # "{model id}.{component}"
    platform: str  # Triton's platform name for what runs it: onnxruntime_onnx, tensorrt_plan, openvino
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @classmethod
    def from_specs(cls, name: str, platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> "Signature":
        return cls(name, platform, tuple(map(Tensor.from_spec, inputs)), tuple(map(Tensor.from_spec, outputs)))

    def metadata(self) -> dict:
        """GET /v2/models/{name}: the protocol's model metadata."""
        return {"name": self.name, "versions": [VERSION], "platform": self.platform,
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs]}


@dataclass
class InferRequest:
    """A validated request: every input as an array in the signature's order (the batch axis first, all inputs the
    same number of rows) and the outputs to answer, in the order asked, each with whether it goes back binary."""

    id: str | None
    inputs: list[np.ndarray]
    outputs: list[tuple[str, bool]]

    @property
    def rows(self) -> int:
        return len(self.inputs[0])


def split_body(body: bytes | bytearray, header_length: str | None) -> tuple[bytes | bytearray, memoryview]:
    """(JSON header, binary tail) of a request body, by its `Inference-Header-Content-Length` header (None: the
    whole body is JSON)."""
    if header_length is None:
        return body, memoryview(b"")
    n = header_length.strip()
    if not (n.isascii() and n.isdigit()) or not 1 <= int(n) <= len(body):  # isdigit alone takes "²"
        raise TensorError(f"Inference-Header-Content-Length is {header_length[:20]!r}, but the body is {len(body)} "
                          "bytes: it must be the length in bytes of the JSON header that starts the body, 1 to the "
                          "body's length.")
    view = memoryview(body)
    return bytes(view[:int(n)]), view[int(n):]


def decode_request(header, tail: memoryview, sig: Signature, max_rows: int) -> InferRequest:
    """A parsed JSON header and the binary tail after it -> an InferRequest for `sig`, or TensorError."""
    if not isinstance(header, dict):
        raise TensorError("the inference request must be a JSON object with inputs.")
    for key in header:
        if key not in _REQUEST_KEYS:
            raise TensorError(f"unsupported key {str(key)[:64]!r} in the inference request; it takes "
                              f"{', '.join(sorted(_REQUEST_KEYS))}.")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("id must be a string.")
    params = _parameters(header, "the request")
    binary_default = _flag(params, "binary_data_output", "the request's parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise TensorError(f"inputs must be an array of tensors; model {sig.name} takes {_names(sig.inputs)}.")

    expected = {t.name: t for t in sig.inputs}
    given: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise TensorError(f"inputs[{i}] must be an object with a name, shape, datatype and data.")
        name = item["name"]
        if name not in expected:
            raise TensorError(f"model {sig.name} has no input {name[:64]!r}; it takes {_names(sig.inputs)}.")
        if name in given:
            raise TensorError(f"input {name} is given twice.")
        array, used = _input(item, expected[name], tail[offset:], max_rows)
        given[name] = array
        offset += used
    missing = [n for n in expected if n not in given]
    if missing:
        raise TensorError(f"model {sig.name} needs input{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          f"the request gave {', '.join(given) or 'none'}.")
    if offset != len(tail):
        raise TensorError(f"the body holds {len(tail)} bytes after its JSON header, but the inputs' "
                          f"binary_data_size add up to {offset}: send exactly the bytes they declare.")
    rows = {n: len(a) for n, a in given.items()}
    if len(set(rows.values())) > 1:
        raise TensorError(f"the inputs differ in their first (batch) dimension ({rows}); give every input the same "
                          "number of rows.")
    return InferRequest(request_id, [given[t.name] for t in sig.inputs], _outputs(header, sig, binary_default))


def _input(item: dict, spec: Tensor, tail: memoryview, max_rows: int) -> tuple[np.ndarray, int]:
    """One input as an array of the graph's dtype and a shape the graph takes, and the tail bytes it used."""
    name = spec.name
    for key in item:
        if key not in _INPUT_KEYS:
            raise TensorError(f"input {name}: unsupported key {str(key)[:64]!r}; an input takes "
                              f"{', '.join(sorted(_INPUT_KEYS))}.")
    kind = item.get("datatype")
    if kind == "BF16":
        raise TensorError(f"input {name}: BF16 is not supported; send {spec.datatype}.")
    if kind not in DATATYPES:
        raise TensorError(f"input {name}: datatype {str(kind)[:20]!r} is not a V2 datatype; send {spec.datatype}.")
    if kind != spec.datatype:
        raise TensorError(f"input {name} is {spec.datatype}, not {kind}: send {spec.datatype} "
                          f"(numpy {DATATYPES[spec.datatype].name}).")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise TensorError(f"input {name}: shape must be an array of non-negative integers, e.g. "
                          f"{[1 if d < 0 else d for d in spec.shape]}.")
    if len(shape) != len(spec.shape) or any(d != s for d, s in zip(shape[1:], spec.shape[1:])):
        raise TensorError(f"input {name} has shape {shape[:8]}{'...' if len(shape) > 8 else ''}; model takes "
                          f"{list(spec.shape)} (-1: any number of rows).")
    if not 1 <= shape[0] <= max_rows:
        raise TensorError(f"input {name} has {shape[0]} rows; send 1 to {max_rows} per request (--max-inputs).")
    count = math.prod(shape)
    params = _parameters(item, f"input {name}")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TensorError(f"input {name}: binary_data_size must be a non-negative integer (bytes).")
        if "data" in item:
            raise TensorError(f"input {name} has both data and binary_data_size; send one of the two.")
        if size > len(tail):
            raise TensorError(f"input {name}: binary_data_size is {size} bytes, but only {len(tail)} bytes of "
                              "binary data are left in the body (is Inference-Header-Content-Length right?).")
        return _from_binary(spec, tail[:size], count, shape), size
    if "data" not in item:
        hint = (" (binary tensors need the Inference-Header-Content-Length header and parameters.binary_data_size)"
                if len(tail) == 0 else "")
        raise TensorError(f"input {name} has no data: give data (JSON) or parameters.binary_data_size{hint}.")
    return _from_json(spec, item["data"], count, shape), 0


def _from_binary(spec: Tensor, raw: memoryview, count: int, shape: list[int]) -> np.ndarray:
    if spec.datatype == "BYTES":
        return _bytes_elements(spec.name, raw, count).reshape(shape)
    dtype = DATATYPES[spec.datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise TensorError(f"input {spec.name}: binary_data_size is {len(raw)} bytes, but shape {shape} of "
                          f"{spec.datatype} is {count * dtype.itemsize} bytes.")
    if spec.datatype == "BOOL" and count and np.frombuffer(raw, np.uint8).max() > 1:
        raise TensorError(f"input {spec.name}: BOOL elements are one byte each, 0 or 1.")
    # A view of the body: the micro-batcher copies the rows into the batch it runs (aligned, native order).
    return np.frombuffer(raw, dtype).reshape(shape)


def _bytes_elements(name: str, raw: memoryview, count: int) -> np.ndarray:
    """BYTES in binary form: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"input {name}: BYTES data ends inside an element's 4-byte length.")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise TensorError(f"input {name}: a BYTES element says {n} bytes, past the end of its data.")
        out.append(bytes(raw[at + 4:at + 4 + n]))
        at += 4 + n
    if len(out) != count:
        raise TensorError(f"input {name}: {len(out)} BYTES elements for a shape of {count}.")
    array = np.empty(count, object)
    array[:] = out
    return array


def _from_json(spec: Tensor, data, count: int, shape: list[int]) -> np.ndarray:
    name = spec.name
    if not isinstance(data, list):
        raise TensorError(f"input {name}: data must be an array of its elements in row-major order, flat or nested.")
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):  # ragged nesting
        raise TensorError(f"input {name}: data is nested unevenly; send it flat, or nested as the shape.") from None
    if array.size != count:
        raise TensorError(f"input {name}: data holds {array.size} elements; shape {shape} needs {count}.")
    kinds = _JSON_KINDS[spec.datatype]
    if array.dtype.kind not in kinds:  # "O": nulls, objects or integers past 64 bits; "U": strings among numbers
        what = {"b": "true or false", "U": "strings", "iu": "integers"}.get(kinds, "numbers")
        raise TensorError(f"input {name}: {spec.datatype} data must hold {what} only.")
    target = DATATYPES[spec.datatype]
    if spec.datatype == "BYTES":
        out = np.empty(count, object)
        out[:] = [s.encode() for s in array.ravel().tolist()]
        return out.reshape(shape)
    if kinds == "iu" and count:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise TensorError(f"input {name}: a value is outside {spec.datatype}'s range {info.min} to {info.max}.")
    return array.reshape(shape).astype(target, copy=False)


def _outputs(header: dict, sig: Signature, binary_default: bool) -> list[tuple[str, bool]]:
    """The outputs asked for, in order, each with whether it goes back binary; all of them when none are named."""
    asked = header.get("outputs")
    if asked is None or asked == []:
        return [(t.name, binary_default) for t in sig.outputs]
    if not isinstance(asked, list):
        raise TensorError("outputs must be an array of {\"name\": ...} objects.")
    known = {t.name for t in sig.outputs}
    out: list[tuple[str, bool]] = []
    for i, item in enumerate(asked):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise TensorError(f"outputs[{i}] must be an object with a name.")
        name = item["name"]
        for key in item:
            if key not in _OUTPUT_KEYS:
                raise TensorError(f"output {name[:64]}: unsupported key {str(key)[:64]!r}; an output takes name "
                                  "and parameters.")
        if name not in known:
            raise TensorError(f"model {sig.name} has no output {name[:64]!r}; it gives {_names(sig.outputs)}.")
        if any(n == name for n, _ in out):
            raise TensorError(f"output {name} is asked for twice.")
        params = _parameters(item, f"output {name}")
        flag = _flag(params, "binary_data", f"output {name}'s parameters")
        out.append((name, flag if "binary_data" in params else binary_default))
    return out


def _parameters(item: dict, where: str) -> dict:
    params = item.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise TensorError(f"{where}: parameters must be an object.")
    for key, why in _UNSUPPORTED.items():
        if key in params:
            raise TensorError(f"{where}: {why}.")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise TensorError(f"{where}: {key} must be true or false.")
    return value


def _names(tensors) -> str:
    return ", ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in tensors)


# -- responses ------------------------------------------------------------------------------------------------------
def encode_response(request: InferRequest, sig: Signature, outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body for `request` given the model's outputs, and the length of its JSON header when binary
    outputs follow it (the value of the response's Inference-Header-Content-Length; None: the body is all JSON)."""
    import orjson

    types = {t.name: t.datatype for t in sig.outputs}
    entries, blobs = [], []
    for name, binary in request.outputs:
        array = outputs[name]
        entry = {"name": name, "datatype": types[name], "shape": list(array.shape)}
        if binary:
            raw = _raw(array, types[name])
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif types[name] == "BYTES":
            entry["data"] = [bytes(b).decode("utf-8", "replace") for b in array.ravel().tolist()]
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()  # orjson writes it; float32 in its shortest form
        entries.append(entry)
    doc = {"model_name": sig.name, "model_version": VERSION, "outputs": entries}
    if request.id is not None:
        doc = {"id": request.id, **doc}
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _raw(array: np.ndarray, kind: str) -> bytes:
    if kind == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in array.ravel().tolist())
    return np.ascontiguousarray(array, DATATYPES[kind].newbyteorder("<")).tobytes()
