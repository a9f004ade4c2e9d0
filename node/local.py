"""The device's own experts: slot pools in RAM, filled from the SSD store on a miss."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import CacheStats
from .errors import CacheBudgetError, EdgemoeError
from .manifest import Manifest
from .misses import Misses
from .pending import PendingReads
from .pool import SlotGroup, layout_key
from .prefetch import Prefetcher
from .staging import Dma, stage
from .store import ExpertStore

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    experts_from_cache: int = 0
    experts_from_ssd: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    # Guesses read into prefetch slots, and those a layer took (readahead's reads are the kernel's).
    prefetch_read_bytes: int = 0
    prefetch_used_bytes: int = 0


# Deferred routing choices kept before they are counted regardless (`defer_hits`): a caller
# that never settles (mlx-lm's own loop over `edgemoe.load`) waits once per this many layers.
MAX_UNSETTLED = 4096
# Tokens whose deferred choices `settle` lets gather before it reads them back in one
# transfer. On CUDA each read-back waits for the graph in flight (the next token's): counting
# every token cost 0.80 -> 0.94 of mlx-lm's tok/s on an H200, every 32 tokens still 0.87 ->
# 1.00 (.ci/gpu-profile-resident.py, 64-token runs). Counts then lag by up to this many
# tokens; only the learned hot set and the stats read them, and `settle(everything=True)`
# brings them up to date.
SETTLE_EVERY = 128


class LocalExperts:
    """Finds each requested expert a slot: a cache hit, a prefetched expert, or a miss
    read from SSD into a free (or evicted) cache slot, or into a scratch slot when
    the cache does not admit it."""

    def __init__(self, store: ExpertStore, cache_bytes: int, policy: str = "lfu", scratch_slots: int = 32,
                 prefetch_experts: int = 0, compute_as_read: bool = True, dma: Dma | None = None):
        self.store = store
        # Copies staged misses into their slots on CUDA (staging.py); closed with this object.
        self.dma = dma
        # Off, misses are read into their slots directly even with a `dma` (the bench's A/B).
        self.staged_reads = True
        self.compute_as_read = compute_as_read
        self.manifest: Manifest = store.manifest
        self.stats = FetchStats()
        self.policy = policy
        self.scratch_slots = scratch_slots
        # The router's picks per token to guess ahead of (`--prefetch`, prefetch.py), or 0.
        self.prefetch_experts = prefetch_experts
        self._prefetch = Prefetcher(store, self.stats, prefetch_experts)
        self._misses: Misses | None = None
        self._groups: list[SlotGroup] = []
        # Routing choices of layers computed from a resident table, counted once computed (`settle`).
        self._unsettled: list[tuple[int, mx.array, int]] = []
        self._epoch = 0
        # Off, resident layers take the host path too (the bench's A/B of the two).
        self.resident_tables = True
        # Whether the pools hold every expert, whatever the budget, and where from (mapped.py).
        self.holds_all = False
        self.mapped: str | None = None
        self._build(cache_bytes)

    def _build(self, cache_bytes: int) -> None:
        self._close_staging()
        by_layout: dict[tuple, list] = {}
        for spec in self.manifest.layers:
            by_layout.setdefault(layout_key(spec), []).append(spec)
        total = self.manifest.total_expert_bytes
        self._groups = []
        self._group_of: dict[int, SlotGroup] = {}
        self._num_experts = {spec.layer: spec.num_experts for spec in self.manifest.layers}
        # layer -> (its experts' arrays, the group's `departures` when they were made)
        self._resident: dict[int, tuple[dict[str, mx.array], int]] = {}
        for specs in by_layout.values():
            group_bytes = sum(s.record_bytes * s.num_experts for s in specs)
            share = group_bytes / total
            # Integer arithmetic: a budget of every expert gives each group all of its own
            # (a float share could come out a byte short, and the group would then evict).
            budget = group_bytes if self.holds_all else min(cache_bytes * group_bytes // total, group_bytes)
            if budget < specs[0].record_bytes:
                raise CacheBudgetError(
                    f"cache budget of {cache_bytes / 2**20:.3f} MB holds no expert of layer {specs[0].layer} "
                    f"(one expert is {specs[0].record_bytes / 2**20:.3f} MB); raise --cache-mb to at least "
                    f"{(specs[0].record_bytes / share + 2**20 - 1) // 2**20:.0f}"
                )
            # Readahead needs no slots of ours; a bank of them is for the other prefetch.
            banks = 0 if self._prefetch.advises else self.prefetch_width
            group = SlotGroup(specs, budget, self.scratch_slots, banks, self.policy)
            if self.dma is not None and not self.holds_all:  # pools of every expert never miss
                group.staging = stage(specs[0], self.scratch_slots, group.pool, self.dma)
            self._groups.append(group)
            for spec in specs:
                self._group_of[spec.layer] = group
        self.budget_bytes = cache_bytes

    def reset_cache(self, cache_bytes: int) -> None:
        """A fresh, empty cache of another budget (the pools are rebuilt)."""
        self.settle(everything=True)
        self._drain()
        self._prefetch.clear()
        self._build(cache_bytes)

    def arrays(self, layer: int) -> dict[str, mx.array]:
        """The pool tensors a layer's experts live in, indexed by slot."""
        return self._group_of[layer].pool.arrays

    @property
    def reads_ahead(self) -> bool:
        """Whether `--prefetch` has the kernel read guesses ahead (rather than into slots)."""
        return self.prefetch_width > 0 and self._prefetch.advises

    @property
    def prefetch_width(self) -> int:
        """How many experts to guess for a layer (0: no prefetch)."""
        return self._prefetch.width if self.prefetch_experts else 0

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Starts reading experts that `layer` will probably ask for next (prefetch.py).
        Called once the current layer's misses are read and its compute is queued: started
        with the misses, the guess delayed them (large experts, every token cold, direct
        I/O: 19.2 against 20.9 tok/s, medians of 5 alternated runs)."""
        if self.prefetch_experts:
            self._drain(prefetch=False)  # a failed layer's copies from a bank about to be refilled
            self._prefetch.start(self._group_of[layer], layer, experts)

    def set_io_mode(self, io_mode: str) -> None:
        """Reopens the expert files for direct or buffered reads, once no read is in flight."""
        self._drain()
        self.store.set_io_mode(io_mode)

    def _drain(self, prefetch: bool = True) -> None:
        """Waits for the reads in flight: misses a caller left unwaited (an error between
        `start_slots` and its waits), whose slots may be handed out again, and, unless
        `prefetch` is False, the prefetch's (it writes only into its own slots)."""
        misses, self._misses = self._misses, None
        if misses is not None:
            try:
                misses.wait_all()
            except EdgemoeError:
                pass
        if prefetch:
            self._prefetch.drain()

    def slots(self, layer: int, experts: list[int]) -> np.ndarray:
        """Slot ids holding `experts` (at most `scratch_slots` of them), reading misses in parallel."""
        slots, misses = self.start_slots(layer, experts)
        if misses is not None:
            misses.wait_all()
        return slots

    def start_slots(self, layer: int, experts: list[int]) -> tuple[np.ndarray, Misses | None]:
        """Like `slots`, but returns once the misses' reads are started: the slots of the
        experts in `Misses.experts` may be used only after `Misses.wait` for them."""
        if len(experts) > self.scratch_slots:
            raise ValueError(f"{len(experts)} experts at once; at most {self.scratch_slots}")
        self._drain(prefetch=False)
        group = self._group_of[layer]
        protect = {(layer, e) for e in experts}
        slots = np.empty(len(experts), dtype=np.uint32)
        targets: dict[int, list[memoryview]] = {}
        guessed: dict[int, tuple[PendingReads, int, int | None]] = {}  # right guesses (prefetch.py)
        staging = group.staging if self.staged_reads else None
        staged: dict[int, tuple[int, int]] = {}
        used_prefetch = 0
        scratch = group.scratch_start
        for i, e in enumerate(experts):
            key = (layer, e)
            if group.cache.get(key) is not None:
                slots[i] = group.slot_of[key]
                continue
            prefetched = self._prefetch.take(key)
            admitted = group.cache.put(key, True, group.record_bytes, protect)
            if admitted:
                slot = group.admit(key)
            if prefetched is not None:
                used_prefetch += 1
                prefetch_slot, reads = prefetched
                guessed[e] = (reads, prefetch_slot, slot if admitted else None)
                if not admitted:
                    slot = prefetch_slot
            else:
                if not admitted:
                    slot, scratch = scratch, scratch + 1
                if staging is not None:
                    staged[e] = (-1 if admitted else slot - group.scratch_start, slot)
                    targets[e] = []  # the record's views, once its record is known (below)
                else:
                    targets[e] = group.pool.views(slot)
            slots[i] = slot
        if staging is not None and staged:
            # A scratch slot's record is its own index, and cache slots take the records after
            # them in order: misses whose slots run on then run on in both, and land in one
            # copy per tensor (staging.py).
            record = scratch - group.scratch_start
            for e, (r, slot) in staged.items():
                if r < 0:
                    staged[e], record = (record, slot), record + 1
                targets[e] = staging.views(staged[e][0])
        self.stats.experts_from_cache += len(experts) - len(targets) - used_prefetch
        read_ahead = self._prefetch.read_ahead(layer, list(targets))
        if not targets and not guessed:
            return slots, None
        misses = Misses(group, layer, list(targets), staged, guessed)
        if targets:
            self.stats.experts_from_ssd += len(targets) - read_ahead
            try:
                misses.pending = self.store.start_reads(layer, targets)
            except BaseException:  # an interrupt too: start_reads settled its reads
                misses.forget()
                raise
        self._misses = misses
        misses.land_done()
        if not self.store.direct or not self.compute_as_read:
            # Through the page cache most reads are memory copies: computing the misses one
            # by one as they land would cost more than it overlaps (measured: 7% slower).
            misses.wait_all()
        return slots, misses

    def resident_arrays(self, layer: int) -> dict[str, mx.array] | None:
        """The experts of a layer whose every expert is cached for good (its group's cache
        holds all its layers' experts, so nothing is evicted), as mlx-lm's stacked
        `[num_experts, ...]` arrays: views of the layer's slots, which sit in expert order
        (`SlotGroup.keeps_all`). Such a layer computes without the host learning which
        experts were routed. None until then."""
        if not self.resident_tables:
            return None
        group = self._group_of[layer]
        built = self._resident.get(layer)
        if built is not None and built[1] == group.departures:
            return built[0]
        if not group.keeps_all or group.cached_in_layer.get(layer, 0) < self._num_experts[layer]:
            return None
        # A slot is admitted before its read lands: wait for reads in flight (a failed one
        # is forgotten, and that expert is no longer cached).
        self._drain()
        arrays = group.layer_arrays(layer)
        if arrays is None or group.cached_in_layer.get(layer, 0) < self._num_experts[layer]:
            return None
        self._resident[layer] = (arrays, group.departures)
        return arrays

    def defer_hits(self, layer: int, indices: mx.array) -> None:
        """Records a resident layer's routing choice, counted as cache hits by `settle`
        once computed: reading it now would wait for the layer's compute."""
        self._unsettled.append((layer, indices, self._epoch))
        if len(self._unsettled) > max(MAX_UNSETTLED, (SETTLE_EVERY + 2) * len(self._num_experts)):
            # Only what is surely computed: a loop (mlx-lm's) builds at most one token ahead,
            # and a token records each layer once.
            self._count(self._take(len(self._unsettled) - 2 * len(self._num_experts)))

    def settle(self, everything: bool = False) -> None:
        """Counts the deferred routing choices of the tokens already produced: those recorded
        before the previous call (a decode loop calls this once per token it receives, while
        the next token's graph, recorded since, may still be computing), once SETTLE_EVERY
        tokens' worth have gathered; or all of them (which waits for any graph still
        computing; the end of a generation, which also forgets the last prefetch guess). Call
        it from the generating thread."""
        if everything:
            done = self._take(len(self._unsettled))
            self._prefetch.forget_guess()
        elif self._unsettled and self._epoch - self._unsettled[0][2] >= SETTLE_EVERY:
            done = self._take(sum(1 for u in self._unsettled if u[2] < self._epoch))
        else:
            done = []
        self._epoch += 1
        self._count(done)

    def drop_unsettled(self) -> None:
        """A generation that failed midway: the deferred choices of the tokens it produced
        (computed) are counted, the rest forgotten (their graph may never be computed)."""
        done = self._take(sum(1 for u in self._unsettled if u[2] < self._epoch))
        self._unsettled = []
        try:
            self._count(done)
        except Exception as exc:  # the failure may be the device's own: counts are not worth a second error
            log.warning("routing counts of the failed generation were not kept: %s", exc)

    def _take(self, n: int) -> list[tuple[int, mx.array, int]]:
        """The `n` oldest deferred choices, removed (epochs only grow along the list)."""
        done, self._unsettled = self._unsettled[:n], self._unsettled[n:]
        return done

    def _count(self, done: list[tuple[int, mx.array, int]]) -> None:
        if not done:
            return
        # One read-back for them all (each read-back waits for whatever is computing).
        flat = np.array(mx.concatenate([indices.reshape(-1) for _, indices, _ in done]))
        routed: list[tuple[int, np.ndarray, bool]] = []  # (layer, experts counted, for one decoded token)
        start = 0
        for layer, indices, _ in done:
            chosen = flat[start : start + indices.size]
            start += indices.size
            # One row (a decoded token) names distinct experts; more rows may repeat them.
            decoded = indices.size == indices.shape[-1]
            routed.append((layer, chosen if decoded else np.unique(chosen), decoded))
        by_layer: dict[int, list[np.ndarray]] = {}
        for layer, experts, _ in routed:
            by_layer.setdefault(layer, []).append(experts)
        by_group: dict[int, tuple[SlotGroup, dict[tuple[int, int], int]]] = {}
        for layer, parts in by_layer.items():
            experts, counts = np.unique(np.concatenate(parts), return_counts=True)
            group = self._group_of[layer]
            keys = by_group.setdefault(id(group), (group, {}))[1]
            keys.update({(layer, e): c for e, c in zip(experts.tolist(), counts.tolist())})
            self.stats.experts_from_cache += int(counts.sum())
        for group, keys in by_group.values():
            group.cache.count_many(keys)
        self._counted(routed)

    def _counted(self, routed: list[tuple[int, np.ndarray, bool]]) -> None:
        """Called with each batch of resident layers' routing, once counted (mapped.py places by it)."""

    def note_routed(self, layer: int, experts: list[int]) -> None:
        """Counts experts the router chose that were computed elsewhere (on a node)."""
        cache = self._group_of[layer].cache
        for e in experts:
            cache.count((layer, e))

    def routing_counts(self) -> dict[tuple[int, int], int]:
        """How often each (layer, expert) was routed to, as the cache counts it (aged; a
        resident layer's choices once `settle`d)."""
        counts: dict[tuple[int, int], int] = {}
        for g in self._groups:
            counts.update(g.cache.routing_counts())
        return counts

    def __contains__(self, key: tuple[int, int]) -> bool:
        group = self._group_of.get(key[0])
        return group is not None and key in group.cache

    @property
    def cached_experts(self) -> int:
        return sum(len(g.cache) for g in self._groups)

    @property
    def cache_stats(self) -> CacheStats:
        total = CacheStats()
        for g in self._groups:
            for field in ("hits", "misses", "evictions", "rejected"):
                setattr(total, field, getattr(total, field) + getattr(g.cache.stats, field))
        return total

    @property
    def cache_bytes_used(self) -> int:
        return sum(g.cache.bytes_used for g in self._groups)

    def close(self) -> None:
        self.settle(everything=True)
        self._drain()
        self._close_staging()
        if self.dma is not None:
            self.dma.close()
        self.store.close()

    def _close_staging(self) -> None:
        for group in self._groups:
            if group.staging is not None:
                group.staging.close()
                group.staging = None

    def seed_counts(self, counts: dict[tuple[int, int], int]) -> None:
        """Starts the routing counts from a saved history (the learned hot set); pairs of
        layers this model does not have are ignored."""
        for group in self._groups:
            group.cache.seed_counts({key: c for key, c in counts.items() if self._group_of.get(key[0]) is group})

    def warm(self) -> int:
        """Reads the most-counted experts not yet cached into the cache's free slots, hottest
        first, through the miss path (so they count as misses); returns how many it read."""
        read = 0
        for group in self._groups:
            counts = group.cache.routing_counts()
            hottest = sorted((k for k in counts if k not in group.cache), key=lambda k: (-counts[k], k))
            by_layer: dict[int, list[int]] = {}
            for layer, expert in hottest[: group.free_slots]:
                by_layer.setdefault(layer, []).append(expert)
            for layer, experts in sorted(by_layer.items()):
                for i in range(0, len(experts), self.scratch_slots):
                    self.slots(layer, experts[i : i + self.scratch_slots])
                    read += len(experts[i : i + self.scratch_slots])
        return read
