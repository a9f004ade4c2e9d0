"""Mapped experts: every expert of the model in the slot pools, so that every layer is
resident (`LocalExperts.resident_arrays`): no layer reads its routing back to the host.

- MLX on an NVIDIA GPU: the pools are CUDA managed memory; the most-routed `gpu_bytes` of
  the experts are on the GPU and the rest are left in host memory, mapped for the GPU, whose
  kernels read a host-placed expert over the bus as they compute with it. On an H200 that
  is 34 GB/s for 6 MiB experts, where pages faulted over one by one move at 1.7 GB/s
  (.ci/gpu-probe-mapped.py, .ci/gpu-probe-copy.py). The cost is host memory: the pools hold
  every expert, read from the store when they are built.
- MLX's CPU backend (Linux): the expert files' pages are mapped over the pools (filemap.py),
  so MLX computes on the page cache's own pages: no copy, and no second copy in RAM. The
  page cache decides which experts stay in memory; one it dropped is read back by the
  page fault that needs it.

Either way the arithmetic is the same kernel's wherever the pages are, so the tokens are
mlx-lm's.
"""

from __future__ import annotations

import logging
import sys
import weakref

import mlx.core as mx
import numpy as np

from . import filemap
from .dtypes import address_of
from .errors import EdgemoeError
from .limits import array_memory_bytes, compute_backend, ram_bytes
from .local import LocalExperts
from .manifest import Manifest
from .pool import SlotGroup
from .staging import Dma
from .store import ExpertStore

log = logging.getLogger(__name__)

# The share of RAM the experts may take (the rest: the dense weights, the page cache's copy
# of what is read, everything else on the machine).
MAPPED_RAM_SHARE = 0.6
# The share of the GPU's memory `--map-experts auto` keeps the pools within (`mapping_chosen`).
MAPPED_GPU_SHARE = 0.5
# The share of the expert bytes the CPU must be able to map for auto to map (the rest is read
# into the pools: past a little, that is a copy of every expert beside the page cache's).
MAPPED_MIN_SHARE = 0.9
# The share of the kernel's mappings per process (vm.max_map_count) auto may take: one per
# mapped tensor; past the limit mmap fails, and the rest are read.
MAPPED_MAP_COUNT_SHARE = 0.5
# What `--map-experts on` leaves of that limit to everything else in the process.
MAP_COUNT_HEADROOM = filemap.FileMappings.KEEP_FREE


