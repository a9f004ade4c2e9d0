"""The measured inputs of the performance model (coordinator/perf_model.py), shared by
`edgemoe plan` and `edgemoe bench`, and the bench's predicted tok/s next to its measured.

Each is timed on the model's own decode, with each layer's router choice replaced (the
tokens made are meaningless and thrown away):

- the hit step: every row routed to the layer's first K experts, which stay cached, so
  it is the real hit path (dense part, routers, one host sync and one kernel call per layer);
- the miss steps: every row routed to K experts the layer has not used lately (its experts
  in turn, a cache of one expert), each read by the store as decode reads a miss, with the
  page cache dropped before every token (from the disk) or warm (from RAM). Their extra
  time over the hit step, per byte missed, is the read bandwidth decode gets: reads K at a
  time and their overheads included, which a sequential raw read does not show;
- one expert's compute on one row: a layer's kernel (mlx-lm's module) on K experts
  against on one, the difference over K - 1.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from edgemoe.node.architecture import routed_experts_per_token
from edgemoe.node.compute import input_dims
from edgemoe.node.errors import EdgemoeError
from edgemoe.node.manifest import Manifest
from edgemoe.node.wire import tensor_from_array
from edgemoe.protos import edgemoe_node_pb2 as pb

from ..cluster import Key, keep_local, place_experts
from ..generate import build_prompt, generate
from ..perf_model import LayerShares, Machine, predict, uniform
from ..streaming import StreamingExperts, StreamingModel
from .decode import WARMUP_PROMPT, DecodeRun, ignore_eos, timed_generate

STEP_TOKENS = 16
STEP_REPEATS = 3
KERNEL_REPEATS = 20
# A miss step's reads per token, at most (whole layers: at least one).
MISS_STEP_BYTES = 256 * 2**20
RTT_SAMPLES = 5
# A probe compute call: far above a LAN round trip, and a node that takes longer is not one to plan with.
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Misses:
    """What misses cost over hits: `gbps`, the missed bytes per second of extra step time;
    `layer_s`, a fixed cost of each layer that misses at all (its reads started and waited for)."""

    gbps: float
    layer_s: float


@dataclass(frozen=True)
class Steps:
    hit_step_s: float
    expert_s: float
    disk: Misses  # the page cache dropped before every token
    page_cache: Misses  # the experts resident in the page cache
    io: str


class _Route:
    """Stands in for a layer's dispatcher: routes every row to the layer's first K experts, or
    with `rotate` R of them to R new experts each call (the other K - R stay the first ones)."""

    def __init__(self, dispatch: Any, experts: int):
        self.dispatch = dispatch
        self.experts = experts
        self.rotate = 0
        self.calls = 0
        self.hidden: mx.array | None = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        self.hidden = x
        chosen = np.array(indices)  # the router's host sync, as the dispatcher would make it
        k, r = chosen.shape[-1], self.rotate
        fixed = np.arange(k - r, dtype=chosen.dtype)
        # new ones from the experts after the fixed, in turn
        new = (k - r) + (self.calls * r + np.arange(r, dtype=chosen.dtype)) % (self.experts - (k - r))
        self.calls += 1
        picked = np.concatenate([fixed, new])
        return self.dispatch(x, mx.array(np.broadcast_to(picked, chosen.shape)))

    def __getattr__(self, name: str) -> Any:  # the counters read the dispatcher's own figures
        return getattr(self.dispatch, name)


def experts_per_token(config: dict) -> int:
    k = routed_experts_per_token(config)
    if not k:
        raise EdgemoeError("the model's config names no experts per token: is it a MoE model? repack it")
    return k


def hit_budget_bytes(manifest: Manifest, k: int) -> int:
    """A cache that keeps K experts of every layer (twice over: the budget is split by layout)."""
    return min(manifest.total_expert_bytes, 2 * k * sum(spec.record_bytes for spec in manifest.layers))


def measure_steps(sm: StreamingModel, paths: list[Path]) -> Steps:
    """The hit step, the miss steps and one expert's compute, timed on `sm`; its cache is
    left empty at its budget, and its I/O mode as it was."""
    k = experts_per_token(sm.config)
    budget, direct = sm.local.budget_bytes, sm.local.store.direct
    modules = [m for _, m in sm.model.named_modules() if isinstance(m, StreamingExperts)]
    routes = [_Route(m.dispatch, sm.manifest.layer(m.dispatch.layer).num_experts) for m in modules]
    for m, route in zip(modules, routes):
        m.dispatch = route  # type: ignore[assignment]  # a stand-in with the dispatcher's call
    prompt = build_prompt(sm.tokenizer, WARMUP_PROMPT)
    try:
        sm.local.reset_cache(max(budget, hit_budget_bytes(sm.manifest, k)))
        hit = min(_step_seconds(sm, prompt) for _ in range(STEP_REPEATS))
        hidden = routes[0].hidden
        assert hidden is not None  # the decode above ran every layer
        expert = _expert_seconds(routes[0].dispatch, sm, hidden[..., -1:, :], k)
        disk = _misses(sm, prompt, routes, hit, k, paths)
        sm.local.set_io_mode("buffered")  # the page cache is what this one is about
        _misses(sm, prompt, routes, hit, k, None, repeats=1)  # brings the experts in: the rotations repeat
        warm = _misses(sm, prompt, routes, hit, k, None)
    finally:
        for m, route in zip(modules, routes):
            m.dispatch = route.dispatch
        sm.local.set_io_mode("direct" if direct else "buffered")
        sm.local.reset_cache(budget)
    return Steps(hit, expert, disk, warm, "direct" if direct else "buffered")


def _step_seconds(sm: StreamingModel, prompt: list[int]) -> float:
    marks: list[float] = []
    with ignore_eos(sm.tokenizer):
        generate(sm, prompt, max_tokens=STEP_TOKENS, on_token=lambda _: marks.append(time.perf_counter()))
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def _misses(sm: StreamingModel, prompt: list[int], routes: list[_Route], hit_s: float, k: int,
            drop_every_token: list[Path] | None, repeats: int = STEP_REPEATS) -> Misses:
    """Two miss steps: K misses in each missing layer, and one. Their difference is per byte,
    what is left of the one-miss step over the hit step is per layer. Only as many layers miss
    as keep a token's reads under MISS_STEP_BYTES (the others hit), so a model of 40 MiB
    experts is sampled, not read whole."""
    per_layer = k * max(s.record_bytes for s in sm.manifest.layers)
    missing = routes[: max(1, min(len(routes), MISS_STEP_BYTES // per_layer))]
    runs = []
    for rotate in (k, 1):
        for route in missing:
            route.rotate = rotate
        fastest: DecodeRun | None = None
        for _ in range(repeats):
            sm.local.reset_cache(hit_budget_bytes(sm.manifest, k))  # holds the fixed ones; a new one misses
            for route in routes:
                route.calls = 0
            run = timed_generate(sm, prompt, STEP_TOKENS, drop_every_token=drop_every_token)
            assert run.tokens_per_s and run.ssd_bytes_per_token  # every step missed
            if fastest is None or run.tokens_per_s > (fastest.tokens_per_s or 0.0):
                fastest = run
        assert fastest is not None and fastest.tokens_per_s and fastest.ssd_bytes_per_token
        runs.append((1.0 / fastest.tokens_per_s - hit_s, fastest.ssd_bytes_per_token))
    (all_s, all_bytes), (one_s, one_bytes) = runs
    per_byte = max(all_s - one_s, 1e-9) / max(all_bytes - one_bytes, 1.0) if k > 1 else all_s / all_bytes
    for route in missing:
        route.rotate = 0
    return Misses(1 / per_byte / 1e9, max(0.0, (one_s - one_bytes * per_byte) / len(missing)))


def _expert_seconds(dispatch: Any, sm: StreamingModel, x: mx.array, k: int) -> float:
    """(time of K experts on one row - time of one) / (K - 1): the cost of one more expert."""
    dispatch.kernel.bind(sm.local.arrays(dispatch.layer))
    slots = sm.local.slots(dispatch.layer, list(range(k))).astype(np.uint32)
    x = x.reshape(1, 1, -1)

    def timed(picked: np.ndarray) -> float:
        times = []
        for _ in range(KERNEL_REPEATS):
            start = time.perf_counter()
            mx.eval(dispatch.kernel(x, picked.reshape(1, 1, -1)))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    one = timed(slots[:1])
    if k == 1:
        return one
    return max(0.0, (timed(slots) - one) / (k - 1))


def expert_keys(manifest: Manifest) -> tuple[list[Key], dict[int, int]]:
    return ([(s.layer, e) for s in manifest.layers for e in range(s.num_experts)],
            {s.layer: s.record_bytes for s in manifest.layers})


def placement(manifest: Manifest, cache_bytes: int, nodes: list[dict[str, Any]],
              counts: dict[Key, int] | None = None) -> tuple[set[Key], list[list[Key]]]:
    """keep_local and place_experts as the cluster runs them at start: an empty cache (or one
    warmed with the hottest of `counts`, which comes to the same), and the routing counts given
    (none: uniform routing, ties in (layer, expert) order)."""
    keys, record_bytes = expert_keys(manifest)
    counts = counts or {}
    local = keep_local(keys, record_bytes, counts, set(), cache_bytes)
    usable = [n for n in nodes if n["usable"]]
    held = [{tuple(k) for k in n["held"]} for n in usable]
    plan = place_experts(keys, record_bytes, counts, [n["capacity_bytes"] for n in usable], local, held)
    return local, plan


def layer_shares(manifest: Manifest, local: set[Key], plan: list[list[Key]], rtts_s: list[float],
                 counts: dict[Key, int] | None = None) -> list[LayerShares]:
    """Each layer's chance that a routed expert is cached here or on a node: the share of its
    experts with no counts (uniform routing), else their share of the layer's routings."""
    shares = []
    for spec in manifest.layers:
        layer_counts = {e: n for (layer, e), n in (counts or {}).items() if layer == spec.layer}
        total = sum(layer_counts.values())
        weight = ({e: n / total for e, n in layer_counts.items()} if total
                  else dict.fromkeys(range(spec.num_experts), 1 / spec.num_experts))
        on = [sum(weight.get(k[1], 0.0) for k in keys if k[0] == spec.layer) for keys in plan]
        slowest = max((rtt for rtt, n in zip(rtts_s, on) if n), default=0.0)
        cached = sum(weight.get(k[1], 0.0) for k in local if k[0] == spec.layer)
        shares.append(LayerShares(cached, sum(on), slowest))
    return shares


