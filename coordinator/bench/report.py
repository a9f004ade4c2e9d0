"""The benches' text reports, and the notes a bench collects on what it skipped or why a
figure may mislead."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MiB = 2**20
# On the CPU backend MLX's peak is its own allocations, a part of peak RSS, not a device's memory.
_CPU_PEAK = "; MLX's own allocations, part of peak RSS"


@dataclass
class Notes:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        log.info("note: %s", text)
        self.items.append(text)


def _f(value: Any, fmt: str = "{:.2f}", unit: str = "") -> str:
    return "n/a" if value is None else fmt.format(value) + unit


def _mib(value: float | None) -> str:
    return _f(None if value is None else value / MiB, "{:.2f}", " MiB")


def _pct(value: float | None) -> str:
    return _f(None if value is None else 100 * value, "{:.1f}", "%")


def _speeds(values: list[float | None] | None) -> str:
    return ", ".join(_f(v, "{:.1f}") for v in values or [])


def _same_tokens_as_mlx_lm(r: dict[str, Any]) -> str:
    if r["same_tokens_as_mlx_lm"] is not None:
        return f"same tokens as {r['mlx_lm_model']}: {r['same_tokens_as_mlx_lm']}"
    return f"same tokens as the model rebuilt from the packed files: {_f(r['same_tokens_as_rebuilt_model'], '{}')}"


def _dead_peer_lines(r: dict[str, Any]) -> list[str]:
    if r.get("dead_peer_tokens_per_s_runs") is None:
        return []
    return [
        "",
        f"peers configured but all down (one peer, {r['dead_peer_address']}, refusing connections): "
        f"cold decode, {r['dead_peer_runs']} alternating runs each, medians",
        f"  no peers              {_f(r['no_peers_tokens_per_s'], unit=' tok/s')}  "
        f"({_speeds(r['no_peers_tokens_per_s_runs'])})",
        f"  dead peer             {_f(r['dead_peer_tokens_per_s'], unit=' tok/s')}  "
        f"({_speeds(r['dead_peer_tokens_per_s_runs'])}) -> {_f(r['dead_peer_relative_to_no_peers'])} of no peers; "
        f"same tokens: {r['dead_peer_same_tokens_as_no_peers']}; {r['dead_peer_peer_calls']} peer calls",
    ]


def _layer_line(r: dict[str, Any], prefix: str) -> str:
    return (f"  per MoE layer         {_f(r.get(prefix + 'layer_us'), '{:.0f}', ' us')} of the token: waiting for the "
            f"router's choice {_f(r.get(prefix + 'routing_wait_us'), '{:.0f}', ' us')}, dispatch "
            f"{_f(r.get(prefix + 'dispatch_us'), '{:.0f}', ' us')}, the rest (dense layers, expert compute) "
            "not waited for per layer")


def _mapped_lines(r: dict[str, Any]) -> list[str]:
    which = "alternated" if r.get("mapped_eighth_mlx_lm_alternated") else "its fastest run above"
    decode = (f"  decode                {_f(r['mapped_eighth_tokens_per_s'], unit=' tok/s')}  "
              f"({_speeds(r['mapped_eighth_tokens_per_s_runs'])}); plain mlx-lm ({which}) "
              f"{_f(r.get('mapped_eighth_mlx_lm_tokens_per_s'), unit=' tok/s')}; ")
    same = f"same tokens as the cold run: {r['mapped_eighth_same_tokens_as_cold_run']}"
    if r.get("mapped_eighth_backend") == "cpu":
        return [
            "",
            "mapped: every expert computed on the page cache's own pages, warm, with no cache of ours "
            "(--map-experts)",
            decode + same,
            f"  bound                 {_f(r.get('mapped_eighth_bound_tokens_per_s'), unit=' tok/s')} = mlx-lm "
            f"-> {_pct(r.get('mapped_eighth_relative_to_bound'))} of it (target >= 90%)",
        ]
    return [
        "",
        f"mapped, 1/8 of the experts on the GPU ({_mib(r['mapped_eighth_gpu_budget_bytes'])}), the rest in host "
        "memory read over the bus (--map-experts)",
        decode + f"{_mib(r['mapped_eighth_bus_bytes_per_token'])}/token over the bus; " + same,
        f"  bound                 {_f(r.get('mapped_eighth_bound_tokens_per_s'), unit=' tok/s')} = min(mlx-lm, "
        f"host-to-device {_f(r.get('host_to_device_gbps'), unit=' GB/s')} / bytes over the bus per token) "
        f"-> {_pct(r.get('mapped_eighth_relative_to_bound'))} of it (target >= 80%)",
    ]


def _warm_mlx_lm(r: dict[str, Any]) -> str:
    if r.get("warm_eighth_mlx_lm_tokens_per_s") is None:
        return "plain mlx-lm not run"
    which = "its runs alternated with these" if r.get("warm_eighth_mlx_lm_alternated") else "its fastest run above"
    return f"{which}: {_f(r['warm_eighth_mlx_lm_tokens_per_s'], unit=' tok/s')}"


def _cold_bound_name(r: dict[str, Any]) -> str:
    if r.get("warm_eighth_mlx_lm_tokens_per_s") is None:
        return "SSD bound (no mlx-lm run)"
    return "min(SSD bound, mlx-lm of the warm case below)"


def _all_cached_lines(r: dict[str, Any]) -> list[str]:
    lines = ["", f"every expert cached ({_mib(r['all_cached_budget_bytes'])}), alternating runs after "
             f"{r.get('all_cached_warmup_rounds', 0)} untimed round, medians"]
    if r.get("all_cached_mlx_lm_tokens_per_s") is not None:
        lines.append(f"  {'plain mlx-lm':<21} {_f(r['all_cached_mlx_lm_tokens_per_s'], unit=' tok/s')}  "
                     f"({_speeds(r['all_cached_mlx_lm_tokens_per_s_runs'])}), the reference of the two below")
    elif r.get("mlx_lm_tokens_per_s") is not None:
        lines.append("  (plain mlx-lm not alternated: the reference is its fastest run above)")
    else:
        lines.append("  (plain mlx-lm not run)")
    for prefix, name in (("all_cached_", "resident tables"), ("all_cached_host_routing_", "host routing")):
        lines += [
            f"  {name:<21} {_f(r[prefix + 'tokens_per_s'], unit=' tok/s')}  "
            f"({_speeds(r[prefix + 'tokens_per_s_runs'])}) "
            f"-> {_pct(r[prefix + 'relative_to_mlx_lm'])} of mlx-lm (target >= 90%); "
            f"same tokens as mlx-lm: {_f(r[prefix + 'same_tokens_as_mlx_lm'], '{}')}",
            _layer_line(r, prefix),
        ]
    return lines


def format_report(report: dict[str, Any]) -> str:
    """`edgemoe bench`'s report."""
    r = report
    lines = [
        f"edgemoe bench: {r['model']} ({r['model_type']}, {r['layers']} MoE layers, K={r['experts_per_token']}, "
        f"experts {_mib(r['total_expert_bytes'])}, dense {_mib(r['dense_bytes'])})",
        "",
        "disk",
        f"  raw sequential read   {_f(r['raw_read_gbps'], unit=' GB/s')}  ({r['raw_read_method']}, "
        f"{r['raw_read_threads']} threads x {_mib(r['raw_read_block_bytes'])} blocks, "
        f"{_mib(r['raw_read_bytes'])} read)",
        f"  buffered, cache cold  {_f(r['raw_read_buffered_gbps'], unit=' GB/s')}  ({r['raw_read_buffered_method']})",
        f"  record-sized random   {_f(r['raw_record_read_gbps'], unit=' GB/s')}  "
        f"({r['raw_record_read_method']}, {_f(r['raw_record_read_block_bytes'] / 1024, '{:.0f}', ' KiB')} reads)",
        f"  fio --direct=1        {_f(r['fio_read_gbps'], unit=' GB/s')}",
        "",
        f"cold decode ({'direct' if r['direct_io'] else 'buffered'} I/O{', prefetch' if r['prefetch'] else ''}, "
        f"cache {_mib(r['cache_budget_bytes'])}, page cache dropped: {r['page_cache_drop_method'] or 'no'}, "
        f"resident at start {_pct(r['page_cache_resident_at_start'])})",
        f"  decode                {_f(r['tokens_per_s'], unit=' tok/s')}  ({r['decode_tokens']} tokens; "
        f"prompt {r['prompt_tokens']} tokens at {_f(r['prompt_tokens_per_s'], '{:.1f}', ' tok/s')})",
        f"  cache hit rate        {_pct(r['cache_hit_rate'])}",
        f"  SSD reads             {_mib(r['ssd_bytes_read'])} decode, {_mib(r['ssd_bytes_per_token'])}/token "
        f"(DESIGN formula {_mib(r['design_ssd_bytes_per_token'])}/token); prefill {_mib(r['prefill_ssd_bytes_read'])}",
        f"  first reads           {r['decode_first_reads']} of {r['expert_reads']} decode reads "
        f"({_mib(r['decode_first_read_bytes'])}) were of records not read since the drop; "
        "re-reads are served by the page cache",
        f"  from the disk         {_mib(r['decode_disk_bytes_read'])} in decode (kernel's count, readahead included)",
        f"  expert reads          {_f(r['expert_read_gbps'], unit=' GB/s')}  "
        f"= {_pct(r['read_efficiency'])} of raw, {_pct(r['record_read_efficiency'])} of record-sized raw",
        f"  SSD bound             {_f(r['ssd_bound_tokens_per_s'], '{:.1f}', ' tok/s')}  "
        f"(raw over {_mib(r.get('ssd_bound_bytes_per_token'))}/token asked for) "
        f"-> decode at {_pct(r['bound_efficiency'])} of it",
        _layer_line(r, ""),
        "",
        "cold decode, page cache dropped before every token (each miss reads the disk)",
        f"  decode                {_f(r['every_token_cold_tokens_per_s'], unit=' tok/s')}  "
        f"({_mib(r['every_token_cold_ssd_bytes_per_token'])}/token read, "
        f"{_mib(r['every_token_cold_disk_bytes_per_token'])}/token from the disk)",
        f"  expert reads          {_f(r['every_token_cold_expert_read_gbps'], unit=' GB/s')}  "
        f"= {_pct(r['every_token_cold_read_efficiency'])} of raw timed just before the run "
        f"({_f(r.get('every_token_cold_raw_read_gbps'), unit=' GB/s')})",
        f"  SSD bound             {_f(r['every_token_cold_ssd_bound_tokens_per_s'], '{:.1f}', ' tok/s')}  "
        f"(raw over {_mib(r.get('every_token_cold_bound_bytes_per_token'))}/token asked for) "
        f"-> decode at {_pct(r['every_token_cold_bound_efficiency'])} of it (the median run; each run of its "
        f"own bound: {', '.join(_pct(v) for v in r.get('every_token_cold_bound_efficiency_runs') or [])})",
        f"  bound                 {_f(r.get('every_token_cold_min_bound_tokens_per_s'), unit=' tok/s')} "
        f"= {_cold_bound_name(r)} "
        f"-> {_pct(r.get('every_token_cold_relative_to_min_bound'))} of it (target >= 80%)",
        f"  predicted             {_f(r.get('every_token_cold_predicted_tok_s'), unit=' tok/s')}  "
        f"-> measured/predicted {_f(r.get('every_token_cold_measured_over_predicted'))}",
        "",
        "memory (peaks of the runs above, before the other models below load)",
        f"  peak RSS              {_mib(r['peak_rss_bytes'])}",
        f"  MLX peak              {_mib(r['peak_array_bytes'])} in {r['array_memory']} "
        f"(of {_f(r['array_memory_bytes'] / 2**30, unit=' GiB')}{_CPU_PEAK if r['array_memory'] == 'RAM' else ''})",
        *_dead_peer_lines(r),
        "",
        f"plain mlx-lm (all experts in RAM; {r['mlx_lm_model'] or 'not run'})",
        f"  decode                {_f(r['mlx_lm_tokens_per_s'], unit=' tok/s')}  "
        f"-> streaming cold at {_pct(r['relative_to_mlx_lm'])}; {_same_tokens_as_mlx_lm(r)}",
        "",
        f"warm, 1/8 of the experts cached ({_mib(r['warm_eighth_cache_budget_bytes'])}), page cache warm",
        f"  decode                {_f(r['warm_eighth_tokens_per_s'], unit=' tok/s')}  "
        f"-> {_pct(r['warm_eighth_relative_to_mlx_lm'])} of mlx-lm (target >= 90%; "
        f"{_warm_mlx_lm(r)}); "
        f"hit rate {_pct(r['warm_eighth_cache_hit_rate'])}, {_mib(r['warm_eighth_ssd_bytes_per_token'])}/token "
        f"at {_f(r['warm_eighth_expert_read_gbps'], unit=' GB/s')}; "
        f"same tokens as the cold run: {r['warm_eighth_same_tokens_as_cold_run']}",
        f"  bound                 {_f(r.get('warm_eighth_bound_tokens_per_s'), unit=' tok/s')} = min(mlx-lm, "
        f"host-to-device {_f(r.get('host_to_device_gbps'), unit=' GB/s')} / missed bytes per token) "
        f"-> {_pct(r.get('warm_eighth_relative_to_bound'))} of it (target >= 80%)",
        _layer_line(r, "warm_eighth_"),
        f"  predicted             {_f(r.get('warm_eighth_predicted_tok_s'), unit=' tok/s')} at its hit rate "
        f"-> measured/predicted {_f(r.get('warm_eighth_measured_over_predicted'))}; "
        f"{_f(r.get('warm_eighth_predicted_from_cache_fraction_tok_s'), unit=' tok/s')} at hit rate = cache fraction "
        f"-> {_f(r.get('warm_eighth_measured_over_predicted_from_cache_fraction'))}",
        f"  (model inputs: decode step with every expert cached {_f(r.get('predict_hit_step_ms'), unit=' ms')}, "
        f"one expert {_f(r.get('predict_expert_ms'), '{:.3f}', ' ms')}; a miss: "
        f"{_f(r.get('predict_disk_miss_layer_ms'), unit=' ms')} per layer + its bytes at "
        f"{_f(r.get('predict_disk_miss_gbps'), unit=' GB/s')} from the disk, "
        f"{_f(r.get('predict_page_cache_miss_layer_ms'), unit=' ms')} + "
        f"{_f(r.get('predict_page_cache_miss_gbps'), unit=' GB/s')} from the page cache)",
    ]
    if r.get("all_cached_tokens_per_s") is not None:
        lines += _all_cached_lines(r)
    if r.get("mapped_eighth_tokens_per_s") is not None:
        lines += _mapped_lines(r)
    if r.get("in_place_tokens_per_s") is not None:
        lines += [
            "",
            "in-place pack (experts read from the source safetensors)",
            f"  decode                {_f(r['in_place_tokens_per_s'], unit=' tok/s')}  "
            f"(expert reads {_f(r['in_place_expert_read_gbps'], unit=' GB/s')}, "
            f"same tokens as the cold run: {r['in_place_same_tokens_as_cold_run']})",
            f"  full repack gains     x{_f(r['repack_tokens_per_s_gain'])} tok/s, "
            f"x{_f(r['repack_read_gbps_gain'])} expert read GB/s",
        ]
    return _closing(lines, r)


