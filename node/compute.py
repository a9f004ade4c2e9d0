"""Expert compute: mlx-lm's own routed-expert module, run on the experts at hand.

A `SwitchGLU`/`SwitchMLP` computes `x` against stacked weights `[E, ...]` picked by
`indices`. The kernel keeps one such module as a template with no weights of its
own, stacks just the experts a call needs, renumbers the indices into that stack
and runs the template: the arithmetic is mlx-lm's, so the outputs are the ones
mlx-lm computes with every expert in RAM.
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .manifest import LayerSpec

# numpy has no bfloat16: its bytes travel as uint16 and are reinterpreted in mlx.
_NUMPY_DTYPES = {
    "bfloat16": np.uint16,
    "float16": np.float16,
    "float32": np.float32,
    "uint32": np.uint32,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint16": np.uint16,
    "int32": np.int32,
}

ExpertWeights = dict[str, mx.array]
_EMPTY = mx.zeros((0,))


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def record_to_arrays(spec: LayerSpec, record: np.ndarray) -> ExpertWeights:
    """Turns one expert's record bytes into its tensors (copies: the record can go)."""
    arrays = {}
    for t in spec.tensors:
        np_dtype = _NUMPY_DTYPES[t.dtype]
        count = t.nbytes // np.dtype(np_dtype).itemsize
        flat = np.frombuffer(record, dtype=np_dtype, count=count, offset=t.offset)
        arr = mx.array(flat.reshape(t.shape))
        if t.dtype == "bfloat16":
            arr = arr.view(mx.bfloat16)
        arrays[t.name] = arr
    return arrays


def array_bytes(arr: mx.array) -> memoryview:
    return memoryview(arr).cast("B")


class ExpertKernel:
    """Computes one MoE layer's routed experts with mlx-lm's module for that layer."""

    def __init__(self, template: nn.Module, spec: LayerSpec):
        self.spec = spec
        for child, params in spec.quantization.items():
            linear = template[child]
            template[child] = linear.to_quantized(
                group_size=params["group_size"], bits=params["bits"], mode=params.get("mode", "affine")
            )
        self._slots = []
        for t in spec.tensors:
            owner_path, _, attr = t.name.rpartition(".")
            owner = template
            for part in owner_path.split(".") if owner_path else []:
                owner = owner[part]
            self._slots.append((t.name, owner, attr))
        # Drop the template's own (random, never evaluated) weights.
        for _, owner, attr in self._slots:
            owner[attr] = _EMPTY
        self.template = template

    def __call__(self, x: mx.array, indices: np.ndarray, weights: Mapping[int, ExpertWeights]) -> mx.array:
        """`indices` are global expert ids, shape `x.shape[:-1] + (k,)`; `weights` holds each one."""
        experts = sorted(weights)
        remap = np.zeros(self.spec.num_experts, dtype=np.uint32)
        remap[experts] = np.arange(len(experts), dtype=np.uint32)
        local = mx.array(remap[indices])
        for name, owner, attr in self._slots:
            if len(experts) == 1:
                owner[attr] = mx.expand_dims(weights[experts[0]][name], 0)
            else:
                owner[attr] = mx.stack([weights[e][name] for e in experts])
        out = self.template(x, local)
        # The lazy graph of `out` keeps the stacked weights alive until it is
        # evaluated; the template must not hold them past that.
        for _, owner, attr in self._slots:
            owner[attr] = _EMPTY
        return out
