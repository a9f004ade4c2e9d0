"""The device's own experts: RAM cache in front of the SSD store."""

from __future__ import annotations

from dataclasses import dataclass

from .cache import ExpertCache
from .compute import ExpertWeights, record_to_arrays
from .manifest import Manifest
from .store import ExpertStore


@dataclass
class FetchStats:
    experts_from_cache: int = 0
    experts_from_ssd: int = 0


class LocalExperts:
    """Hands out expert weights: cache hits at once, misses read in parallel."""

    def __init__(self, store: ExpertStore, cache: ExpertCache):
        self.store = store
        self.cache = cache
        self.manifest: Manifest = store.manifest
        self.stats = FetchStats()

    def fetch(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        found: dict[int, ExpertWeights] = {}
        missing = []
        for e in experts:
            value = self.cache.get((layer, e))
            if value is None:
                missing.append(e)
            else:
                found[e] = value
        self.stats.experts_from_cache += len(found)
        if missing:
            spec = self.manifest.layer(layer)
            records = self.store.read_many(layer, missing)
            for e, record in records.items():
                weights = record_to_arrays(spec, record)
                self.cache.put((layer, e), weights, spec.record_bytes)
                found[e] = weights
            self.stats.experts_from_ssd += len(missing)
        return found

    def close(self) -> None:
        self.store.close()
