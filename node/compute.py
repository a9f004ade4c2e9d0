"""Expert compute: mlx-lm's own routed-expert module, run on experts in a slot pool.

A `SwitchGLU`/`SwitchMLP` computes `x` against stacked weights `[E, ...]` picked by
`indices`. The kernel keeps one such module as a template whose weights are the
slot pool's `[slots, ...]` arrays, and calls it with slot ids instead of expert
ids: the arithmetic is mlx-lm's, so the outputs are the ones mlx-lm computes
with every expert in RAM.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .dtypes import array_from_bytes
from .manifest import LayerSpec

# mlx-lm's switch layers sort the (token, expert) pairs of a call from this many on.
SORT_MIN_PAIRS = 64

ExpertWeights = dict[str, mx.array]


def record_to_arrays(spec: LayerSpec, record: np.ndarray) -> ExpertWeights:
    """Turns one expert's record bytes into its tensors (copies: the record can go)."""
    return {t.name: array_from_bytes(record, t.dtype, list(t.shape), t.offset) for t in spec.tensors}


def array_bytes(arr: mx.array) -> memoryview:
    # The ignore: mlx's stubs leave out the buffer protocol that mx.array implements.
    return memoryview(arr).cast("B")  # type: ignore[arg-type]


class ExpertKernel:
    """Computes one MoE layer's routed experts with mlx-lm's module for that layer."""

    def __init__(self, template: nn.Module, spec: LayerSpec, pool_arrays: dict[str, mx.array]):
        self.spec = spec
        for child, params in spec.quantization.items():
            linear = template[child]
            template[child] = linear.to_quantized(
                group_size=params["group_size"], bits=params["bits"], mode=params.get("mode", "affine")
            )
        self.template = template
        self.bind(pool_arrays)

    def bind(self, pool_arrays: dict[str, mx.array]) -> None:
        """Points the template's weights at a slot pool, or at a resident layer's slice of one
        (replacing its random, never evaluated ones)."""
        for t in self.spec.tensors:
            owner_path, _, attr = t.name.rpartition(".")
            owner = self.template
            for part in owner_path.split(".") if owner_path else []:
                owner = owner[part]
            owner[attr] = pool_arrays[t.name]
        self.num_slots = next(iter(pool_arrays.values())).shape[0]

    def __call__(self, x: mx.array, slots: np.ndarray | mx.array, sort: bool = False) -> mx.array:
        """`slots` has the shape of mlx-lm's `indices` (`x.shape[:-1] + (k,)`), holding slot ids.

        `sort`: these are some of the pairs of a call that mlx-lm sorts (it sorts from
        SORT_MIN_PAIRS pairs on), computed on its sorted path even if they are fewer. CUDA's
        unsorted float32 kernel rounds differently from the sorted one (measured on an H200).
        """
        if sort and isinstance(slots, np.ndarray) and 0 < slots.size < SORT_MIN_PAIRS and slots.ndim == 2:
            padded = _padded_to_sort(x, slots, self.num_slots)
            if padded is not None:
                return self.template(padded[0], mx.array(padded[1]))[: slots.shape[0]]
        return self.template(x, slots if isinstance(slots, mx.array) else mx.array(slots))


def _padded_to_sort(x: mx.array, slots: np.ndarray, num_slots: int) -> tuple[mx.array, np.ndarray] | None:
    """Rows `[n, hidden]` and slots `[n, k]` padded with rows of a slot they do not use (its
    output is dropped) to SORT_MIN_PAIRS pairs: mlx-lm then sorts, and the pairs' own
    experts see the same rows as before. None if every slot is in use."""
    used = set(slots.reshape(-1).tolist())
    spare = next(i for i in range(len(used) + 1) if i not in used)
    k = slots.shape[1]
    rows = -(-(SORT_MIN_PAIRS - slots.size) // k)
    if spare >= num_slots or x.ndim != 2:
        return None
    padded_x = mx.concatenate([x, mx.broadcast_to(x[:1], (rows, x.shape[1]))])
    return padded_x, np.concatenate([slots, np.full((rows, k), spare, dtype=slots.dtype)])


def input_dims(kernel: ExpertKernel) -> int:
    """The hidden size the layer's experts take."""
    first = next(m for m in kernel.template.children().values() if hasattr(m, "input_dims"))
    return first.input_dims


def compute_pairs(
    kernel: ExpertKernel,
    slots_for: Callable[[list[int]], np.ndarray],
    x: mx.array,
    rows: np.ndarray,
    experts: np.ndarray,
    max_inflight: int,
    sort: bool = False,
) -> mx.array:
    """Output row i is expert `experts[i]` applied to `x[rows[i]]`; `[len(rows), hidden]`.
    `sort`: the pairs are (part of) a call mlx-lm sorts (`ExpertKernel.__call__`).

    Experts are brought into slots `max_inflight` at a time (`slots_for` returns the
    slot of each expert it is given), each group computed before the next is fetched,
    since a later group may reuse the earlier group's scratch slots.
    """
    needed = sorted(set(experts.tolist()))
    out = None
    for start in range(0, len(needed), max_inflight):
        group = needed[start : start + max_inflight]
        picked = np.flatnonzero(np.isin(experts, group))
        slot_of = dict(zip(group, slots_for(group).tolist()))
        slots = np.array([slot_of[e] for e in experts[picked].tolist()], dtype=np.uint32)
        y = kernel(x[mx.array(rows[picked])], slots[:, None], sort).reshape(len(picked), -1)
        if out is None:
            out = mx.zeros((len(rows), y.shape[-1]), dtype=y.dtype)
        out[mx.array(picked)] = y
        mx.eval(out)
    assert out is not None  # callers give at least one pair (a node refuses an empty request)
    return out
