"""The byte-budgeted expert cache: budget, counters, policies."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from edgemoe.node.cache import ExpertCache
from edgemoe.node.errors import CacheBudgetError, EdgemoeError

POLICIES = ("lfu", "lru")


def resident_bytes(cache: ExpertCache, sizes: dict) -> int:
    return sum(size for key, size in sizes.items() if key in cache)


def access(cache: ExpertCache, key, size: int) -> bool:
    """What the expert fetcher does: get, and on a miss put what it read. Returns whether it hit."""
    value = cache.get(key)
    if value is not None:
        assert value == ("value", key)
        return True
    cache.put(key, ("value", key), size)
    return False


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sizes", [(1000,), (1000, 1500, 4096), (7, 300, 1000, 2500)],
                         ids=["one-size", "three-sizes", "mixed"])
@pytest.mark.parametrize("seed", range(4))
def test_budget_never_exceeded_and_counters_right(policy, sizes, seed):
    rng = random.Random(seed)
    item = max(sizes)
    budget = item * rng.choice([1, 2, 5]) + rng.randrange(item)
    cache = ExpertCache(budget, item, policy=policy, aging_interval=rng.choice([None, 50]))
    keys = list(range(60))
    size_of = {k: rng.choice(sizes) for k in keys}
    # Skewed and uniform phases, so both admission and eviction are exercised.
    weights = [1.0 / (i + 1) for i in keys]
    hits = misses = 0
    for step in range(3000):
        key = rng.choices(keys, weights)[0] if step % 1000 < 600 else rng.choice(keys)
        was_in = key in cache
        hit = access(cache, key, size_of[key])
        assert hit == was_in
        hits += hit
        misses += not hit
        assert cache.bytes_used <= budget
        assert cache.bytes_used == resident_bytes(cache, size_of)
        assert len(cache) == sum(k in cache for k in keys)
    assert (cache.stats.hits, cache.stats.misses) == (hits, misses)
    assert cache.stats.hit_rate == pytest.approx(hits / (hits + misses))
    assert 0 < hits and 0 < misses


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_below_one_expert_raises(policy):
    with pytest.raises(CacheBudgetError) as err:
        ExpertCache(4095, 4096, policy=policy)
    assert isinstance(err.value, EdgemoeError)
    assert "--cache-mb" in str(err.value)
    ExpertCache(4096, 4096, policy=policy)


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="lfu"):
        ExpertCache(10, 1, policy="fifo")


@pytest.mark.parametrize("policy", POLICIES)
def test_item_larger_than_budget_is_not_cached(policy):
    cache = ExpertCache(100, 50, policy=policy)
    assert access(cache, "a", 50) is False
    assert cache.put("big", "x", 101) is False
    assert "big" not in cache
    assert "a" in cache and cache.bytes_used == 50


@pytest.mark.parametrize("policy", POLICIES)
def test_put_of_a_resident_key_changes_nothing(policy):
    cache = ExpertCache(100, 50, policy=policy)
    access(cache, "a", 50)
    assert cache.put("a", ("value", "a"), 50) is True
    assert cache.bytes_used == 50 and len(cache) == 1


@pytest.mark.parametrize("policy", POLICIES)
def test_clear_empties_and_cache_keeps_working(policy):
    cache = ExpertCache(200, 50, policy=policy)
    for k in "abcd":
        access(cache, k, 50)
    cache.clear()
    assert len(cache) == 0 and cache.bytes_used == 0
    assert cache.get("a") is None
    for step in range(40):
        access(cache, "abcdefg"[step % 7], 50)
        assert cache.bytes_used <= 200
    assert cache.bytes_used == 50 * len(cache)


def test_get_returns_the_stored_object():
    cache = ExpertCache(100, 10)
    value = {"w": np.arange(3)}
    cache.get("k")
    assert cache.put("k", value, 10)
    assert cache.get("k") is value


def test_lru_evicts_the_least_recently_used():
    cache = ExpertCache(300, 100, policy="lru")
    for k in "abc":
        access(cache, k, 100)
    assert cache.get("a") is not None  # b is now the least recently used
    access(cache, "d", 100)
    assert "b" not in cache
    assert all(k in cache for k in "acd")
    assert cache.stats.evictions == 1


def test_lfu_keeps_frequent_experts_against_a_scan():
    cache = ExpertCache(300, 100, policy="lfu")
    for _ in range(5):
        for k in "abc":
            access(cache, k, 100)
    # A scan of once-used experts must not flush the hot ones.
    for k in "defghij":
        assert access(cache, k, 100) is False
    assert all(k in cache for k in "abc")
    assert cache.stats.rejected == 7
    assert cache.bytes_used == 300


def test_lfu_evicts_least_frequent_then_least_recent():
    cache = ExpertCache(300, 100, policy="lfu")
    for k, n in (("a", 3), ("b", 1), ("c", 1)):
        for _ in range(n):
            access(cache, k, 100)
    access(cache, "b", 100)  # b: 2, c: 1
    access(cache, "d", 100)  # d: 1 ties c (1) -> c, the least frequent, goes
    assert "c" not in cache
    assert all(k in cache for k in "abd")


def test_lfu_follows_a_change_of_topic():
    """Counts age, so a new hot set displaces an old one that is no longer used."""
    cache = ExpertCache(400, 100, policy="lfu", aging_interval=64)
    old, new = "abcd", "wxyz"
    for _ in range(50):
        for k in old:
            access(cache, k, 100)
    for _ in range(200):
        for k in new:
            access(cache, k, 100)
    assert all(k in cache for k in new)
    hits_before = cache.stats.hits
    for k in new * 10:
        access(cache, k, 100)
    assert cache.stats.hits - hits_before == 40


def moe_trace(seed: int, layers: int, experts: int, k: int, tokens: int, topic_tokens: int | None = None):
    """(layer, expert) accesses shaped like MoE routing: each token picks K distinct experts
    in every layer, with a Zipf-like preference that differs per layer."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, experts + 1) ** 1.1
    zipf /= zipf.sum()
    order = [rng.permutation(experts) for _ in range(layers)]
    trace = []
    for t in range(tokens):
        if topic_tokens and t and t % topic_tokens == 0:
            order = [rng.permutation(experts) for _ in range(layers)]
        for layer in range(layers):
            chosen = rng.choice(experts, size=k, replace=False, p=zipf)
            trace.extend((layer, int(order[layer][e])) for e in chosen)
    return trace


