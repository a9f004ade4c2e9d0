"""Prometheus metrics of `edgemoe serve`, in a registry owned by one server (not prometheus-client's global one).

Request-side figures (tokens generated, tok/s of the last request, requests) are
counted by the server as it serves; the streaming model's own counters (expert
cache hits and misses, SSD bytes read, cache bytes used, and with a cluster the
per-node calls, round trips and fallbacks) are read from the model's snapshots
when /metrics is scraped, so they are never stale and never double-counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..counters import Counters, snapshot
from ..peers import PeerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def model_families(c: Counters, cache_bytes_used: int, budget_bytes: int, cluster: dict | None,
                   rtts: dict[str, PeerStats]) -> Iterator[Metric]:
    """The streaming model's metrics from its counters snapshot and, with a cluster, the cluster's
    snapshot; `rtts` holds each node's statistics, whose round trips become a Prometheus histogram."""
    yield CounterMetricFamily("edgemoe_cache_hits", "Expert fetches served from the RAM cache", value=c.cache_hits)
    yield CounterMetricFamily("edgemoe_cache_misses", "Expert fetches that missed the RAM cache", value=c.cache_misses)
    yield CounterMetricFamily("edgemoe_cache_evictions", "Experts evicted from the RAM cache", value=c.cache_evictions)
    yield CounterMetricFamily("edgemoe_experts_from_cache", "Experts used from the RAM cache",
                              value=c.experts_from_cache)
    yield CounterMetricFamily("edgemoe_experts_from_ssd", "Experts read from the SSD", value=c.experts_from_ssd)
    yield CounterMetricFamily("edgemoe_ssd_bytes_read", "Bytes of experts read from the SSD", value=c.ssd_bytes_read)
    yield CounterMetricFamily("edgemoe_ssd_read_seconds", "Seconds spent reading experts from the SSD",
                              value=c.ssd_read_seconds)
    yield GaugeMetricFamily("edgemoe_cache_bytes_used", "Bytes of experts held in the RAM cache",
                            value=cache_bytes_used)
    yield GaugeMetricFamily("edgemoe_cache_budget_bytes", "RAM budget of the expert cache", value=budget_bytes)
    yield GaugeMetricFamily("edgemoe_cluster_nodes", "Nodes configured for this coordinator",
                            value=len(cluster["nodes"]) if cluster is not None else 0)
    if cluster is None:
        return
    yield CounterMetricFamily("edgemoe_cluster_peer_calls", "Layer calls sent to nodes", value=cluster["peer_calls"])
    yield CounterMetricFamily("edgemoe_cluster_experts_from_peers", "Experts computed on nodes",
                              value=cluster["experts_from_peers"])
    yield CounterMetricFamily("edgemoe_cluster_fallbacks",
                              "Node calls that failed and were computed locally from the SSD instead",
                              value=cluster["fallbacks"])
    yield CounterMetricFamily("edgemoe_cluster_audits", "Node replies recomputed here and compared (--audit)",
                              value=cluster["audits"])
    yield CounterMetricFamily("edgemoe_cluster_audit_failures",
                              "Audited node replies that differed from this machine's (the node is set aside)",
                              value=cluster["audit_failures"])
    calls = CounterMetricFamily("edgemoe_node_calls", "Calls sent to each node", labels=["node"])
    failures = CounterMetricFamily("edgemoe_node_failures", "Failed calls to each node", labels=["node"])
    experts = CounterMetricFamily("edgemoe_node_experts", "Experts computed by each node", labels=["node"])
    healthy = GaugeMetricFamily("edgemoe_node_healthy", "1 if the node is in use, 0 if set aside", labels=["node"])
    held = GaugeMetricFamily("edgemoe_node_experts_held", "Experts each node holds", labels=["node"])
    rtt = HistogramMetricFamily("edgemoe_node_rtt_seconds", "Round-trip times of calls to each node",
                                labels=["node"])
    for node in cluster["nodes"]:
        address = node["address"]
        calls.add_metric([address], node["calls"])
        failures.add_metric([address], node["failures"])
        experts.add_metric([address], node["experts_computed"])
        healthy.add_metric([address], 1.0 if node["healthy"] else 0.0)
        held.add_metric([address], node["experts_held"])
        stats = rtts.get(address)
        if stats is not None:
            buckets, count, total_ms = stats.rtt_histogram()
            rtt.add_metric([address], [(f"{bound / 1e3:g}", n) for bound, n in buckets] + [("+Inf", count)],
                           sum_value=total_ms / 1e3)
    yield from (calls, failures, experts, healthy, held, rtt)


class StreamingModelCollector:
    """Reads the streaming model's snapshots at scrape time."""

    def __init__(self, sm: Any):
        self.sm = sm

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        sm = self.sm
        cluster = sm.cluster.snapshot() if sm.cluster is not None else None
        # The cluster snapshot carries each node's mean round trip, not the buckets a histogram needs.
        rtts = {p.address: p.stats for p in sm.cluster.peers} if sm.cluster is not None else {}
        return model_families(snapshot(sm), sm.local.cache_bytes_used, sm.local.budget_bytes, cluster, rtts)


class ServerMetrics:
    """The metrics of one server: its own registry, the request counters, and the model's collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.tokens_generated = Counter("edgemoe_tokens_generated", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("edgemoe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.requests = Counter("edgemoe_requests", "Completion requests served, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.errors = Counter("edgemoe_request_errors", "Requests refused, by HTTP status", ["status"], registry=r)
        self.last_tokens_per_s = Gauge("edgemoe_last_tokens_per_second",
                                       "Generation speed of the last completed request (tok/s)", registry=r)
        self.last_prompt_tokens_per_s = Gauge("edgemoe_last_prompt_tokens_per_second",
                                              "Prompt processing speed of the last completed request (tok/s)",
                                              registry=r)
        self.queue_depth = Gauge("edgemoe_queue_depth", "Requests waiting for or in generation", registry=r)

    def attach(self, sm: Any) -> None:
        self.registry.register(StreamingModelCollector(sm))

    def render(self) -> bytes:
        return generate_latest(self.registry)
