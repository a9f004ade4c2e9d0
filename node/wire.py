"""Arrays on the wire: raw little-endian bytes with dtype and shape, checked before use."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from edgemoe.protos import edgemoe_node_pb2 as pb

from .dtypes import NUMPY_STORAGE, WIRE_DTYPES, array_from_bytes, dtype_name
from .errors import EdgemoeError

# Hidden rows, and (row, expert) pairs, in one compute request: part of the wire contract.
MAX_ROWS = 8192


class WireError(EdgemoeError):
    """A message from a peer is malformed: wrong dtype, shape, size or ids."""


def tensor_from_array(arr: mx.array) -> pb.Tensor:
    name = dtype_name(arr.dtype)
    if name not in WIRE_DTYPES:
        arr, name = arr.astype(mx.float32), "float32"
    mx.eval(arr)
    # mlx's stubs leave out the buffer protocol that mx.array implements
    data = bytes(memoryview(arr).cast("B"))  # type: ignore[arg-type]
    return pb.Tensor(dtype=name, shape=list(arr.shape), data=data)


def array_from_tensor(tensor: pb.Tensor, max_rows: int) -> mx.array:
    if tensor.dtype not in WIRE_DTYPES:
        raise WireError(f"tensor dtype {tensor.dtype[:20]!r} is not one of {', '.join(WIRE_DTYPES)}")
    shape = list(tensor.shape)
    if not 1 <= len(shape) <= 3 or any(d <= 0 for d in shape) or shape[0] > max_rows:
        raise WireError(f"tensor shape {shape[:4]} is not allowed")
    if len(tensor.data) != math.prod(shape) * np.dtype(NUMPY_STORAGE[tensor.dtype]).itemsize:
        raise WireError(f"tensor of shape {shape} and dtype {tensor.dtype} carries {len(tensor.data)} bytes")
    return array_from_bytes(tensor.data, tensor.dtype, shape)
