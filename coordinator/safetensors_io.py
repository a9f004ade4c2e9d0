"""Safetensors headers and a streaming writer: tensors as byte ranges, never whole files in RAM."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgemoe.node.dtypes import SAFETENSORS_NAMES as SAFETENSORS_DTYPES

MLX_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class StoredTensor:
    """Where a tensor's bytes are in a safetensors file."""

    path: Path
    dtype: str  # mlx dtype name
    shape: list[int]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file")
        header = json.loads(f.read(size))
    base = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = StoredTensor(
            Path(path), MLX_DTYPES.get(info["dtype"], info["dtype"]), list(info["shape"]), base + start, end - start
        )
    return tensors


def index_files(paths: Iterable[Path]) -> dict[str, StoredTensor]:
    index: dict[str, StoredTensor] = {}
    for path in paths:
        index.update(read_header(path))
    return index


class Writer(Protocol):
    """Where tensors are written: a file, or one that also hashes what goes through it."""

    def write(self, data: bytes, /) -> object: ...


def copy_range(src_fd: int, offset: int, length: int, out: Writer, chunk: int = 64 * 2**20) -> None:
    while length > 0:
        n = min(chunk, length)
        data = os.pread(src_fd, n, offset)
        if len(data) != n:
            raise EOFError("source file ended early")
        out.write(data)
        offset += n
        length -= n


def write_header(out: Writer, entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> None:
    """Writes the header for tensors that follow back to back, in `entries` order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