def node_rtts_s(peers: list[Any], manifest: Manifest, hidden_size: int, k: int) -> list[float]:
    """Each peer's median round trip, in seconds, of a few calls like decode's: one token's
    row sent to K experts of one layer that the node holds (a compute call adds the node's
    own work and the wire format to an Info round trip: 2.6 against ~1 ms on loopback);
    a node holding nothing of the model is timed by Info calls. Reads and writes nothing."""
    rtts = []
    for peer in peers:
        times = []
        probe = _probe_request(peer.held, manifest.fingerprint, hidden_size, k)
        for _ in range(RTT_SAMPLES):
            start = time.perf_counter()
            if probe is None:
                peer.refresh(manifest.fingerprint)
            else:
                peer.compute(probe).result(timeout=PROBE_TIMEOUT_S)
            times.append(time.perf_counter() - start)
        rtts.append(statistics.median(times))
    return rtts


def _probe_request(held: set[Key], fingerprint: str, hidden_size: int, k: int) -> pb.ComputeRequest | None:
    if not held:
        return None
    layer = min(layer for layer, _ in held)
    experts = sorted(e for at, e in held if at == layer)[:k]
    hidden = tensor_from_array(mx.zeros((1, hidden_size), dtype=mx.float32))
    return pb.ComputeRequest(fingerprint=fingerprint, layer=layer, hidden=hidden, rows=[0] * len(experts),
                             experts=experts)


