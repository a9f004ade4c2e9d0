"""The performance model of docs/DESIGN.md ("Performance model"): predicted decode time per
token from a few measured figures of this machine and its nodes. Pure arithmetic, no MLX:
`plan.py` and the bench measure, this predicts.

Per MoE layer l with E_l experts of R_l bytes, K routed per token, a share c_l of its
experts cached here, n_l on nodes and s_l = 1 - c_l - n_l only on SSD (uniform routing:
each routed expert is any of them with equal chance):

    dense_l  = t_hit / L - K t_expert                        attention, router, host sync
    local_l  = K (c_l + s_l) t_expert                        experts computed here
               + (1 - (1 - s_l)^K) t_miss + K s_l R_l / B    and read: per layer that misses, per byte
    P_l      = 1 - (1 - n_l)^K                                the layer calls a node at all
    remote_l = rtt_l + (K n_l / P_l) t_expert                the node's round trip and work
    layer_l  = dense_l + P_l max(remote_l, local_l) + (1 - P_l) local_l
    tok/s    = 1 / sum_l layer_l

t_hit is a measured decode step with every routed expert a cache hit (so it holds the
dense part and K experts' compute per layer), t_expert one expert's compute on one row,
B and t_miss what a miss costs per byte and per layer that misses at all (measured from the
disk, or from the page cache when the experts are resident there), rtt_l the slowest round trip among the nodes holding
experts of layer l. With no nodes (n_l = 0) this is t_hit + SSD bytes per token / B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What the model needs measured: per MoE layer its experts' record bytes and count."""

    record_bytes: Sequence[int]
    experts: Sequence[int]
    k: int
    hit_step_s: float  # one decode step, every routed expert a cache hit
    expert_s: float  # one expert on one row
    read_gbps: float  # missed bytes per second, from where misses come from
    miss_layer_s: float = 0.0  # the fixed cost of a layer that misses at all


@dataclass(frozen=True)
class LayerShares:
    """One layer's split of its experts: cached here, on nodes (and the slowest of their round trips)."""

    cached: float
    on_nodes: float = 0.0
    rtt_s: float = 0.0


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float
    seconds_per_token: float
    ssd_bytes_per_token: float
    hit_rate: float
    node_share: float
    ssd_bound_tokens_per_s: float | None  # None: nothing is read
    compute_bound_tokens_per_s: float
    # the layers that call a node, each at max(round trip, local work) as in the design: None when none does
    cluster_bound_tokens_per_s: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def predict(m: Machine, shares: Sequence[LayerShares]) -> Prediction:
    layers = len(m.record_bytes)
    if len(shares) != layers:
        raise ValueError(f"{len(shares)} layer shares for {layers} MoE layers")
    dense = max(0.0, m.hit_step_s / layers - m.k * m.expert_s)
    total = read_bytes = waited = 0.0
    hit = node = 0.0
    for rec, sh in zip(m.record_bytes, shares):
        ssd = max(0.0, 1.0 - sh.cached - sh.on_nodes)
        layer_read = m.k * ssd * rec
        missing = 1.0 - (1.0 - ssd) ** m.k
        local = m.k * (sh.cached + ssd) * m.expert_s + missing * m.miss_layer_s + layer_read / (m.read_gbps * 1e9)
        called = 1.0 - (1.0 - sh.on_nodes) ** m.k
        remote = sh.rtt_s + (m.k * sh.on_nodes / called) * m.expert_s if called else 0.0
        waits = called * max(remote, local) + (1.0 - called) * local
        total += dense + waits
        waited += waits if called else 0.0
        read_bytes += layer_read
        hit += sh.cached / layers
        node += sh.on_nodes / layers
    return Prediction(
        tokens_per_s=1.0 / total,
        seconds_per_token=total,
        ssd_bytes_per_token=read_bytes,
        hit_rate=hit,
        node_share=node,
        ssd_bound_tokens_per_s=m.read_gbps * 1e9 / read_bytes if read_bytes else None,
        compute_bound_tokens_per_s=1.0 / m.hit_step_s,
        cluster_bound_tokens_per_s=1.0 / waited if waited else None,
    )


def uniform(cache_fraction: float, layers: int) -> list[LayerShares]:
    """No nodes, uniform routing: the hit rate is the cached share of each layer's experts."""
    return [LayerShares(cached=min(1.0, max(0.0, cache_fraction)))] * layers

