"""A RAM cache of expert weights with a byte budget it never exceeds.

Two policies: `lru`, and `lfu` (the default): evict the least-frequently used
resident (ties: least recently used), and admit a new expert only if it has been
asked for at least as often as the one it would evict. MoE routing is skewed and
every token touches every layer, so under LRU a working set slightly larger than
the budget evicts each expert just before it is needed again; counting
frequency keeps the hot experts resident. Counts are halved periodically so the
cache follows a change of topic.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import CacheBudgetError

POLICIES = ("lfu", "lru")
# Any hashable key: edgemoe caches (layer, expert) pairs.
K = TypeVar("K", bound=Hashable)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertCache(Generic[K]):
    def __init__(
        self,
        budget_bytes: int,
        item_bytes: int,
        policy: str = "lfu",
        aging_interval: int | None = None,
        on_evict: Callable[[K, Any], None] | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
        if budget_bytes < item_bytes:
            raise CacheBudgetError(
                f"cache budget of {budget_bytes / 2**20:.3f} MB holds no expert "
                f"(one expert is {item_bytes / 2**20:.3f} MB); raise --cache-mb to at least "
                f"{(item_bytes + 2**20 - 1) // 2**20}"
            )
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.stats = CacheStats()
        self.bytes_used = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[K, tuple[Any, int]] = OrderedDict()
        self._counts: dict[K, int] = {}
        self._last: dict[K, int] = {}
        self._heap: list[tuple[int, int, K]] = []
        self._tick = 0
        self._on_evict = on_evict
        capacity = max(1, budget_bytes // max(1, item_bytes))
        self._aging_interval = aging_interval or 16 * capacity + 1024

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> Any | None:
        """Returns the cached value or None, and counts the access."""
        with self._lock:
            return self._get(key)

    def count_many(self, counts: dict[K, int]) -> None:
        """`counts[key]` accesses of each key at once (a resident layer's deferred choices,
        thousands at a time), counted as `get` counts them. Under LFU the counts are halved
        first, as often as the batch's accesses reach an aging point: every key of the
        batch is aged alike (counted key after key, the keys first in line would lose
        their share to a halving the others escape). The eviction order is rebuilt once."""
        with self._lock:
            for key, count in counts.items():
                if key in self._items:
                    self.stats.hits += count
                    if self.policy == "lru":  # as `_get`: a hit is recency, not a count
                        self._items.move_to_end(key)
                else:
                    self.stats.misses += count
            counted = {k: c for k, c in counts.items() if self.policy == "lfu" or k not in self._items}
            total = sum(counted.values())
            interval = self._aging_interval
            for _ in range((self._tick + total) // interval - self._tick // interval):
                self._counts = {k: c // 2 for k, c in self._counts.items() if c // 2 or k in self._items}
            for key, count in counted.items():
                self._tick += count
                self._counts[key] = self._counts.get(key, 0) + count
                self._last[key] = self._tick
            if self.policy == "lfu":
                self._heap = [(self._counts.get(k, 0), self._last.get(k, 0), k) for k in self._items]
                heapq.heapify(self._heap)

    def _get(self, key: K) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self._count_access(key)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        if self.policy == "lru":
            self._items.move_to_end(key)
        elif not self._count_access(key):
            self._push(key)
        return item[0]

    def count(self, key: K) -> None:
        """Counts an access served without this cache (a node computed the expert), so that
        the counts, and `routing_counts`, follow everything the router chose."""
        with self._lock:
            if not self._count_access(key) and key in self._items and self.policy == "lfu":
                self._push(key)

    def routing_counts(self) -> dict[K, int]:
        """A snapshot of the access counts (halved as they age, like the LFU policy's)."""
        with self._lock:
            return dict(self._counts)

    def put(self, key: K, value: Any, nbytes: int, protect: Collection[K] = ()) -> bool:
        """Caches the value if the policy admits it; returns whether it did.

        Keys in `protect` (the experts a layer is computing with right now) are
        never evicted to make room.
        """
        with self._lock:
            if key in self._items or nbytes > self.budget_bytes:
                return key in self._items
            victims: list[K] = []
            skipped: list[K] = []
            free = self.budget_bytes - self.bytes_used
            candidates = self._eviction_order()
            while free < nbytes:
                victim = next(candidates, None)
                if victim is not None and victim in protect:
                    skipped.append(victim)
                    continue
                if victim is None or (
                    self.policy == "lfu" and self._counts.get(victim, 0) > self._counts.get(key, 0)
                ):
                    self.stats.rejected += 1
                    self._restore(victims + skipped + ([victim] if victim is not None else []))
                    return False
                victims.append(victim)
                free += self._items[victim][1]
            self._restore(skipped)
            for victim in victims:
                evicted, size = self._items.pop(victim)
                self.bytes_used -= size
                self.stats.evictions += 1
                if self._on_evict is not None:
                    self._on_evict(victim, evicted)
            self._items[key] = (value, nbytes)
            self.bytes_used += nbytes
            if self.policy == "lfu":
                self._push(key)
            return True

    def remove(self, key: K) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.bytes_used -= item[1]
                if self._on_evict is not None:
                    self._on_evict(key, item[0])

    def clear(self) -> None:
        with self._lock:
            if self._on_evict is not None:
                for key, (value, _) in self._items.items():
                    self._on_evict(key, value)
            self._items.clear()
            self._heap.clear()
            self.bytes_used = 0

    def _count_access(self, key: K) -> bool:
        """Counts one access; returns True if that aged the counts and rebuilt the heap."""
        self._tick += 1
        self._counts[key] = self._counts.get(key, 0) + 1
        self._last[key] = self._tick
        if self._tick % self._aging_interval == 0:
            self._counts = {k: c // 2 for k, c in self._counts.items() if c // 2 or k in self._items}
            self._heap = [(self._counts.get(k, 0), self._last.get(k, 0), k) for k in self._items]
            heapq.heapify(self._heap)
            return True
        return False

    def _push(self, key: K) -> None:
        heapq.heappush(self._heap, (self._counts.get(key, 0), self._last.get(key, 0), key))
        if len(self._heap) > 4 * len(self._items) + 64:
            self._heap = [(self._counts.get(k, 0), self._last.get(k, 0), k) for k in self._items]
            heapq.heapify(self._heap)

    def _restore(self, keys: list[K]) -> None:
        """Puts back eviction candidates that were looked at but not evicted."""
        if self.policy == "lfu":
            for key in keys:
                self._push(key)

    def _eviction_order(self):
        if self.policy == "lru":
            yield from list(self._items)
            return
        while self._heap:
            count, last, key = heapq.heappop(self._heap)
            # Entries go stale when a key is touched again; only the newest counts.
            if key in self._items and count == self._counts.get(key, 0) and last == self._last.get(key, 0):
                yield key

    def seed_counts(self, counts: dict[K, int]) -> None:
        """Adds saved access counts (a learned hot set, from earlier runs) to this cache's,
        so that its policy and `routing_counts` start from that history."""
        with self._lock:
            for key, count in counts.items():
                if count > 0:
                    self._counts[key] = self._counts.get(key, 0) + count
            if self.policy == "lfu":
                self._heap = [(self._counts.get(k, 0), self._last.get(k, 0), k) for k in self._items]
                heapq.heapify(self._heap)
