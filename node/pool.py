"""Slot pools: one preallocated `[slots, ...]` array per expert tensor, shared by
every MoE layer with the same tensor layout.

Experts are read straight into a slot's memory (on CUDA, into pinned memory and then
copied there by DMA: staging.py) and computed by slot index, so nothing is stacked per token.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

import mlx.core as mx

from .cache import ExpertCache
from .dtypes import aligned_zeros
from .limits import DIRECT_ALIGNMENT
from .manifest import LayerSpec

if TYPE_CHECKING:
    from .staging import Staging


def layout_key(spec: LayerSpec) -> tuple:
    """Layers whose experts have this same key can share slots."""
    return (spec.record_bytes, tuple((t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes) for t in spec.tensors))


class SlotPool:
    def __init__(self, spec: LayerSpec, num_slots: int):
        self.spec = spec
        self.num_slots = num_slots
        self.arrays: dict[str, mx.array] = {}
        for t in spec.tensors:
            # Page-aligned, so that direct I/O can read a slot's tensor in place (store.py), and a
            # file can be mapped over it (filemap.py; pages of 16 KiB on some Linux machines).
            self.arrays[t.name] = aligned_zeros((num_slots, *t.shape), getattr(mx, t.dtype),
                                                max(DIRECT_ALIGNMENT, mmap.PAGESIZE))
        # Writable byte views of the arrays' own memory: reads land in place. (The ignore:
        # mlx's stubs leave out the buffer protocol that mx.array implements.)
        self._bytes = {name: memoryview(arr).cast("B")  # type: ignore[arg-type]
                       for name, arr in self.arrays.items()}
        self._views: dict[int, list[memoryview]] = {}

    def byte_views(self) -> dict[str, memoryview]:
        """Each tensor's whole array, as writable bytes."""
        return dict(self._bytes)

    def views(self, slot: int) -> list[memoryview]:
        """One writable view per tensor of the slot, in the layer spec's tensor order."""
        views = self._views.get(slot)
        if views is None:  # made once per slot: a miss asks for them every time
            views = [self._bytes[t.name][slot * t.nbytes : (slot + 1) * t.nbytes] for t in self.spec.tensors]
            self._views[slot] = views
        return views


class SlotGroup:
    """Layers sharing one tensor layout, and their pool's slots:
    [0, cache) the cache's, then `scratch` slots for misses the cache does not
    admit, then two banks of `prefetch` slots used alternately (a bank being
    filled for the next layer is never one the current layer computes from)."""

    def __init__(self, specs: list[LayerSpec], budget_bytes: int, scratch_slots: int, prefetch_slots: int,
                 policy: str):
        spec = specs[0]
        self.record_bytes = spec.record_bytes
        self.cache_slots = budget_bytes // spec.record_bytes
        self.scratch_start = self.cache_slots
        self.prefetch_start = self.cache_slots + scratch_slots
        self.prefetch_slots = prefetch_slots
        self.pool = SlotPool(spec, self.cache_slots + scratch_slots + 2 * prefetch_slots)
        self.slot_of: dict[tuple[int, int], int] = {}
        # Unused where the group keeps all its experts (`keeps_all`: their slots are fixed).
        self.free = list(range(self.cache_slots - 1, -1, -1))
        self.cache: ExpertCache[tuple[int, int]] = ExpertCache(self.cache_slots * spec.record_bytes, spec.record_bytes,
                                                               policy, on_evict=self._evicted)
        self.bank = 0
        self.cached_in_layer: dict[int, int] = {}
        # Bumped whenever a cached expert leaves its slot (evicted, or forgotten after a failed
        # read): a resident table built before then may name a slot that holds another expert.
        self.departures = 0
        # A cache that holds every expert of its layers never evicts. Each expert then has a
        # slot of its own, layer after layer in expert order, so that a layer's experts are
        # one slice of the pool: mlx-lm's module computes on it as on its own stacked experts
        # (`layer_arrays`), with no expert -> slot lookup in the graph.
        self.keeps_all = self.cache_slots >= sum(s.num_experts for s in specs)
        self._slots_of_layer: dict[int, tuple[int, int]] = {}  # layer -> its first slot, its experts
        if self.keeps_all:
            first = 0
            for s in specs:
                self._slots_of_layer[s.layer], first = (first, s.num_experts), first + s.num_experts
        # Where misses are read before they are copied into their slots (CUDA only: staging.py).
        self.staging: Staging | None = None

    def admit(self, key: tuple[int, int]) -> int:
        slot = self._slots_of_layer[key[0]][0] + key[1] if self.keeps_all else self.free.pop()
        self.slot_of[key] = slot
        self.cached_in_layer[key[0]] = self.cached_in_layer.get(key[0], 0) + 1
        return slot

    @property
    def free_slots(self) -> int:
        return self.cache_slots - len(self.slot_of)

    def layer_arrays(self, layer: int) -> dict[str, mx.array] | None:
        """A layer's experts as stacked `[num_experts, ...]` arrays, views of its slots (no
        copy), where the group keeps all its experts; else None."""
        if not self.keeps_all:
            return None
        first, num_experts = self._slots_of_layer[layer]
        views = {name: arr[first : first + num_experts] for name, arr in self.pool.arrays.items()}
        mx.eval(views)
        return views

    def _evicted(self, key, _value) -> None:
        slot = self.slot_of.pop(key)
        if not self.keeps_all:
            self.free.append(slot)
        self.cached_in_layer[key[0]] -= 1
        self.departures += 1

    def copy_slot(self, src: int, dst: int) -> None:
        for a, b in zip(self.pool.views(src), self.pool.views(dst)):
            b[:] = a