class MappedExperts(LocalExperts):
    """`LocalExperts` whose pools hold every expert. With a `dma` (CUDA): `gpu_bytes` (the
    cache budget) of the most-routed ones on the GPU, the rest in host memory; placement
    follows the routing counts each time they are counted (every `SETTLE_EVERY` tokens, and
    after a generation). Without (the CPU): the expert files mapped over the pools, where
    their tensors are whole pages (the rest is read in); `gpu_bytes` is not used."""

    def __init__(self, store: ExpertStore, gpu_bytes: int, dma: Dma | None, policy: str = "lfu",
                 scratch_slots: int = 32):
        self.on_gpu: set[tuple[int, int]] = set()
        # Bytes of host-placed experts the GPU read as it computed with them (the routing
        # counts times each expert's bytes): what crossed the bus.
        self.mapped_bytes = 0
        # The same for decoded tokens only, and their MoE layer calls (the bench's bytes per token).
        self.decoded_mapped_bytes = 0
        self.decoded_layer_calls = 0
        if dma is None and not filemap.can_map_files():  # only a CPU-only MLX on Linux (filemap.py)
            raise MappedExpertsError("mapping the expert files needs a CPU-only MLX on Linux; drop --map-experts")
        self.closed = False
        self.file_mappings = filemap.FileMappings()
        # A model dropped without `close` still gives its pools' pages back before MLX reuses them.
        weakref.finalize(self, _release_file_pages, self.file_mappings)
        # Misses computed as they land give other bits than mlx-lm on a GPU (loader.py): a
        # layer takes the host path only after a failed read, and then computes as mlx-lm.
        super().__init__(store, gpu_bytes, policy, scratch_slots=scratch_slots, compute_as_read=False, dma=dma)
        self.staged_reads = False  # a read lands in host memory, where its slot lives
        self.mapped = "page cache" if dma is None else "host memory, for the GPU"

    def _build(self, cache_bytes: int) -> None:
        self.holds_all = True
        self._release_pools()
        super()._build(cache_bytes)
        self.on_gpu = set()
        try:
            if self.dma is not None:
                self._place_pools(False)
            else:  # MLX zero-filled the pools: their pages go back until a file is mapped over them
                for group in self._groups:
                    for view in group.pool.byte_views().values():
                        filemap.discard(view)
            mapped_before = self.store.stats.bytes_mapped
            self._fill()
            self._place()
        except BaseException:
            self._release_pools()
            raise
        share = (self.store.stats.bytes_mapped - mapped_before) / self.manifest.total_expert_bytes
        if self.dma is None and share < MAPPED_MIN_SHARE and not self.file_mappings.failed:  # else the store said
            log.warning("only %.0f%% of the expert bytes could be mapped (tensors that are not whole pages at "
                        "page-aligned offsets): the rest are copies in RAM", 100 * share)

    def _place_pools(self, on_gpu: bool | None) -> None:
        """Every byte of the pools in host memory (False), or left to MLX again (None)."""
        assert self.dma is not None
        for group in self._groups:
            for view in group.pool.byte_views().values():
                self.dma.place(address_of(view), len(view), on_gpu)
        self.dma.sync()

    def _release_pools(self) -> None:
        """Readies the pools to go back to MLX, which reuses their memory for other arrays:
        the GPU advice unset, or fresh anonymous pages over the mapped files, once nothing
        computes on them any more."""
        if self.dma is not None:
            self._place_pools(None)
            return
        _release_file_pages(self.file_mappings)

    def seed_counts(self, counts: dict[tuple[int, int], int]) -> None:
        super().seed_counts(counts)
        self._place()

    def close(self) -> None:
        try:
            try:
                self.settle(everything=True)
            finally:
                self._release_pools()
        finally:
            self.closed = True
            super().close()

    def resident_arrays(self, layer: int) -> dict[str, mx.array] | None:
        if self.closed:  # its pools hold zeros now (CPU) or nothing placed (CUDA): never a silent answer
            raise MappedExpertsError("the model's experts were closed; load it again")
        return super().resident_arrays(layer)

    def _fill(self) -> None:
        """Reads (CUDA) or maps (CPU) every expert into its slot. Not counted as routing or as
        misses: a load is neither, and the counts decide the placement (and the learned hot set)."""
        for spec in self.manifest.layers:
            group = self._group_of[spec.layer]
            for start in range(0, spec.num_experts, self.scratch_slots):
                targets = {}
                for e in range(start, min(start + self.scratch_slots, spec.num_experts)):
                    key = (spec.layer, e)
                    if key not in group.cache and group.cache.put(key, True, group.record_bytes):
                        targets[e] = group.pool.views(group.admit(key))
                if not targets:
                    continue
                try:
                    if self.dma is None:
                        for e, views in targets.items():
                            self.store.map_into(spec.layer, e, views, self.file_mappings)
                    else:
                        pending = self.store.start_reads(spec.layer, targets)
                        for e in targets:
                            pending.wait(e)
                except BaseException:
                    for e in targets:  # their slots hold no expert
                        group.cache.remove((spec.layer, e))
                    raise

    def _counted(self, routed: list[tuple[int, np.ndarray, bool]]) -> None:
        if self.dma is None:  # nothing to place, no bus to cross
            return
        for layer, experts, decoded in routed:
            crossed = self._group_of[layer].record_bytes * sum((layer, e) not in self.on_gpu for e in experts.tolist())
            self.mapped_bytes += crossed
            if decoded:
                self.decoded_layer_calls += 1
                self.decoded_mapped_bytes += crossed
        self._place()

    def _place(self) -> None:
        """Puts the most-routed experts on the GPU, up to the budget (ties: the lower layer and
        expert), and those no longer among them back in host memory."""
        if self.dma is None:
            return
        counted = []
        for group in self._groups:
            counted += [(-n, key, group) for key, n in group.cache.routing_counts().items() if n > 0]
        wanted: dict[tuple[int, int], SlotGroup] = {}
        room = self.budget_bytes
        for _, key, group in sorted(counted, key=lambda c: (c[0], c[1])):
            if group.record_bytes <= room:
                wanted[key] = group
                room -= group.record_bytes
        assert self.dma is not None
        for key in self.on_gpu - wanted.keys():
            self._move(self._group_of[key[0]], key, on_gpu=False)
        for key in wanted.keys() - self.on_gpu:
            self._move(wanted[key], key, on_gpu=True)
        if wanted.keys() != self.on_gpu:
            self.dma.sync()
            log.debug("%d experts on the GPU, %d moved", len(wanted), len(wanted.keys() ^ self.on_gpu))
        self.on_gpu = set(wanted)

    def _move(self, group: SlotGroup, key: tuple[int, int], on_gpu: bool) -> None:
        assert self.dma is not None
        for view in group.pool.views(group.slot_of[key]):
            self.dma.place(address_of(view), len(view), on_gpu)


class MappedExpertsError(EdgemoeError):
    pass


def _release_file_pages(mappings: filemap.FileMappings) -> None:
    """Anonymous pages back over the mapped ranges, once no queued MLX work reads them (mlx-lm
    queues the next token on its own stream before it hands out this one)."""
    if not mappings.ranges:
        return
    from mlx_lm.generate import generation_stream

    mx.synchronize()
    try:
        mx.synchronize(generation_stream)
    except RuntimeError:  # a stream this thread never used is made first, which can fail (a new thread)
        pass  # what mlx-lm queued and no one waits for any more: its result is dropped unread
    mappings.restore_all()