def cluster_prediction(sm: StreamingModel, steps: Steps) -> float:
    """Predicted tok/s of `sm` with its cluster's healthy nodes, from their Info round trips and
    capacities and the placement made as at start (what they hold now stays with them)."""
    assert sm.cluster is not None
    usable, nodes = [], []
    for p in sm.cluster.peers:
        if p.healthy and p.info is not None:
            usable.append(p)
            nodes.append({"usable": True, "capacity_bytes": p.info.cache_budget_bytes, "held": sorted(p.held)})
    local, plan = placement(sm.manifest, sm.local.budget_bytes, nodes)
    k = experts_per_token(sm.config)
    hidden_size = input_dims(sm.dispatchers[0].kernel)
    shares = layer_shares(sm.manifest, local, plan, node_rtts_s(usable, sm.manifest, hidden_size, k))
    return predict(machine(sm.manifest, k, steps, steps.page_cache), shares).tokens_per_s


def machine(manifest: Manifest, k: int, steps: Steps, misses: Misses) -> Machine:
    return Machine(record_bytes=[s.record_bytes for s in manifest.layers],
                   experts=[s.num_experts for s in manifest.layers], k=k, hit_step_s=steps.hit_step_s,
                   expert_s=steps.expert_s, read_gbps=misses.gbps,
                   miss_layer_s=misses.layer_s)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bench_predictions(sm: StreamingModel, paths: list[Path], report: dict[str, Any]) -> dict[str, Any]:
    """Predicted tok/s of the every-token-cold and the warm 1/8 runs, from the model fed with
    the steps measured here and the run's own hit rate (its bytes read per token). The warm
    case is also predicted from its cache fraction alone (uniform routing: hit rate = cache
    fraction)."""
    manifest, k = sm.manifest, report["experts_per_token"]
    steps = measure_steps(sm, paths)
    per_token = k * sum(s.record_bytes for s in manifest.layers)  # every routed expert read
    layers = len(manifest.layers)

    def predicted(ssd_bytes_per_token: float | None, misses: Misses) -> float | None:
        if ssd_bytes_per_token is None:
            return None
        shares = uniform(1 - ssd_bytes_per_token / per_token, layers)
        return predict(machine(manifest, k, steps, misses), shares).tokens_per_s

    cold = predicted(report.get("every_token_cold_ssd_bytes_per_token"), steps.disk)
    warm = predicted(report.get("warm_eighth_ssd_bytes_per_token"), steps.page_cache)
    fraction = report["warm_eighth_cache_budget_bytes"] / manifest.total_expert_bytes
    from_fraction = predict(machine(manifest, k, steps, steps.page_cache), uniform(fraction, layers))
    return {
        "predict_hit_step_ms": steps.hit_step_s * 1e3,
        "predict_expert_ms": steps.expert_s * 1e3,
        "predict_disk_miss_gbps": steps.disk.gbps,
        "predict_disk_miss_layer_ms": steps.disk.layer_s * 1e3,
        "predict_page_cache_miss_gbps": steps.page_cache.gbps,
        "predict_page_cache_miss_layer_ms": steps.page_cache.layer_s * 1e3,
        "every_token_cold_predicted_tok_s": cold,
        "every_token_cold_measured_over_predicted": _ratio(report.get("every_token_cold_tokens_per_s"), cold),
        "warm_eighth_predicted_tok_s": warm,
        "warm_eighth_measured_over_predicted": _ratio(report.get("warm_eighth_tokens_per_s"), warm),
        "warm_eighth_predicted_from_cache_fraction_tok_s": from_fraction.tokens_per_s,
        "warm_eighth_measured_over_predicted_from_cache_fraction":
            _ratio(report.get("warm_eighth_tokens_per_s"), from_fraction.tokens_per_s),
    }
