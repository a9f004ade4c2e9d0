"""Expert reads in flight (`ExpertStore.start_reads`): waited for one by one, verified on
their first read."""

from __future__ import annotations

from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import ExpertStore


class PendingReads:
    """Expert reads in flight: `wait(e)` returns once expert e's bytes are in place and,
    on its first read, verified. On an error every chunk is waited for first (they
    write into the caller's buffers), then the error is raised."""

    def __init__(self, store: ExpertStore, layer: int, pieces: dict, start: float):
        self.store = store
        self.layer = layer
        self.pieces = pieces
        self.chunks: dict[int, list[Future]] = {}
        self._start = start
        self._done: set[int] = set()

    @property
    def experts(self) -> list[int]:
        """The experts still to wait for, in read order."""
        return [e for e in self.pieces if e not in self._done]

    def finished(self, at: float) -> None:
        """Called once, when the last chunk is read, under the store's lock."""
        self.store.stats.read_seconds += at - self._start

    def ready(self, expert: int) -> bool:
        """Whether `wait(expert)` would return without waiting for a read."""
        return expert in self._done or all(f.done() for f in self.chunks.get(expert, ()))

    def wait(self, expert: int) -> None:
        if expert in self._done:
            return
        chunks = self.chunks.get(expert)
        if chunks:  # none for a batch read inline
            wait(chunks)
            if any(f.exception() is not None for f in chunks):
                self.wait_all()
        try:
            self.store.verify_first_read(self.layer, expert, self.pieces[expert])
        except BaseException:
            self.settle()  # the other reads write into the caller's buffers
            raise
        self._done.add(expert)

    def settle(self) -> None:
        """Returns once no read of these is still in flight (whatever their outcome)."""
        every = [f for chunks in self.chunks.values() for f in chunks]
        if every:
            wait(every)

    def wait_all(self) -> None:
        self.settle()
        for f in (f for chunks in self.chunks.values() for f in chunks):
            f.result()
        for e in self.experts:
            self.wait(e)
