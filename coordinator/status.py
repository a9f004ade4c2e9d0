"""`edgemoe status`: the coordinator, each node and the last generation, on one screen.

Also home of what `edgemoe peers` and `edgemoe status` share (probing the nodes)
and of the last run's record, which `generate` and `chat` write and `status` reads.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

LAST_RUN_FILE = "last-run.json"


def edgemoe_home() -> Path:
    """$EDGEMOE_HOME, else ~/.cache/edgemoe: where the last run's record lives."""
    home = os.environ.get("EDGEMOE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "edgemoe"


def last_run_path() -> Path:
    return edgemoe_home() / LAST_RUN_FILE


def save_last_run(command: str, model: Path | str, stats: dict, dense_bytes: int | None = None,
                  nodes_in_use: list[str] | None = None) -> None:
    """Record a generation's figures (GenerationStats plus cluster stats); never fails the generation."""
    record = {
        "command": command,
        "model": str(model),
        "finished_at": time.time(),
        "dense_bytes": dense_bytes,
        "nodes_in_use": nodes_in_use or [],
        "stats": stats,
    }
    path = last_run_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record the run's figures in %s: %s", path, exc)


def load_last_run() -> dict | None:
    """The last run's record, or None when there is none (or it is unreadable)."""
    path = last_run_path()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def nodes_in_use(cluster: dict | None) -> list[str]:
    """Names (else addresses) of the healthy nodes in a cluster snapshot (`Cluster.snapshot()`);
    empty when running alone (None)."""
    if cluster is None:
        return []
    return [n["name"] or n["address"] for n in cluster["nodes"] if n["healthy"]]


def probe_peers(addresses: list[str], credentials) -> list[dict]:
    """Connect to each node once: health, round trip, experts held, cache use."""
    from .peers import Peer

    rows = []
    for address in addresses:
        peer = Peer(address, credentials)
        try:
            start, sent = time.perf_counter(), time.time()
            ok = peer.connect(fingerprint="")
            rtt_ms = (time.perf_counter() - start) * 1e3
            received = time.time()
            info = peer.info
            # The node's clock against the midpoint of ours around its answer (± half the round trip).
            skew = info.unix_time - (sent + received) / 2 if ok and info and info.unix_time else None
            rows.append({
                "address": address, "healthy": ok, "rtt_ms": round(rtt_ms, 2) if ok else None,
                "name": info.name if info else None, "node_id": info.node_id if info else None,
                "experts_held": sum(len(m.layers) for m in info.models) if info else None,
                "models": [m.fingerprint[:12] for m in info.models] if info else [],
                "cache_used_bytes": info.cache_used_bytes if info else None,
                "cache_free_bytes": info.cache_budget_bytes - info.cache_used_bytes if info else None,
                "clock_skew_s": round(skew, 3) if skew is not None else None,
                "error": None if ok else peer.last_error,
            })
        finally:
            peer.close()
    return rows


def format_peer_rows(rows: list[dict]) -> list[str]:
    """One line per node: `NAME (HOST:PORT)` (nodes of one host name stay apart), then its state."""
    if not rows:
        return ["no nodes found (the warning above says where edgemoe looked; start `edge-node --join TOKEN` on "
                "other devices, or pass --peers HOST:PORT)"]
    lines = []
    for r in rows:
        if r["healthy"]:
            lines.append(
                f"{r['name'] + ' (' + r['address'] + ')':<40} healthy  rtt {r['rtt_ms']:.1f} ms  "
                f"experts {r['experts_held']}  cache used {r['cache_used_bytes'] / 2**20:.1f} MiB "
                f"free {r['cache_free_bytes'] / 2**20:.1f} MiB")
        else:
            lines.append(f"{r['address']:<40} unreachable: {r['error']}")
    return lines


def coordinator_info(cluster_dir: Path, last: dict | None) -> dict:
    from edgemoe.node.credentials import TOKEN_FILE, cluster_id, load_cluster_secret
    from edgemoe.node.errors import EdgemoeError
    from edgemoe.node.version import EDGEMOE_VERSION

    info: dict = {"version": EDGEMOE_VERSION, "cluster_dir": str(cluster_dir), "cluster_id": None,
                  "cluster_error": None}
    if (cluster_dir / TOKEN_FILE).exists():
        try:
            info["cluster_id"] = cluster_id(load_cluster_secret(cluster_dir))
        except EdgemoeError as exc:
            info["cluster_error"] = str(exc)
    stats = (last or {}).get("stats") or {}
    info.update({
        "model": (last or {}).get("model"),
        "cache_bytes_used": stats.get("cache_bytes_used"),
        "cache_budget_bytes": stats.get("cache_budget_bytes"),
        "dense_bytes": (last or {}).get("dense_bytes"),
    })
    return info


def _mib(n) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def format_status(status: dict) -> str:
    c, last = status["coordinator"], status["last_run"]
    lines = [f"coordinator  edgemoe {c['version']}"]
    if c["cluster_id"]:
        lines.append(f"  cluster    {c['cluster_id']}  ({c['cluster_dir']})")
    elif c["cluster_error"]:
        lines.append(f"  cluster    unusable: {c['cluster_error']}")
    else:
        lines.append(f"  cluster    none (no token in {c['cluster_dir']}; `edgemoe cluster init` makes one)")
    if last:
        lines.append(f"  model      {c['model']}")
        lines.append(f"  cache      {_mib(c['cache_bytes_used'])} used of {_mib(c['cache_budget_bytes'])}   "
                     f"dense {_mib(c['dense_bytes'])}")
    lines.append("")
    lines.append(f"nodes ({len(status['nodes'])})")
    lines.extend("  " + line for line in format_peer_rows(status["nodes"]))
    lines.append("")
    if not last:
        lines.append("last generation: no generation yet")
    else:
        s = last["stats"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["finished_at"]))
        used = ", ".join(last.get("nodes_in_use") or []) or "local only"
        lines.append(f"last generation ({last['command']}, {when})")
        lines.append(f"  tokens     {s['generated_tokens']} at {s['tokens_per_s']:.2f} tok/s "
                     f"(prompt {s['prompt_tokens']} at {s['prompt_tokens_per_s']:.1f} tok/s), {s['seconds']:.2f} s")
        lines.append(f"  cache      hit rate {s['cache_hit_rate']:.1%} ({s['cache_hits']} hits, "
                     f"{s['cache_misses']} misses)")
        lines.append(f"  SSD        {_mib(s['ssd_bytes_read'])} at {s['ssd_read_gbps']:.2f} GB/s   "
                     f"peak RSS {_mib(s['peak_rss_bytes'])}")
        lines.append(f"  nodes      {used}")
        if "peer_calls" in s:
            lines.append(f"  cluster    {s['peer_calls']} peer calls, {s['experts_from_peers']} experts from nodes, "
                         f"{s['fallbacks']} fallbacks")
    return "\n".join(lines)


def collect_status(addresses: list[str], credentials, cluster_dir: Path) -> dict:
    last = load_last_run()
    return {
        "coordinator": coordinator_info(cluster_dir, last),
        "nodes": probe_peers(addresses, credentials),
        "last_run": last,
    }
