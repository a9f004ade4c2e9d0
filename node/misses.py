"""A layer's misses being read into their slots (`LocalExperts.start_slots`): waited for
one by one as they land, or all at once; staged ones are copied into their slots then, and
right guesses still being read into prefetch slots (prefetch.py) into their cache slots."""

from __future__ import annotations

from .errors import EdgemoeError
from .pending import PendingReads
from .pool import SlotGroup


class Misses:
    """A layer's misses being read into their slots (see `LocalExperts.start_slots`)."""

    def __init__(self, group: SlotGroup, layer: int, experts: list[int], staged: dict[int, tuple[int, int]],
                 prefetched: dict[int, tuple[PendingReads, int, int | None]] | None = None):
        self.group = group
        self.layer = layer
        self.pending: PendingReads | None = None
        # expert -> (its staging record, its slot), until copied there
        self._staged = staged
        # expert -> (the prefetch's read, its prefetch slot, the cache slot to copy it into or
        # None), until waited for
        self._prefetched = prefetched or {}
        self._experts = experts + list(self._prefetched)

    @property
    def experts(self) -> list[int]:
        """The misses still to wait for, in read order (guesses first: their reads began earlier)."""
        return list(self._prefetched) + (self.pending.experts if self.pending is not None else [])

    def wait(self, expert: int) -> None:
        if expert in self._prefetched:
            self._take_prefetched(expert)
            return
        assert self.pending is not None  # set by start_slots before it hands the misses out
        try:
            self.pending.wait(expert)
        except EdgemoeError:
            self.forget()
            raise
        self._land([expert])

    def _take_prefetched(self, expert: int) -> None:
        reads, prefetch_slot, cache_slot = self._prefetched[expert]
        try:
            reads.wait(expert)
            if cache_slot is not None:
                self.group.copy_slot(prefetch_slot, cache_slot)
        except BaseException:
            # Anything that stops the copy (a failed read, an interrupt) leaves the cache slot
            # with another expert's bytes: forgotten, once the layer's own reads, which write
            # into its cache and scratch slots, are done.
            del self._prefetched[expert]
            if self.pending is not None:
                self.pending.settle()
            self.forget()
            raise
        del self._prefetched[expert]

    def wait_all(self) -> None:
        for e in list(self._prefetched):
            self._take_prefetched(e)
        if self.pending is None:
            return
        if self.group.staging is not None and self._staged:
            self._land_as_read()
            return
        try:
            self.pending.wait_all()
        except EdgemoeError:
            self.forget()
            raise

    def _land_as_read(self) -> None:
        """Waits for the reads in order, queuing each expert's copy as soon as its read is in
        (with any later ones already in: one copy per run, staging.py), so the copies overlap
        the reads still in flight; returns once every copy is done."""
        assert self.pending is not None and self.group.staging is not None
        staging = self.group.staging
        pending = self.pending.experts
        try:
            i = 0
            while i < len(pending):
                batch = [pending[i]]
                i += 1
                while i < len(pending) and self.pending.ready(pending[i]):
                    batch.append(pending[i])
                    i += 1
                for e in batch:
                    self.pending.wait(e)
                staging.copy([self._staged.pop(e) for e in batch if e in self._staged])
            staging.dma.sync()
        except BaseException:
            # Reads still in flight write into the staging records, and queued copies read
            # them: both finish before the records can be handed out again. A slot whose
            # read or copy did not land holds another expert's bytes.
            self.pending.settle()
            try:
                staging.dma.sync()
            except EdgemoeError:
                pass
            self.forget()
            raise

    def land_done(self) -> None:
        """Copies the staged experts already read (a small batch is read before `start_reads`
        returns): no `wait` would see them."""
        if self.pending is None:
            return
        self._land([e for e in self._staged if e not in self.pending.experts])

    def _land(self, experts: list[int]) -> None:
        """Copies staged experts into their slots, and returns once they are there."""
        staging = self.group.staging
        landing = [self._staged.pop(e) for e in experts if e in self._staged]
        if staging is None or not landing:
            return
        try:
            staging.copy(landing)
            staging.dma.sync()
        except BaseException:
            # A slot whose copy did not land holds another expert's bytes.
            self.forget()
            raise

    def forget(self) -> None:
        """Slots of a failed read hold bad bytes: they must never serve a hit."""
        for e in self._experts:
            if (self.layer, e) in self.group.slot_of:
                self.group.cache.remove((self.layer, e))