def open_mapped(store: ExpertStore, gpu_bytes: int, dma: Dma | None, policy: str = "lfu",
                scratch_slots: int = 32) -> MappedExperts:
    """Mapped experts, or a one-line error saying why this machine cannot have them."""
    backend = compute_backend()
    if dma is None and not (backend == "cpu" and filemap.can_map_files()):
        where = backend if backend != "cpu" else (f"cpu, on {sys.platform}" if not sys.platform.startswith("linux")
                                                  else "cpu, with an MLX built for a GPU")
        raise MappedExpertsError(
            f"--map-experts needs MLX's CUDA backend, or its CPU backend on Linux, and this machine computes on "
            f"{where}; drop --map-experts (--cache-mb sets how many experts stay in memory)"
        )
    if dma is None:
        needed, room = page_mappable(store.manifest)[1], filemap.max_map_count() - filemap.mapped_count()
        if needed > room - MAP_COUNT_HEADROOM:
            raise MappedExpertsError(
                f"--map-experts maps each expert tensor on its own: {needed} mappings, and this process may make "
                f"{room} more (vm.max_map_count {filemap.max_map_count()}); raise it (`sudo sysctl "
                f"vm.max_map_count={2 * (needed + filemap.mapped_count())}`) or drop --map-experts"
            )
    if dma is not None and policy != "lfu":
        raise MappedExpertsError(
            f"--map-experts places the experts by their routing counts, which --cache-policy {policy} does not "
            "keep; drop --cache-policy or --map-experts"
        )
    total, ram = store.manifest.total_expert_bytes, ram_bytes()
    if not fits_in_ram(total):
        raise MappedExpertsError(
            f"--map-experts keeps every expert in host memory, and the experts ({total / 2**30:.1f} GiB) pass "
            f"{MAPPED_RAM_SHARE:.0%} of this machine's RAM ({ram / 2**30:.1f} GiB); drop --map-experts"
        )
    return MappedExperts(store, gpu_bytes, dma, policy, scratch_slots)


def page_mappable(manifest: Manifest) -> tuple[int, int]:
    """The expert bytes the CPU can map rather than read, and the mappings that takes: one per
    tensor of whole pages at a page-aligned file offset (its slot is page-aligned too)."""
    total = count = 0
    for spec in manifest.layers:
        pages = [t for t in spec.tensors if t.nbytes % filemap.PAGE == 0]
        for entry in spec.experts:
            for t in pages:
                for seg in entry.segments:
                    if seg.record_offset <= t.offset and t.offset + t.nbytes <= seg.record_offset + seg.length:
                        if (seg.offset + t.offset - seg.record_offset) % filemap.PAGE == 0:
                            total, count = total + t.nbytes, count + 1
                        break
    return total, count


def fits_in_ram(expert_bytes: int) -> bool:
    return expert_bytes <= ram_bytes() * MAPPED_RAM_SHARE


def mapping_chosen(requested: bool | None, manifest: Manifest, cache_bytes: int, dma: Dma | None,
                   policy: str, nodes: bool = False, direct_io: bool = False) -> bool:
    """`requested`, or for None (auto) whether mapping can be had and pays: a cache smaller
    than the experts (else every layer is resident anyway), RAM for all of them, no nodes to
    use, and
    - on CUDA, a driver that places memory and LFU counts to place by. Auto also stays
      within half the GPU's memory: MLX counts the pools against it wherever their pages
      are, and past its limit nothing was measured (`--map-experts on` still tries);
    - on the CPU (Linux), reads through the page cache (`direct_io` False), which mapping
      keeps the experts in, and tensors laid out to be mapped (`MAPPED_MIN_SHARE`)."""
    if requested is not None:
        return requested
    total = manifest.total_expert_bytes
    # A budget under one expert is a mistake that streaming reports (`CacheBudgetError`): auto
    # leaves it to that, rather than hide it until the day the experts no longer fit.
    if not (not nodes and manifest.expert_bytes <= cache_bytes < total and fits_in_ram(total)):
        return False
    if dma is not None:
        if dma.can_place and policy == "lfu" and total <= array_memory_bytes() * MAPPED_GPU_SHARE:
            log.info("every expert (%.1f GiB) fits in RAM: kept there, mapped for the GPU, with %.1f GiB of them "
                     "on it (--map-experts off to stream them instead)", total / 2**30, cache_bytes / 2**30)
            return True
        return False
    if compute_backend() != "cpu" or not filemap.can_map_files() or direct_io:
        return False
    mappable_bytes, mappings = page_mappable(manifest)
    if mappable_bytes < MAPPED_MIN_SHARE * total:
        return False
    room = filemap.max_map_count() - filemap.mapped_count()
    if mappings > MAPPED_MAP_COUNT_SHARE * room:
        log.info("mapping the experts takes %d mappings, over half of the %d more this process may make "
                 "(vm.max_map_count): streaming them instead (raise it, e.g. `sudo sysctl vm.max_map_count=%d`, "
                 "to map them)", mappings, room, 2 * (2 * mappings + filemap.mapped_count()))
        return False
    log.info("every expert (%.1f GiB) fits in RAM: computed on the page cache's own pages, mapped over the "
             "slot pools (--map-experts off to stream them through a --cache-mb cache instead)", total / 2**30)
    return True
