"""`edgemoe plan`: measures this machine and the nodes, prints the placement the cluster would
use and the tok/s the performance model (perf_model.py, docs/DESIGN.md) predicts for a few
cache sizes and node sets. Read-only: it reads the packed model and asks the nodes for Info,
never pushes, never writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemoe.node.architecture import read_config
from edgemoe.node.compute import input_dims
from edgemoe.node.errors import CacheBudgetError
from edgemoe.node.limits import array_memory_bytes, array_memory_kind, compute_backend, ram_bytes
from edgemoe.node.manifest import Manifest, read_manifest
from edgemoe.node.mapped import mapping_chosen

from .bench.disk import measure_reads, record_jobs
from .bench.page_cache import expert_paths
from .bench.predict import (
    expert_keys,
    experts_per_token,
    hit_budget_bytes,
    layer_shares,
    machine,
    measure_steps,
    node_rtts_s,
    placement,
)
from .cluster import Key
from .hotset import load_counts
from .loader import default_cache_bytes, load_streaming_model
from .perf_model import Machine, predict, uniform

# A short raw read: the plan is a quick look, `edgemoe bench` the long one.
DISK_SAMPLE_BYTES = 256 * 2**20
CACHE_FRACTIONS = ((1, 8), (1, 4), (1, 2), (1, 1))


def measure_nodes(addresses: list[str], credentials: Any, manifest: Manifest, hidden_size: int,
                  k: int) -> list[dict[str, Any]]:
    """Each node's Info: usable or why not, its cache budget (its capacity for placement), what
    it holds of this model, and its round trip (`node_rtts_s`: a decode-like compute call on
    experts it holds, else Info calls)."""
    from .peers import Peer

    nodes = []
    for address in addresses:
        peer = Peer(address, credentials, manifest)
        try:
            usable = peer.connect(manifest.fingerprint)
            rtts = node_rtts_s([peer], manifest, hidden_size, k) if usable else []
            info = peer.info
            nodes.append({
                "address": address, "name": peer.name, "usable": usable,
                "rtt_ms": rtts[0] * 1e3 if rtts else None,
                "capacity_bytes": info.cache_budget_bytes if info else None,
                "used_bytes": info.cache_used_bytes if info else None,
                "backend": info.backend if info else None,
                "experts_held": len(peer.held), "held": sorted(peer.held),
                "error": None if usable else peer.last_error,
            })
        finally:
            peer.close()
    return nodes


def _predictions(manifest: Manifest, m_disk: Machine, m_warm: Machine, budgets: list[tuple[str, int]],
                 nodes: list[dict[str, Any]], counts: dict[Key, int]) -> list[dict[str, Any]]:
    usable = [n for n in nodes if n["usable"]]
    rtts = [n["rtt_ms"] / 1e3 for n in usable]
    rows = []
    for label, budget in budgets:
        fraction = min(1.0, budget / manifest.total_expert_bytes)
        if counts:  # the cache keeps the hottest experts, whichever layer they are in
            local, _ = placement(manifest, budget, [], counts)
            alone = layer_shares(manifest, local, [], [], counts)
        else:  # an LFU cache under uniform routing holds the same share of every layer
            alone = uniform(fraction, len(manifest.layers))
        row: dict[str, Any] = {"cache": label, "cache_bytes": budget, "cache_fraction": fraction,
                               "no_nodes": predict(m_disk, alone).to_dict(),
                               "no_nodes_page_cache_warm": predict(m_warm, alone).to_dict(),
                               "with_nodes": None}
        if usable:
            local, plan = placement(manifest, budget, nodes, counts)
            row["with_nodes"] = predict(m_disk, layer_shares(manifest, local, plan, rtts, counts)).to_dict()
        rows.append(row)
    return rows


def run_plan(model_dir: Path, cache_bytes: int | None, addresses: list[str], credentials: Any) -> dict[str, Any]:
    manifest = read_manifest(model_dir)
    budget = cache_bytes if cache_bytes is not None else default_cache_bytes(manifest)
    if budget < manifest.expert_bytes:
        raise CacheBudgetError(f"--cache-mb {budget / 2**20:g} holds no expert (one is "
                               f"{manifest.expert_bytes / 2**20:.3f} MiB): raise it")
    paths = expert_paths(model_dir, manifest)
    k = experts_per_token(read_config(model_dir))
    raw = measure_reads(paths, record_jobs(manifest, max_bytes=DISK_SAMPLE_BYTES))
    sm = load_streaming_model(model_dir, cache_bytes=hit_budget_bytes(manifest, k))
    try:
        steps = measure_steps(sm, paths)
        dense_bytes = sm.dense_bytes
        hidden_size = input_dims(sm.dispatchers[0].kernel)
        # What `generate`'s default --map-experts auto would do with this budget (every layer resident).
        maps = mapping_chosen(None, manifest, budget, sm.local.dma, "lfu", nodes=bool(addresses),
                              direct_io=sm.local.store.direct)
    finally:
        sm.close()
    nodes = measure_nodes(addresses, credentials, manifest, hidden_size, k) if addresses else []
    total = manifest.total_expert_bytes
    budgets = [(f"{a}/{b}", max(manifest.expert_bytes, total * a // b)) for a, b in CACHE_FRACTIONS]
    budgets.append(("--cache-mb" if cache_bytes is not None else "default", budget))
    counts = load_counts(manifest)  # the learned hot set, read only
    local, plan = placement(manifest, budget, nodes, counts)
    usable = [n for n in nodes if n["usable"]]
    placed = {n["address"]: len(keys) for n, keys in zip(usable, plan)}
    ssd_only = len(expert_keys(manifest)[0]) - len(local) - sum(placed.values())
    return {
        "model": str(model_dir), "model_type": manifest.model_type, "moe_layers": len(manifest.layers),
        "experts_per_layer": manifest.layers[0].num_experts, "experts_per_token": k,
        "expert_record_bytes": manifest.expert_bytes, "total_expert_bytes": total, "dense_bytes": dense_bytes,
        "backend": compute_backend(), "ram_bytes": ram_bytes(), "array_memory": array_memory_kind(),
        "array_memory_bytes": array_memory_bytes(),
        "disk_raw_read_gbps": raw.gbps, "disk_raw_read_method": raw.method,
        "io": steps.io, "disk_miss_gbps": steps.disk.gbps, "disk_miss_layer_ms": steps.disk.layer_s * 1e3,
        "page_cache_miss_gbps": steps.page_cache.gbps, "page_cache_miss_layer_ms": steps.page_cache.layer_s * 1e3,
        "hit_step_ms": steps.hit_step_s * 1e3, "expert_ms": steps.expert_s * 1e3,
        "routing": (f"learned hot set ({len(counts)} experts counted)" if counts
                    else "uniform (no learned hot set)"),
        "nodes": [{k_: v for k_, v in n.items() if k_ != "held"} for n in nodes],
        "cache_bytes": budget, "maps_experts": maps,
        "placement": {"local_experts": len(local), "local_layers": sorted({key[0] for key in local}),
                      "nodes": placed, "ssd_only_experts": ssd_only},
        "predictions": _predictions(manifest, machine(manifest, k, steps, steps.disk),
                                    machine(manifest, k, steps, steps.page_cache), budgets, nodes, counts),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _tok(p: dict[str, Any] | None) -> str:
    return "-" if p is None else f"{p['tokens_per_s']:.1f}"


def format_plan(r: dict[str, Any]) -> str:
    lines = [
        f"edgemoe plan: {r['model']} ({r['model_type']}, {r['moe_layers']} MoE layers of {r['experts_per_layer']} "
        f"experts, K={r['experts_per_token']}; experts {_mib(r['total_expert_bytes'])}, "
        f"dense {_mib(r['dense_bytes'])})",
        f"this machine: MLX {r['backend']}, {r['array_memory_bytes'] / 2**30:.1f} GiB {r['array_memory']} for arrays; "
        f"disk {r['disk_raw_read_gbps']:.2f} GB/s raw ({r['disk_raw_read_method']}, record-sized reads)",
        f"  decode step with every expert cached {r['hit_step_ms']:.2f} ms; one expert on one row "
        f"{r['expert_ms']:.3f} ms",
        f"  a miss ({r['io']} I/O) costs {r['disk_miss_layer_ms']:.2f} ms per layer that misses plus its bytes at "
        f"{r['disk_miss_gbps']:.2f} GB/s from the disk; {r['page_cache_miss_layer_ms']:.2f} ms and "
        f"{r['page_cache_miss_gbps']:.2f} GB/s from the page cache",
    ]
    for n in r["nodes"]:
        if n["usable"]:
            lines.append(f"node {n['name']} ({n['address']}): round trip {n['rtt_ms']:.2f} ms, capacity "
                         f"{_mib(n['capacity_bytes'])} ({_mib(n['used_bytes'])} used), holds {n['experts_held']} "
                         "experts of this model")
        else:
            lines.append(f"node {n['address']}: not usable: {n['error']}")
    p = r["placement"]
    layers = p["local_layers"]
    placed = ", ".join(f"{address} {count}" for address, count in p["nodes"].items())
    lines += [
        "",
        f"placement with a {_mib(r['cache_bytes'])} cache, routing {r['routing']}:",
        f"  here {p['local_experts']} experts (layers {layers[0]}-{layers[-1]})" if layers else "  here none",
        f"  nodes: {placed or 'none'}; SSD only: {p['ssd_only_experts']} experts",
        "",
        f"predicted tok/s (the performance model of docs/DESIGN.md; routing {r['routing']}):",
        f"  {'cache':<22} {'hit rate':>8} {'SSD MiB/token':>14} {'no nodes':>9} {'page cache warm':>16} "
        f"{'with nodes':>11}",
    ]
    for row in r["predictions"]:
        alone = row["no_nodes"]
        lines.append(f"  {row['cache'] + ' (' + _mib(row['cache_bytes']) + ')':<22} {100 * alone['hit_rate']:>7.1f}% "
                     f"{alone['ssd_bytes_per_token'] / 2**20:>14.2f} {_tok(alone):>9} "
                     f"{_tok(row['no_nodes_page_cache_warm']):>16} {_tok(row['with_nodes']):>11}")
    lines.append("  no nodes: misses read from the disk; page cache warm: from RAM (experts that fit the page cache); "
                 "with nodes: the placement of that cache size, misses from the disk")
    if r["maps_experts"]:
        bus = ", less what crosses the bus" if r["backend"] == "cuda" else ""
        lines.append(f"  without nodes, generate, chat and serve map every expert here (--map-experts auto: RAM holds "
                     f"them), so every layer is resident: expect about the 1/1 row once they are in RAM "
                     f"({1e3 / r['hit_step_ms']:.1f} tok/s{bus}); the rows above are --map-experts off")
    return "\n".join(lines)