def format_cluster_report(report: dict[str, Any]) -> str:
    """`edgemoe bench --cluster N`'s report."""
    r = report
    placed = ", ".join(f"{name} {count}" for name, count in r.get("experts_placed", {}).items())
    lines = [
        f"cluster bench: {r['model']} ({r['model_type']}), {r['nodes']} edge nodes on {r['host']}, "
        f"{r['tokens']} tokens, fastest of {r['repeats']}",
        f"  {r['moe_layers']} MoE layers, {r['experts_per_token']} experts per token; coordinator cache "
        f"{r['coordinator_cache_budget_bytes'] / MiB:.2f} MiB of {r['total_expert_bytes'] / MiB:.2f} MiB of experts, "
        f"each node {r['node_cache_budget_bytes'] / MiB:.2f} MiB",
        f"  placement: {placed or 'nothing'} experts, pushed in {_f(r.get('push_seconds'), '{:.1f}', ' s')}",
        "",
        f"no peers: {_f(r['no_peer_tokens_per_s'], '{:.1f}', ' tok/s')}, "
        f"local work {_f(r['local_layer_ms'], '{:.3f}', ' ms')} per MoE layer",
        "",
        "added RTT   RTT per call   slowest per layer   peer layers/token   tok/s   cluster bound   "
        "of bound   vs no peers   same tokens   predicted (measured/predicted)",
    ]
    for run in r["runs"]:
        added = f"{run['added_rtt_ms']:g} ms" if run["through_relay"] else "0 (direct)"
        lines.append(
            f"{added:<11} {_f(run['rtt_ms'], '{:.2f}'):>9} ms   "
            f"{_f(run['layer_rtt_ms'], '{:.2f}', ' ms'):>17}   {_f(run['peer_layers_per_token'], '{:.1f}'):>17}   "
            f"{_f(run['tokens_per_s'], '{:.1f}'):>5}   "
            f"{_f(run['cluster_bound_tokens_per_s'], '{:.1f}', ' tok/s'):>13}   "
            f"{_f(run['bound_efficiency'] and 100 * run['bound_efficiency'], '{:.0f}', '%'):>8}   "
            f"{_f(run['relative_to_no_peers'] and 100 * run['relative_to_no_peers'], '{:.0f}', '%'):>11}   "
            f"{run['same_tokens']!s:<11}   {_f(run.get('predicted_tok_s'), '{:.1f}')} "
            f"({_f(run.get('measured_over_predicted'))})"
        )
    lines.append("")
    lines.append("cluster bound: tok/s <= 1 / (MoE layers x (peer share x max(slowest RTT, local work) "
                 "+ (1 - peer share) x local work))")
    return _closing(lines, r)


def _closing(lines: list[str], r: dict[str, Any]) -> str:
    if r["notes"]:
        lines += ["", "notes"] + [f"  - {n}" for n in r["notes"]]
    lines.append(f"\n(bench took {r['bench_seconds']:.1f} s)")
    return "\n".join(lines)
