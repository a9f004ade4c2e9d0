"""dtypes by the names the manifest, safetensors and the wire use, and how their bytes are held."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# numpy has no bfloat16: its bytes are held as uint16 and reinterpreted in mlx.
NUMPY_STORAGE: dict[str, type] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "uint32": np.uint32,
    "int32": np.int32,
    "uint16": np.uint16,
    "int16": np.int16,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint64": np.uint64,
    "int64": np.int64,
    "bool": np.bool_,
}
SAFETENSORS_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint32": "U32",
    "int32": "I32",
    "uint16": "U16",
    "int16": "I16",
    "uint8": "U8",
    "int8": "I8",
    "uint64": "U64",
    "int64": "I64",
    "bool": "BOOL",
}
# Hidden states on the wire.
WIRE_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def array_from_bytes(buffer: bytes | memoryview | np.ndarray, name: str, shape: list[int], offset: int = 0) -> mx.array:
    """An mlx array (a copy) of dtype `name` and `shape` from raw little-endian bytes at `offset`."""
    storage = NUMPY_STORAGE[name]
    count = int(np.prod(shape)) if shape else 1
    arr = mx.array(np.frombuffer(buffer, dtype=storage, count=count, offset=offset).reshape(shape))
    return arr.view(mx.bfloat16) if name == "bfloat16" else arr


def address_of(view: memoryview) -> int:
    """Where a buffer's first byte is in memory (for alignment checks and DMA)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def aligned_zeros(shape: tuple[int, ...], dtype: mx.Dtype, alignment: int) -> mx.array:
    """Zeros whose memory starts on an `alignment` boundary (MLX's own CPU allocations do
    not): a strided view into a slightly larger buffer, which MLX shares. The buffer is
    2-D so that no dimension passes MLX's int32 limit (a pool tensor can pass 2 GiB). If
    MLX ever copied instead, a plain array is returned."""
    count = int(np.prod(shape))
    columns = alignment // dtype.size
    raw = mx.zeros((-(-(count + columns) // columns), columns), dtype=dtype)
    mx.eval(raw)
    base = address_of(memoryview(raw).cast("B"))  # type: ignore[arg-type]  # mlx's stubs omit the buffer protocol
    pad = -base % alignment
    if pad % dtype.size == 0:
        strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
        arr = mx.as_strided(raw, shape, strides, offset=pad // dtype.size)
        mx.eval(arr)
        if address_of(memoryview(arr).cast("B")) == base + pad:  # type: ignore[arg-type]
            return arr
        del arr
    del raw
    arr = mx.zeros(shape, dtype=dtype)
    mx.eval(arr)
    return arr
