"""`edgemoe bench --cluster N`: decode with N edge nodes on this machine, against the cluster bound of docs/DESIGN.md.

One run starts N `edge-node` processes on 127.0.0.1 (free ports, temporary
data dirs, a fresh cluster token), then measures, in order:

1. decode with no peers, the coordinator's cache at the same budget as in the
   cluster runs: the baseline tok/s, and the local work per MoE layer
   (decode time per token / MoE layers);
2. decode with the nodes, once placement has pushed them their experts, for
   added round-trip delays of 0 (direct), 0.5 and 5 ms: a DelayRelay process in
   front of each node adds half the delay each way.

For each delay it reports tok/s, the round-trip time the coordinator measured
per call, and the cluster bound
    tok/s <= 1 / (sum over MoE layers of max(RTT to involved peers, local work))
with the RTT of a layer taken as its slowest call, the layers without a peer call
counted at local work alone, and local work from run 1. Decode is timed from the
first token to the last, as in `edgemoe bench`. Every process the bench starts is
stopped before it returns, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemoe.node.architecture import routed_experts_per_token
from edgemoe.node.credentials import ClusterCredentials, format_token, new_secret
from edgemoe.node.errors import EdgemoeError
from edgemoe.node.limits import ram_bytes
from edgemoe.node.manifest import read_manifest

from ..cluster import Cluster
from ..counters import Counters, snapshot
from ..generate import build_prompt, generate
from ..loader import load_streaming_model
from ..local_nodes import HOST, START_TIMEOUT_S, Children, sigterm_as_interrupt, start_nodes, wait_for_output
from ..streaming import StreamingModel
from .decode import REPEATS, ignore_eos, warm_up
from .page_cache import expert_paths
from .predict import Steps, cluster_prediction, measure_steps

log = logging.getLogger(__name__)

ADDED_RTTS_MS = (0.0, 0.5, 5.0)
MAX_NODES = 16
PLACEMENT_TIMEOUT_S = 120.0
# A relay outlives a bench killed with SIGKILL by at most this long.
RELAY_LIFETIME_S = 900.0
# All nodes share this machine's RAM with the coordinator.
NODES_RAM_FRACTION = 0.25


def start_relay(children: Children, workdir: Path, target: str, one_way_ms: float, name: str) -> str:
    """A DelayRelay process in front of `target`; returns the address to connect to instead."""
    child = children.start(name, [
        sys.executable, "-m", "edgemoe.coordinator.relay", "--listen", f"{HOST}:0", "--target", target,
        "--delay-ms", repr(one_way_ms), "--max-lifetime-s", str(RELAY_LIFETIME_S),
    ], workdir)
    line = wait_for_output(child, "LISTENING", START_TIMEOUT_S)
    if line is None:
        raise EdgemoeError(f"relay {name} did not start: {child.error_text()}")
    _, host, port = line.split()
    return f"{host}:{port}"


# --- timed decode -----------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """The model's counters at one instant, with the cluster's layer counters and, per node,
    its replies so far and the sum of their round trips (ms)."""

    counters: Counters
    layers: int = 0
    peer_layers: int = 0
    answered_layers: int = 0
    slowest_rtt_ms_total: float = 0.0
    node_rtts: tuple[tuple[int, float], ...] = ()


def node_rtts(cluster: Cluster) -> tuple[tuple[int, float], ...]:
    """Per node: replies so far and their summed round trips (ms); counts and sums subtract, a window would not."""
    return tuple((p.stats.rtt_count, p.stats.rtt_sum_ms) for p in cluster.peers)


def mark(sm: StreamingModel) -> Mark:
    counters = snapshot(sm)
    if sm.cluster is None:
        return Mark(counters)
    stats = sm.cluster.stats
    return Mark(counters, stats.layers, stats.peer_layers, stats.answered_layers, stats.slowest_rtt_ms_total,
                node_rtts(sm.cluster))


@dataclass
class Decode:
    """One timed decode, between its first and its last token."""

    token_ids: list[int]
    decode_tokens: int
    tokens_per_s: float | None
    node_rtts: list[tuple[int, float]]  # per node: replies, and their summed round trips (ms)
    peer_calls: int
    experts_from_peers: int
    experts_from_ssd: int
    fallbacks: int
    layers: int
    peer_layers: int
    answered_layers: int  # peer layers of which a node answered: the round trips are theirs
    slowest_rtt_ms_total: float


def decode_between(first: Mark, last: Mark, token_ids: list[int]) -> Decode:
    """The figures of the tokens after `first` up to `last`."""
    d = last.counters - first.counters
    n = len(token_ids) - 1
    return Decode(
        token_ids=token_ids,
        decode_tokens=n,
        tokens_per_s=n / d.t if n and d.t > 0 else None,
        node_rtts=[(c1 - c0, s1 - s0) for (c0, s0), (c1, s1) in zip(first.node_rtts, last.node_rtts)],
        peer_calls=d.peer_calls,
        experts_from_peers=d.experts_from_peers,
        experts_from_ssd=d.experts_from_ssd,
        fallbacks=d.fallbacks,
        layers=last.layers - first.layers,
        peer_layers=last.peer_layers - first.peer_layers,
        answered_layers=last.answered_layers - first.answered_layers,
        slowest_rtt_ms_total=last.slowest_rtt_ms_total - first.slowest_rtt_ms_total,
    )


def timed_decode(sm: StreamingModel, prompt_tokens: list[int], tokens: int) -> Decode:
    marks: list[Mark] = []
    with ignore_eos(sm.tokenizer):
        result = generate(sm, prompt_tokens, max_tokens=tokens, on_token=lambda _: marks.append(mark(sm)))
    return decode_between(marks[0], marks[-1], result.token_ids)


def fastest_decode(sm: StreamingModel, prompt_tokens: list[int], tokens: int) -> Decode:
    """Warms MLX up on other text, then the fastest of REPEATS timed decodes."""
    warm_up(sm)
    runs = [timed_decode(sm, prompt_tokens, tokens) for _ in range(REPEATS)]
    return max(runs, key=lambda r: r.tokens_per_s or 0.0)


# --- figures ----------------------------------------------------------------------


def cluster_bound(moe_layers: int, peer_layer_fraction: float, layer_rtt_ms: float | None,
                  local_layer_ms: float) -> float:
    """The cluster bound of docs/DESIGN.md in tok/s: a layer with a peer call takes max(its slowest
    round trip, local work), a layer without one its local work."""
    with_peers = max(layer_rtt_ms or 0.0, local_layer_ms)
    per_layer_ms = peer_layer_fraction * with_peers + (1 - peer_layer_fraction) * local_layer_ms
    return 1e3 / (moe_layers * per_layer_ms)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_figures(run: Decode, baseline: Decode, added_rtt_ms: float, relayed: bool, moe_layers: int,
                local_layer_ms: float) -> dict[str, Any]:
    replies = sum(n for n, _ in run.node_rtts)
    fraction = run.peer_layers / run.layers if run.layers else 0.0
    layer_rtt = run.slowest_rtt_ms_total / run.answered_layers if run.answered_layers else None
    bound = cluster_bound(moe_layers, fraction, layer_rtt, local_layer_ms)
    return {
        "added_rtt_ms": added_rtt_ms,
        "through_relay": relayed,
        "tokens_per_s": run.tokens_per_s,
        "decode_tokens": run.decode_tokens,
        "rtt_ms": _ratio(sum(total for _, total in run.node_rtts), replies),
        "node_rtt_ms": [_ratio(total, n) for n, total in run.node_rtts],
        "layer_rtt_ms": layer_rtt,
        "peer_layer_fraction": fraction,
        "peer_layers_per_token": fraction * moe_layers,
        "peer_calls": run.peer_calls,
        "peer_calls_per_token": _ratio(run.peer_calls, run.decode_tokens),
        "experts_from_peers": run.experts_from_peers,
        "experts_from_ssd": run.experts_from_ssd,
        "fallbacks": run.fallbacks,
        "cluster_bound_tokens_per_s": bound,
        "bound_efficiency": _ratio(run.tokens_per_s, bound),
        "relative_to_no_peers": _ratio(run.tokens_per_s, baseline.tokens_per_s),
        "same_tokens": run.token_ids == baseline.token_ids,
    }


# --- the bench --------------------------------------------------------------------


@dataclass
class Setup:
    model_dir: Path
    coordinator_cache_bytes: int
    experts_per_token: int | None
    io_mode: str
    prompt: str
    tokens: int


def _load(setup: Setup, peers: list[str] | None = None,
          credentials: ClusterCredentials | None = None) -> StreamingModel:
    return load_streaming_model(setup.model_dir, cache_bytes=setup.coordinator_cache_bytes,
                                experts_per_token=setup.experts_per_token, io_mode=setup.io_mode,
                                peers=peers, credentials=credentials)


def _wait_for_placement(cluster: Cluster, notes: list[str]) -> float:
    start = time.monotonic()
    while not cluster.placement_complete():
        if time.monotonic() - start > PLACEMENT_TIMEOUT_S:
            notes.append(f"placement was not complete after {PLACEMENT_TIMEOUT_S:.0f}s: "
                         "some experts were still read from SSD")
            break
        time.sleep(0.05)
    return time.monotonic() - start


def _cluster_run(setup: Setup, addresses: list[str], credentials: ClusterCredentials, prompt_tokens: list[int],
                 report: dict[str, Any], notes: list[str], steps: Steps) -> tuple[Decode, float]:
    sm = _load(setup, addresses, credentials)
    try:
        assert sm.cluster is not None
        down = [f"{p.address}: {p.last_error}" for p in sm.cluster.peers if not p.healthy]
        if down:
            raise EdgemoeError(f"the bench's own nodes are unusable ({'; '.join(down)})")
        push_seconds = _wait_for_placement(sm.cluster, notes)
        report.setdefault("push_seconds", push_seconds)
        report.setdefault("experts_placed", sm.cluster.placed())
        predicted = cluster_prediction(sm, steps)
        return fastest_decode(sm, prompt_tokens, setup.tokens), predicted
    finally:
        sm.close()


def node_cache_bytes(total_expert_bytes: int, record_bytes: int, nodes: int) -> int:
    """Room on each node for its share of every expert, within a quarter of this machine's RAM in all."""
    share = math.ceil(total_expert_bytes / nodes) + record_bytes
    return max(record_bytes, min(share, int(ram_bytes() * NODES_RAM_FRACTION / nodes)))


