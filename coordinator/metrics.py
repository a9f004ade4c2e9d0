"""Prometheus metrics of `edgemoe serve`, in a registry owned by one server (not prometheus-client's global one).

Request-side figures (tokens generated, tok/s of the last request, requests) are
counted by the server as it serves; the streaming model's own counters (expert
cache hits and misses, SSD bytes read, cache bytes used, and with a cluster the
per-node calls, round trips and fallbacks) are read from the model when
/metrics is scraped, so they are never stale and never double-counted.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StreamingModelCollector:
    """Reads the streaming model's counters at scrape time."""

    def __init__(self, sm):
        self.sm = sm

    def describe(self):
        return []

    def collect(self):
        local = self.sm.local
        cache = local.cache_stats
        yield CounterMetricFamily("edgemoe_cache_hits", "Expert fetches served from the RAM cache", value=cache.hits)
        yield CounterMetricFamily("edgemoe_cache_misses", "Expert fetches that missed the RAM cache", value=cache.misses)
        yield CounterMetricFamily("edgemoe_cache_evictions", "Experts evicted from the RAM cache", value=cache.evictions)
        yield CounterMetricFamily("edgemoe_experts_from_cache", "Experts used from the RAM cache",
                                  value=local.stats.experts_from_cache)
        yield CounterMetricFamily("edgemoe_experts_from_ssd", "Experts read from the SSD", value=local.stats.experts_from_ssd)
        yield CounterMetricFamily("edgemoe_ssd_bytes_read", "Bytes of experts read from the SSD",
                                  value=local.store.stats.bytes_read)
        yield CounterMetricFamily("edgemoe_ssd_read_seconds", "Seconds spent reading experts from the SSD",
                                  value=local.store.stats.read_seconds)
        yield GaugeMetricFamily("edgemoe_cache_bytes_used", "Bytes of experts held in the RAM cache",
                                value=local.cache_bytes_used)
        yield GaugeMetricFamily("edgemoe_cache_budget_bytes", "RAM budget of the expert cache", value=local.budget_bytes)
        cluster = self.sm.cluster
        yield GaugeMetricFamily("edgemoe_cluster_nodes", "Nodes configured for this coordinator",
                                value=len(cluster.peers) if cluster is not None else 0)
        if cluster is None:
            return
        yield CounterMetricFamily("edgemoe_cluster_peer_calls", "Layer calls sent to nodes", value=cluster.stats.peer_calls)
        yield CounterMetricFamily("edgemoe_cluster_experts_from_peers", "Experts computed on nodes",
                                  value=cluster.stats.experts_from_peers)
        yield CounterMetricFamily("edgemoe_cluster_fallbacks",
                                  "Node calls that failed and were computed locally from the SSD instead",
                                  value=cluster.stats.fallbacks)
        calls = CounterMetricFamily("edgemoe_node_calls", "Calls sent to each node", labels=["node"])
        failures = CounterMetricFamily("edgemoe_node_failures", "Failed calls to each node", labels=["node"])
        experts = CounterMetricFamily("edgemoe_node_experts", "Experts computed by each node", labels=["node"])
        healthy = GaugeMetricFamily("edgemoe_node_healthy", "1 if the node is in use, 0 if set aside", labels=["node"])
        held = GaugeMetricFamily("edgemoe_node_experts_held", "Experts each node holds", labels=["node"])
        rtt = SummaryMetricFamily("edgemoe_node_rtt_seconds", "Round-trip times of calls to each node", labels=["node"])
        for peer in list(cluster.peers):
            stats = peer.stats
            calls.add_metric([peer.address], stats.calls)
            failures.add_metric([peer.address], stats.failures)
            experts.add_metric([peer.address], stats.experts)
            healthy.add_metric([peer.address], 1.0 if peer.healthy else 0.0)
            held.add_metric([peer.address], len(peer.held))
            samples = list(stats.rtt_ms)
            rtt.add_metric([peer.address], count_value=len(samples), sum_value=sum(samples) / 1e3)
        yield from (calls, failures, experts, healthy, held, rtt)


class ServerMetrics:
    """The metrics of one server: its own registry, the request counters, and the model's collector."""

    def __init__(self, sm=None):
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
                                              "Prompt processing speed of the last completed request (tok/s)", registry=r)
        self.queue_depth = Gauge("edgemoe_queue_depth", "Requests waiting for or in generation", registry=r)
        if sm is not None:
            self.attach(sm)

    def attach(self, sm) -> None:
        self.registry.register(StreamingModelCollector(sm))

    def render(self) -> bytes:
        return generate_latest(self.registry)
