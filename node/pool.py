"""Slot pools: one preallocated `[slots, ...]` array per expert tensor, shared by
every MoE layer with the same tensor layout.

Experts are read straight into a slot's memory and computed by slot index, so
nothing is copied or stacked per token.
"""

from __future__ import annotations

import mlx.core as mx

from .manifest import LayerSpec


def layout_key(spec: LayerSpec) -> tuple:
    """Layers whose experts have this same key can share slots."""
    return (spec.record_bytes, tuple((t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes) for t in spec.tensors))


class SlotPool:
    def __init__(self, spec: LayerSpec, num_slots: int):
        self.spec = spec
        self.num_slots = num_slots
        self.arrays: dict[str, mx.array] = {}
        for t in spec.tensors:
            arr = mx.zeros((num_slots, *t.shape), dtype=getattr(mx, t.dtype))
            mx.eval(arr)
            self.arrays[t.name] = arr
        # Writable byte views of the arrays' own memory: reads land in place. (The ignore:
        # mlx's stubs leave out the buffer protocol that mx.array implements.)
        self._bytes = {name: memoryview(arr).cast("B")  # type: ignore[arg-type]
                       for name, arr in self.arrays.items()}

    def views(self, slot: int) -> list[memoryview]:
        """One writable view per tensor of the slot, in the layer spec's tensor order."""
        return [self._bytes[t.name][slot * t.nbytes : (slot + 1) * t.nbytes] for t in self.spec.tensors]