def run_cluster_bench(
    model_dir: Path,
    nodes: int,
    cache_bytes: int | None = None,
    tokens: int = 64,
    prompt: str = "Write a short story about a robot who learns to paint.",
    experts_per_token: int | None = None,
    io_mode: str = "auto",
    added_rtts_ms: tuple[float, ...] = ADDED_RTTS_MS,
) -> dict[str, Any]:
    if not 1 <= nodes <= MAX_NODES:
        raise EdgemoeError(f"--cluster {nodes}: run 1 to {MAX_NODES} nodes")
    if tokens < 2:
        raise EdgemoeError(f"--tokens {tokens} must be at least 2: decode is timed from the first token to the last")
    began = time.perf_counter()
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    notes: list[str] = []
    setup = Setup(model_dir, cache_bytes or max(manifest.expert_bytes, manifest.total_expert_bytes // 8),
                  experts_per_token, io_mode, prompt, tokens)
    if setup.coordinator_cache_bytes >= manifest.total_expert_bytes:
        notes.append("the coordinator caches every expert: placement gives the nodes none (lower --cache-mb)")
    per_node = node_cache_bytes(manifest.total_expert_bytes, manifest.expert_bytes, nodes)
    if per_node * nodes < manifest.total_expert_bytes - setup.coordinator_cache_bytes:
        notes.append("the nodes' RAM budgets cannot hold every expert the coordinator does not cache: "
                     "the rest are read from the coordinator's SSD")
    secret = new_secret()
    credentials = ClusterCredentials.create(secret, "coordinator")
    report: dict[str, Any] = {
        "model": str(model_dir), "model_type": manifest.model_type, "nodes": nodes, "host": HOST,
        "tokens": tokens, "repeats": REPEATS, "moe_layers": len(manifest.layers),
        "expert_record_bytes": manifest.expert_bytes, "total_expert_bytes": manifest.total_expert_bytes,
        "coordinator_cache_budget_bytes": setup.coordinator_cache_bytes, "node_cache_budget_bytes": per_node,
    }
    children = Children()
    with tempfile.TemporaryDirectory(prefix="edgemoe-cluster-bench-") as tmp, sigterm_as_interrupt():
        workdir = Path(tmp)
        try:
            log.info("starting %d edge nodes", nodes)
            addresses = [a for _, a in start_nodes(children, format_token(secret), workdir, nodes, per_node)]
            log.info("decode with no peers")
            sm = _load(setup)
            try:
                prompt_tokens = build_prompt(sm.tokenizer, prompt)
                if not prompt_tokens:
                    raise EdgemoeError(f"--prompt {prompt!r} encodes to no tokens; pass some text")
                report["experts_per_token"] = routed_experts_per_token(sm.config)
                report["prompt_tokens"] = len(prompt_tokens)
                baseline = fastest_decode(sm, prompt_tokens, tokens)
                steps = measure_steps(sm, expert_paths(model_dir, manifest))  # the performance model's inputs
            finally:
                sm.close()
            local_layer_ms = (_ratio(1e3, baseline.tokens_per_s * len(manifest.layers))
                              if baseline.tokens_per_s else None)
            if local_layer_ms is None:
                raise EdgemoeError("the no-peer decode produced no timing; raise --tokens")
            report.update(no_peer_tokens_per_s=baseline.tokens_per_s, local_layer_ms=local_layer_ms)
            runs = []
            for added in added_rtts_ms:
                log.info("decode with %d nodes, %.1f ms added round trip", nodes, added)
                relays = [start_relay(children, workdir, a, added / 2, f"relay{i}-{added}ms")
                          for i, a in enumerate(addresses)] if added else addresses
                try:
                    run, predicted = _cluster_run(setup, relays, credentials, prompt_tokens, report, notes, steps)
                finally:
                    children.stop([c for c in children.items if c.name.startswith("relay")])
                runs.append(run_figures(run, baseline, added, bool(added), len(manifest.layers), local_layer_ms))
                runs[-1].update(predicted_tok_s=predicted, measured_over_predicted=_ratio(run.tokens_per_s, predicted))
        finally:
            children.stop_all()
    report["runs"] = runs
    report["same_tokens"] = all(r["same_tokens"] for r in runs)
    report["child_pids"] = children.pids
    report["notes"] = notes
    report["bench_seconds"] = time.perf_counter() - began
    return report
