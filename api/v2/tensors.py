"""Tensors of the Open Inference Protocol: JSON data and the binary tensor data extension, both ways.

A request is a JSON header, optionally followed by binary tensor data; ``Inference-Header-Content-Length``
says where the header ends, and each input with ``parameters.binary_data_size`` takes that many bytes of the
rest, in input order. In binary form a BYTES element is a 4-byte little-endian length and the bytes; numbers
are little-endian in row-major order. A response is built the same way for the outputs asked for in binary.
Spec: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md and Triton's
``binary_data.md``.
"""

import json
import struct

import numpy as np

from deployments.errors import InvalidInput

HEADER_LENGTH = "inference-header-content-length"

# Datatypes this service reads or writes, with their numpy types (BYTES elements are Python bytes or str).
NUMPY_TYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
DATATYPES = (
    *("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"),
    *("FP16", "FP32", "FP64", "BF16", "BYTES"),
)


class BadTensor(InvalidInput):
    """A tensor whose name, datatype, shape or data do not fit the model or the protocol."""

    error_type = "invalid_tensor"


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it (empty without the extension)."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadTensor(
            f"{HEADER_LENGTH} must be the length of the JSON header in bytes, at most the body's {len(body)}"
        )
    length = int(header_length)
    return body[:length], body[length:]


_END = object()


def flatten(data, name: str) -> list:
    """Row-major elements of JSON tensor data, flat or nested."""
    if not isinstance(data, list):
        raise BadTensor(f"input {name!r}: data must be a JSON array")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """``count`` BYTES elements from their binary form (length-prefixed), which must fill ``raw`` exactly."""
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise BadTensor(f"input {name!r}: binary data holds fewer than the shape's {count} elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadTensor(f"input {name!r}: a binary BYTES element runs past the input's binary_data_size")
        elements.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise BadTensor(f"input {name!r}: binary data holds more than the shape's {count} elements")
    return elements


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def output_data(array: np.ndarray, datatype: str, binary: bool) -> tuple[list | None, bytes | None]:
    """An output's JSON data (flat, row-major) or its binary form."""
    if datatype == "BYTES":
        elements = [e if isinstance(e, bytes) else str(e).encode() for e in array.reshape(-1)]
        if binary:
            return None, serialize_bytes(elements)
        return [e.decode() for e in elements], None
    values = np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype])
    if binary:
        return None, values.tobytes()
    return values.reshape(-1).tolist(), None


def join_body(header: dict, blobs: list[bytes]) -> tuple[bytes, int | None]:
    """The response body, and the header's length where binary data follows it."""
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def numbers_from_binary(raw: bytes, count: int, datatype: str, name: str) -> np.ndarray:
    """``count`` numbers of ``datatype`` from their binary form (little-endian), which must fill ``raw`` exactly."""
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadTensor(
            f"input {name!r}: {count} {datatype} elements are {count * dtype.itemsize} bytes, not {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype)


def numbers_from_json(elements: list, datatype: str, name: str) -> np.ndarray:
    """Numbers of ``datatype`` from JSON data: numbers only (not booleans, not strings)."""
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in elements):
        raise BadTensor(f"input {name!r}: {datatype} data in JSON are numbers")
    return np.asarray(elements, dtype=NUMPY_TYPES[datatype])
