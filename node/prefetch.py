"""`--prefetch`: the next layer's likely experts read early, while this layer computes.

Where the expert files are read through the page cache (and the OS has posix_fadvise), the
kernel is asked to read them ahead (WILLNEED) and nothing else is done: the next layer's
misses then find them there, and a wrong guess costs only disk time, never a wait or a slot.
Elsewhere (direct I/O; macOS) they are read into a bank of spare slots. The next layer takes
the right guesses as misses already being read: its other misses are read meanwhile, and it
waits for a guess only to compute it. A wrong guess is never waited for until its bank is
filled again, two layers later.
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
# Guesses per layer into slots where records are larger than that: a record then takes the
# disk's bandwidth, and a wrong guess delays the next layer's own misses by a whole record.
SLOT_GUESSES_LARGE = 1


def prefetch_chosen(store: ExpertStore, slots_allowed: bool = True) -> bool:
    """`--prefetch auto`: where it pays (above), readahead of small experts, or the top guess
    of large experts into slots when they are read around the page cache (`slots_allowed`:
    the loader's say, which keeps slots off a GPU); else none."""
    largest = max(spec.record_bytes for spec in store.manifest.layers)
    if store.can_advise and largest <= READAHEAD_MAX_RECORD_BYTES:
        log.info("--prefetch auto: the kernel reads each next layer's likely experts ahead")
        return True
    if slots_allowed and store.any_direct and largest > READAHEAD_MAX_RECORD_BYTES:
        log.info("--prefetch auto: each next layer's likeliest expert is read ahead into a spare slot")
        return True
    if store.can_advise:
        why = f"experts of {largest / 2**20:.2f} MiB are read at the disk's bandwidth, not its latency"
    elif not store.any_direct:
        why = "no posix_fadvise here"
    elif not slots_allowed:
        why = "no prefetch into slots on this device"
    else:
        why = "small experts read around the page cache"
    log.info("--prefetch auto: off (%s)", why)
    return False


class Prefetcher:
    def __init__(self, store: ExpertStore, stats: FetchStats, experts_per_token: int):
        self.store = store
        self.stats = stats
        self.experts_per_token = experts_per_token
        # (layer, expert) -> prefetch slot, the reads filling it, and its bytes: the last guess, to take.
        self.in_slots: dict[tuple[int, int], tuple[int, PendingReads, int]] = {}
        # Each group's banks' reads, taken or not: waited for before a bank is filled again.
        self._bank_reads: dict[tuple[int, int], list[PendingReads]] = {}
        # What the kernel was last asked to read ahead, for which layer, to count the misses it served.
        self.advised: set[tuple[int, int]] = set()
        self.advised_layer: int | None = None
        # The way is fixed at load: the pools are built for it (banks of slots or none), and
        # the loader allows only readahead on a GPU.
        self.advises = store.can_advise
        self._large = max(spec.record_bytes for spec in store.manifest.layers) > READAHEAD_MAX_RECORD_BYTES

    @property
    def width(self) -> int:
        """How many experts to guess for a layer."""
        if self.advises:
            return self.experts_per_token * ADVISED_PER_PICK
        return min(self.experts_per_token, SLOT_GUESSES_LARGE) if self._large else self.experts_per_token

    def start(self, group: SlotGroup, layer: int, experts: list[int]) -> None:
        """Starts reading `experts` of `layer`: the kernel's readahead, or into the bank of
        slots not filled last (once that bank's reads are done)."""
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
        self._drain_bank((id(group), group.bank))
        first = group.prefetch_start + group.bank * group.prefetch_slots
        targets = {e: group.pool.views(first + i) for i, e in enumerate(wanted[: group.prefetch_slots])}
        if not targets:
            return
        # Started from this thread: on 2 cores a hand-off to a prefetch thread cost more
        # than it overlapped (README). Direct reads, and records not in the page cache, go
        # to the I/O threads: here, each would hold this thread for the disk's latency.
        try:
            pending = self.store.start_reads(layer, targets, inline=not self.store.any_direct, waited=False)
        except EdgemoeError as exc:
            log.debug("prefetch into layer %d not started: %s", layer, exc)
            return
        for i, e in enumerate(targets):
            self.in_slots[(layer, e)] = (first + i, pending, group.record_bytes)
        self._bank_reads[(id(group), group.bank)] = [pending]
        self.stats.prefetched += len(targets)
        self.stats.prefetch_read_bytes += len(targets) * group.record_bytes

    def take(self, key: tuple[int, int]) -> tuple[int, PendingReads] | None:
        """The prefetch slot holding `key`, and its read, which may still be in flight: it is
        in place once `PendingReads.wait(expert)` returns. Counted as used; None if no slot
        holds it."""
        taken = self.in_slots.pop(key, None)
        if taken is None:
            return None
        self.stats.prefetch_used += 1
        self.stats.prefetch_used_bytes += taken[2]
        return taken[0], taken[1]

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
        """Waits for the slot reads in flight; a failed guess is forgotten, so that a real
        read of that expert reports the error if it is ever needed."""
        for key, (_, pending, _) in list(self.in_slots.items()):
            try:
                pending.wait(key[1])
            except EdgemoeError:
                del self.in_slots[key]
        for bank in list(self._bank_reads):
            self._drain_bank(bank)

    def _drain_bank(self, bank: tuple[int, int]) -> None:
        """Waits for every read into a group's bank, whatever its outcome: its slots are then
        free to fill (a failed read taken by a layer failed that layer, which reported it)."""
        for pending in self._bank_reads.pop(bank, []):
            pending.settle()

    def forget_guess(self) -> None:
        """The end of a generation: a guess its last layers did not ask about is not carried into the next."""
        self.advised.clear()
        self.advised_layer = None

    def clear(self) -> None:
        self.drain()
        self.in_slots.clear()
        self.forget_guess()
