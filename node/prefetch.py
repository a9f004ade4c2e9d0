"""`--prefetch`: the next layer's likely experts read early, while this layer computes.

Where the expert files are read through the page cache (and the OS has posix_fadvise), the
kernel is asked to read them ahead (WILLNEED) and nothing else is done: the next layer's
misses then find them there, and a wrong guess costs only disk time, never a wait or a slot.
Elsewhere (direct I/O; macOS) they are read into a bank of spare slots, which the next layer
waits for before it touches any slot.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import EdgemoeError
from .pending import PendingReads
from .pool import SlotGroup
from .store import ExpertStore

if TYPE_CHECKING:
    from .local import FetchStats

log = logging.getLogger(__name__)

# Guesses per expert the router picks, when a guess costs only disk time (readahead). On the
# random demo model the next router's top K on this layer's input holds 72% of the experts it
# picks, its top 2K 93%; every token cold there, guessing 2K gave 89.3 tok/s against 82.0
# for K (12: 86.7-89.9, 20: 88.0, 24: 84.7; the disk is then busy with wrong guesses).
ADVISED_PER_PICK = 2
# `--prefetch auto` reads ahead only records this small, whose reads wait on the disk's
# latency rather than its bandwidth (100 us x 1.5 GB/s is 150 KB here). Every token cold:
# 72 KiB experts 90.4 against 70.3 tok/s (page cache warm: 100.8 against 102.4); 6 MiB
# experts 9.2 against 12.8 (buffered; the disk is the bound, and a wrong guess takes its time).
READAHEAD_MAX_RECORD_BYTES = 256 * 1024


def prefetch_chosen(store: ExpertStore) -> bool:
    """`--prefetch auto`: readahead where it pays (above), else none."""
    largest = max(spec.record_bytes for spec in store.manifest.layers)
    if not store.can_advise:
        why = "the expert files are read around the page cache" if store.any_direct else "no posix_fadvise here"
    elif largest > READAHEAD_MAX_RECORD_BYTES:
        why = f"experts of {largest / 2**20:.2f} MiB are read at the disk's bandwidth, not its latency"
    else:
        log.info("--prefetch auto: the kernel reads each next layer's likely experts ahead")
        return True
    log.info("--prefetch auto: off (%s)", why)
    return False


class Prefetcher:
    def __init__(self, store: ExpertStore, stats: FetchStats, experts_per_token: int):
        self.store = store
        self.stats = stats
        self.experts_per_token = experts_per_token
        # (layer, expert) -> prefetch slot, and the reads filling it.
        self.in_slots: dict[tuple[int, int], tuple[int, PendingReads]] = {}
        # What the kernel was last asked to read ahead, for which layer, to count the misses it served.
        self.advised: set[tuple[int, int]] = set()
        self.advised_layer: int | None = None
        # The way is fixed at load: the pools are built for it (banks of slots or none), and
        # the loader allows only readahead on a GPU.
        self.advises = store.can_advise

    @property
    def width(self) -> int:
        """How many experts to guess for a layer."""
        return self.experts_per_token * (ADVISED_PER_PICK if self.advises else 1)

    def start(self, group: SlotGroup, layer: int, experts: list[int]) -> None:
        """Starts reading `experts` of `layer` (the caller has drained the slot bank's reads)."""
        wanted = [e for e in experts if (layer, e) not in group.cache]
        if self.advises:
            try:
                self.store.advise(layer, wanted)
            except OSError as exc:
                # A hint must never cost a token: no more guesses (width 0), and a warning.
                log.warning("--prefetch off: the kernel refused to read ahead (%s)", exc.strerror or exc)
                self.experts_per_token = 0
                self.advised.clear()
                return
            self.advised = {(layer, e) for e in wanted}
            self.advised_layer = layer
            self.stats.prefetched += len(wanted)
            return
        self.in_slots.clear()
        if not group.prefetch_slots:
            return
        group.bank ^= 1
        first = group.prefetch_start + group.bank * group.prefetch_slots
        targets = {e: group.pool.views(first + i) for i, e in enumerate(wanted[: group.prefetch_slots])}
        if not targets:
            return
        # Started from this thread: on 2 cores a hand-off to a prefetch thread cost more
        # than it overlapped (README). Direct reads go to the I/O threads: inline, each
        # would hold this thread for the disk's latency.
        try:
            pending = self.store.start_reads(layer, targets, inline=not self.store.any_direct)
        except EdgemoeError as exc:
            log.debug("prefetch into layer %d not started: %s", layer, exc)
            return
        for i, e in enumerate(targets):
            self.in_slots[(layer, e)] = (first + i, pending)
        self.stats.prefetched += len(targets)

    def take(self, key: tuple[int, int]) -> int | None:
        """The prefetch slot holding `key` (read, and verified once `drain` returns), counted
        as used; None if no slot holds it."""
        taken = self.in_slots.pop(key, None)
        if taken is None:
            return None
        self.stats.prefetch_used += 1
        return taken[0]

    def read_ahead(self, layer: int, misses: list[int]) -> int:
        """How many of these misses the kernel was asked to read ahead (counted as used: they
        are read as any miss, from the page cache if the readahead is in). The guess was for
        the next layer to ask: whatever it did not ask for was wrong, and is forgotten once that
        layer has asked (another layer's call, such as a node's fallback in this one, keeps it)."""
        if layer != self.advised_layer:
            return 0
        used = sum((layer, e) in self.advised for e in misses)
        self.advised.clear()
        self.advised_layer = None
        self.stats.prefetch_used += used
        return used

    def drain(self) -> None:
        """Waits for the slot reads in flight; a failed one is forgotten, so that a real
        read of that expert reports the error if it is ever needed."""
        for key, (_, pending) in list(self.in_slots.items()):
            try:
                pending.wait(key[1])
            except EdgemoeError:
                del self.in_slots[key]

    def forget_guess(self) -> None:
        """The end of a generation: a guess its last layers did not ask about is not carried into the next."""
        self.advised.clear()
        self.advised_layer = None

    def clear(self) -> None:
        self.in_slots.clear()
        self.forget_guess()