def hit_rate(policy: str, trace, budget_items: int) -> float:
    cache = ExpertCache(budget_items * 1000, 1000, policy=policy)
    for key in trace:
        access(cache, key, 1000)
    assert cache.bytes_used <= budget_items * 1000
    return cache.stats.hit_rate


@pytest.mark.parametrize("seed", range(3))
def test_lfu_beats_lru_on_skewed_moe_routing(seed):
    layers, experts, k = 8, 64, 8
    trace = moe_trace(seed, layers, experts, k, tokens=400)
    budget = layers * experts // 8
    lfu, lru = hit_rate("lfu", trace, budget), hit_rate("lru", trace, budget)
    assert lfu > lru, (lfu, lru)


def test_lfu_not_worse_than_lru_when_the_topic_changes():
    layers, experts, k = 8, 64, 8
    trace = moe_trace(7, layers, experts, k, tokens=1200, topic_tokens=300)
    budget = layers * experts // 8
    assert hit_rate("lfu", trace, budget) >= hit_rate("lru", trace, budget)


@pytest.mark.parametrize("policy", POLICIES)
def test_concurrent_use_keeps_budget_and_counts(policy):
    budget, item = 20 * 100, 100
    cache = ExpertCache(budget, item, policy=policy)
    errors = []
    per_thread = 3000

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(per_thread):
                key = min(int(rng.paretovariate(1.0)), 80)
                access(cache, key, item)
                if cache.bytes_used > budget:
                    errors.append(cache.bytes_used)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.stats.hits + cache.stats.misses == 4 * per_thread
    assert cache.bytes_used == item * len(cache) <= budget


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_count_many_counts_as_that_many_gets(policy):
    """A resident layer's deferred choices are counted in bulk: the same counts, hits,
    misses and eviction order as one `get` per access."""
    accesses = {"a": 4, "b": 1, "c": 2, "gone": 3}
    bulk, one_by_one = (ExpertCache(3, 1, policy) for _ in range(2))
    for cache in (bulk, one_by_one):
        for key in "abc":
            cache.put(key, key, 1)
    bulk.count_many(accesses)
    for key, count in accesses.items():
        for _ in range(count):
            one_by_one.get(key)
    assert bulk.routing_counts() == one_by_one.routing_counts()
    assert (bulk.stats.hits, bulk.stats.misses) == (one_by_one.stats.hits, one_by_one.stats.misses) == (7, 3)
    assert list(bulk._items) == list(one_by_one._items)
    # The first to go is the least counted (LFU: b) or least recent (LRU: a) key.
    for cache in (bulk, one_by_one):
        cache.count_many({"new": 9})
        assert cache.put("new", "new", 1)
    assert set(bulk._items) == set(one_by_one._items) == {"new"} | (set("ac") if policy == "lfu" else set("bc"))


def test_count_many_ages_every_key_of_a_batch_alike():
    cache = ExpertCache(3, 1, "lfu", aging_interval=8)
    for key in "abc":
        cache.put(key, key, 1)
    for _ in range(4):
        cache.get("a")
    # The batch's 6 accesses reach the aging point at 8: the counts before it are halved,
    # and b and c, counted in the same batch, come out the same.
    cache.count_many({"b": 3, "c": 3})
    assert cache.routing_counts() == {"a": 2, "b": 3, "c": 3}
