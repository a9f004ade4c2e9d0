"""Placement of experts on nodes (`place_experts`) on synthetic counts and capacities, and the
routing counts it reads from the coordinator's cache."""

from __future__ import annotations

import random

from edgemoe.coordinator.cluster import keep_local, place_experts
from edgemoe.node.cache import ExpertCache

RECORD = 100  # bytes of one expert record in these tests


def keys(layers: int, experts: int) -> list[tuple[int, int]]:
    return [(layer, e) for layer in range(layers) for e in range(experts)]


def sizes(layers: int, record: int = RECORD) -> dict[int, int]:
    return {layer: record for layer in range(layers)}


def placed(plan: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    return [key for node in plan for key in node]


def test_most_routed_experts_are_placed_first_and_in_order():
    experts = keys(2, 8)
    counts = {key: i for i, key in enumerate(experts)}  # (1, 7) is the most routed
    plan = place_experts(experts, sizes(2), counts, [3 * RECORD, 3 * RECORD])
    hottest = sorted(experts, key=lambda k: -counts[k])[:6]
    assert sorted(placed(plan)) == sorted(hottest)
    for node in plan:
        assert [counts[k] for k in node] == sorted((counts[k] for k in node), reverse=True)


def test_the_hottest_experts_are_spread_over_the_nodes():
    experts = keys(1, 12)
    counts = {key: 100 - i for i, key in enumerate(experts)}
    plan = place_experts(experts, sizes(1), counts, [4 * RECORD] * 3)
    # The three most routed go to three different nodes, and so on down the ranking.
    assert [node[0] for node in plan] == experts[:3]
    assert [node[1] for node in plan] == experts[3:6]


def test_never_exceeds_capacity_with_mixed_record_sizes():
    experts = keys(3, 10)
    record_bytes = {0: 100, 1: 250, 2: 40}
    counts = {key: (key[0] * 7 + key[1] * 3) % 11 for key in experts}
    capacities = [1000, 333, 0, 90]
    plan = place_experts(experts, record_bytes, counts, capacities)
    for node, cap in zip(plan, capacities):
        assert sum(record_bytes[layer] for layer, _ in node) <= cap
    assert plan[2] == []
    # What did not fit in one node's room went to another: every node with room for the
    # smallest record is nearly full, or every expert was placed.
    assert len(placed(plan)) == len(experts) or all(
        cap - sum(record_bytes[layer] for layer, _ in node) < 40 for node, cap in zip(plan, capacities)
    )


def test_a_node_smaller_than_one_expert_gets_nothing():
    plan = place_experts(keys(1, 4), sizes(1), {}, [RECORD - 1, 2 * RECORD])
    assert plan[0] == [] and len(plan[1]) == 2


def test_no_expert_is_placed_twice_even_with_room_to_spare():
    experts = keys(2, 5)
    plan = place_experts(experts, sizes(2), {}, [100 * RECORD] * 3)
    everything = placed(plan)
    assert len(everything) == len(set(everything)) == len(experts)


def test_experts_the_coordinator_caches_stay_local():
    experts = keys(2, 6)
    counts = {key: 10 for key in experts}
    local = {(0, 0), (0, 1), (1, 5)}
    plan = place_experts(experts, sizes(2), counts, [100 * RECORD] * 2, local=local)
    assert not local & set(placed(plan))
    assert set(placed(plan)) == set(experts) - local


def test_capacity_balances_by_capacity():
    experts = keys(1, 30)
    plan = place_experts(experts, sizes(1), {}, [20 * RECORD, 10 * RECORD, 10 * RECORD])
    big, small, other = (len(node) for node in plan)
    assert big + small + other == 30
    assert abs(big - 15) <= 1 and abs(small - other) <= 1
    plan = place_experts(keys(1, 9), sizes(1), {}, [10 * RECORD] * 3)
    assert [len(node) for node in plan] == [3, 3, 3]


def test_deterministic_whatever_the_input_order():
    experts = keys(4, 16)
    rng = random.Random(1)
    counts = {key: rng.randrange(5) for key in experts}  # many ties
    capacities = [7 * RECORD, 13 * RECORD, 5 * RECORD]
    local = set(rng.sample(experts, 6))
    first = place_experts(experts, sizes(4), counts, capacities, local)
    shuffled = experts[:]
    rng.shuffle(shuffled)
    again = place_experts(shuffled, sizes(4), dict(reversed(list(counts.items()))), capacities, list(local))
    assert first == again


def test_experts_a_node_holds_stay_there_while_still_wanted():
    experts = keys(1, 8)
    counts = {key: 8 - key[1] for key in experts}
    before = place_experts(experts, sizes(1), counts, [4 * RECORD] * 2)
    # The ranking changes a little: without stickiness everything after the change would shift nodes.
    counts[(0, 5)] = 100
    after = place_experts(experts, sizes(1), counts, [4 * RECORD] * 2, held=[set(n) for n in before])
    moved = {k for n_before, n_after in zip(before, after) for k in n_after if k not in n_before}
    assert moved <= {(0, 5)}
    assert after[0][0] == (0, 5) or after[1][0] == (0, 5)


def test_invariants_on_random_inputs():
    rng = random.Random(7)
    for _ in range(200):
        layers, per_layer = rng.randint(1, 4), rng.randint(1, 20)
        experts = keys(layers, per_layer)
        counts = {key: rng.randrange(50) for key in experts if rng.random() < 0.8}
        capacities = [rng.randrange(0, 12) * RECORD for _ in range(rng.randint(1, 4))]
        local = set(rng.sample(experts, rng.randint(0, len(experts) // 2)))
        held = [set(rng.sample(experts, rng.randint(0, min(5, len(experts))))) for _ in capacities]
        plan = place_experts(experts, sizes(layers), counts, capacities, local, held)
        everything = placed(plan)
        assert len(everything) == len(set(everything))
        assert not set(everything) & local
        for node, cap in zip(plan, capacities):
            assert len(node) * RECORD <= cap
        remaining = [k for k in experts if k not in local]
        assert len(everything) == min(len(remaining), sum(cap // RECORD for cap in capacities))
        left_out = set(remaining) - set(everything)
        if left_out and everything:
            assert max(counts.get(k, 0) for k in left_out) <= min(counts.get(k, 0) for k in everything)
        assert plan == place_experts(experts, sizes(layers), counts, capacities, local, held)


def test_keep_local_is_what_is_cached_plus_the_hottest_that_fit_the_free_room():
    experts = keys(2, 4)
    counts = {(1, 3): 9, (1, 2): 5, (0, 0): 1}
    keep = keep_local(experts, sizes(2), counts, cached={(0, 1)}, free_bytes=2 * RECORD + RECORD // 2)
    assert keep == {(0, 1), (1, 3), (1, 2)}
    # A full cache keeps exactly what it holds.
    assert keep_local(experts, sizes(2), counts, cached={(0, 1)}, free_bytes=0) == {(0, 1)}


def test_a_cold_start_keeps_whole_layers_local():
    experts = keys(3, 4)
    keep = keep_local(experts, sizes(3), {}, cached=(), free_bytes=5 * RECORD)
    assert keep == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)}
    plan = place_experts(experts, sizes(3), {}, [10 * RECORD] * 2, local=keep)
    assert sorted(placed(plan)) == sorted(set(experts) - keep)


def test_routing_counts_see_hits_misses_and_experts_served_elsewhere():
    cache = ExpertCache(2 * RECORD, RECORD, "lfu")
    cache.get("a")  # a miss
    cache.put("a", 1, RECORD)
    cache.get("a")  # a hit
    cache.count("b")  # computed on a node, never looked up here
    cache.count("b")
    cache.count("a")
    assert cache.routing_counts() == {"a": 3, "b": 2}
    snapshot = cache.routing_counts()
    snapshot["a"] = 0
    assert cache.routing_counts()["a"] == 3
    # The LFU order stays consistent: the much-counted "a" outlives the never-counted "c".
    assert cache.put("c", 3, RECORD)
    assert cache.put("d", 4, RECORD)
    assert "a" in cache and "d" in cache and "c" not in cache
