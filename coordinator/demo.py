"""`edgemoe demo`: the built-in model packed and generating with edge nodes on this machine,
showing where every expert came from (the coordinator's RAM cache, a node, the SSD), then
the same generation again with a node killed halfway, and both checked against mlx-lm.

The RAM is split so every source shows: the coordinator caches a share of the experts,
each node holds a share (placement pushes the most-routed ones there first), and
the rest stay on the coordinator's SSD. The nodes listen on 127.0.0.1 with a
throwaway cluster token and are stopped before the demo returns.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from edgemoe.node.credentials import ClusterCredentials, format_token, new_secret
from edgemoe.node.errors import EdgemoeError
from edgemoe.node.manifest import read_manifest

from .demo_model import write_demo_model
from .generate import GenerationResult, build_prompt, generate, stream
from .loader import load_streaming_model
from .local_nodes import Children, sigterm_as_interrupt, start_nodes
from .pack import pack
from .progress import show_push_progress
from .streaming import StreamingModel

DEMO_PROMPT = "def get(self, key"
DEMO_TOKENS = 40
PUSH_TIMEOUT_S = 120.0
MAX_NODES = 8
# what may be in the demo's directory: its own model and pack, and `make bench`'s
# The demo's own, and the benchmark models the README keeps beside them (`make bench`, the large demo model).
DEMO_DIR_ENTRIES = {"src", "packed", "bench-src", "bench-packed", "large-src", "large-packed"}


@dataclass
class Sources:
    """Where a run's experts came from: each layer call's distinct experts, counted once each."""

    cache: int
    ssd: int
    nodes: dict[str, int]
    peer_calls: int
    fallbacks: int

    @property
    def total(self) -> int:
        return self.cache + self.ssd + sum(self.nodes.values())


@dataclass
class DemoRun:
    text: str
    token_ids: list[int]
    tokens_per_s: float
    sources: Sources
    same_as_mlx_lm: bool
    killed_node: str | None = None
    killed_after_tokens: int | None = None
    # each node's health when the run ended
    nodes_healthy: dict[str, bool] = field(default_factory=dict)


@dataclass
class DemoReport:
    model_dir: str
    packed_dir: str
    prompt: str
    expert_bytes: int
    coordinator_cache_bytes: int
    node_cache_bytes: int
    nodes: list[dict[str, Any]] = field(default_factory=list)
    placed: dict[str, int] = field(default_factory=dict)
    reference_token_ids: list[int] = field(default_factory=list)
    runs: list[DemoRun] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _check_demo_dir(directory: Path) -> None:
    """The demo replaces DIR/src and DIR/packed: only in a directory that holds nothing else
    (`make bench` keeps its models beside them)."""
    if directory.exists() and not directory.is_dir():
        raise EdgemoeError(f"--dir {directory} is a file; give a directory for the demo model")
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir()
                        if p.name not in DEMO_DIR_ENTRIES and not p.name.startswith(".packed."))
        if others:
            raise EdgemoeError(f"--dir {directory} holds other files ({', '.join(others[:3])}); the demo replaces "
                               "its src/ and packed/, so give it a new or empty directory")


def mlx_lm_reference(src: Path, prompt_tokens: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of plain mlx-lm on the source model, all experts in RAM."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(src))[:2]
    tokens = [r.token for r in stream(model, tokenizer, prompt_tokens, max_tokens)]
    del model
    mx.clear_cache()
    return tokens


def _run(sm: StreamingModel, generate_run: Callable[[], GenerationResult]
         ) -> tuple[GenerationResult, Sources, dict[str, bool]]:
    """One generation, where its experts came from, and each node's health when it ended."""
    assert sm.cluster is not None  # the demo always loads with its own nodes as peers
    before = sm.cluster.snapshot()
    result = generate_run()
    after = sm.cluster.snapshot()
    nodes = {n["name"]: n["experts_computed"] - b["experts_computed"] for n, b in zip(after["nodes"], before["nodes"])}
    sources = Sources(result.stats.experts_from_cache, result.stats.experts_from_ssd, nodes,
                      after["peer_calls"] - before["peer_calls"], after["fallbacks"] - before["fallbacks"])
    return result, sources, {n["name"]: n["healthy"] for n in after["nodes"]}


def run_demo(
    directory: Path,
    nodes: int = 2,
    prompt: str = DEMO_PROMPT,
    max_tokens: int = DEMO_TOKENS,
    say: Callable[[str], None] = print,
    show_text: Callable[[str], None] | None = None,
    command: str = "edgemoe",
) -> DemoReport:
    if not 1 <= nodes <= MAX_NODES:
        raise EdgemoeError(f"--nodes {nodes}: the demo runs 1 to {MAX_NODES} nodes")
    if max_tokens < 2:
        raise EdgemoeError(f"--max-tokens {max_tokens} must be at least 2 (a node is killed halfway)")
    directory = Path(directory)
    src, packed = directory / "src", directory / "packed"
    _check_demo_dir(directory)
    try:
        write_demo_model(src)
        pack(src, packed, force=True)
    except OSError as exc:
        raise EdgemoeError(f"--dir {directory}: cannot write the demo model there ({exc.strerror or exc}); "
                           "pick a directory you can write to") from exc
    manifest = read_manifest(packed)
    total = manifest.total_expert_bytes
    # One share each for the coordinator's cache, every node, and the SSD alone.
    share = max(manifest.expert_bytes, total // (nodes + 2))
    report = DemoReport(str(src), str(packed), prompt, total, share, share)
    n_experts = sum(spec.num_experts for spec in manifest.layers)
    say(f"demo model: {len(manifest.layers)} MoE layers x {manifest.layers[0].num_experts} experts "
        f"({n_experts} experts, {total / 2**20:.1f} MiB), written to {src} and packed to {packed}")
    say(f"RAM for experts: coordinator cache {share / 2**20:.2f} MiB, each node {share / 2**20:.2f} MiB; "
        "the rest stays on the coordinator's SSD")

    secret = new_secret()
    credentials = ClusterCredentials.create(secret, "coordinator")
    children = Children()
    with tempfile.TemporaryDirectory(prefix="edgemoe-demo-") as tmp, sigterm_as_interrupt():
        try:
            running = start_nodes(children, format_token(secret), Path(tmp), nodes, share)
            addresses = [address for _, address in running]
            report.nodes = [{"name": c.name, "address": a, "pid": c.pid} for c, a in running]
            say(f"started {nodes} edge node(s) on loopback: "
                + ", ".join(f"{n['name']} {n['address']}" for n in report.nodes))
            # No audits: an audited node reply is computed here too, and the demo's table counts
            # each expert load once (the nodes are the demo's own; `--audit` is on elsewhere).
            sm = load_streaming_model(packed, cache_bytes=share, peers=addresses, credentials=credentials,
                                      audit_rate=0.0)
            assert sm.cluster is not None  # 1 to MAX_NODES nodes: there are peers
            try:
                down = [f"{p.address}: {p.last_error}" for p in sm.cluster.peers if not p.healthy]
                if down:
                    raise EdgemoeError(f"the demo's own nodes are unusable ({'; '.join(down)})")
                if not show_push_progress(sm.cluster, PUSH_TIMEOUT_S):
                    say(f"placement was not complete after {PUSH_TIMEOUT_S:.0f}s: more experts come from the SSD")
                report.placed = sm.cluster.placed()
                say("placement: " + ", ".join(f"{name} holds {count} experts" for name, count in report.placed.items()))
                prompt_tokens = build_prompt(sm.tokenizer, prompt, chat_template=False)
                if not prompt_tokens:
                    raise EdgemoeError(f"--prompt {prompt!r} encodes to no tokens; pass some text")
                report.reference_token_ids = mlx_lm_reference(src, prompt_tokens, max_tokens)

                say(f"\n--- run 1: {nodes} node(s) ---")
                if show_text is not None:
                    show_text(prompt)
                result, sources, healthy = _run(sm, lambda: generate(sm, prompt_tokens, max_tokens,
                                                                     on_text=show_text))
                report.runs.append(DemoRun(result.text, result.token_ids, result.stats.tokens_per_s, sources,
                                           result.token_ids == report.reference_token_ids, nodes_healthy=healthy))
                say("\n" + format_run(report.runs[-1]))

                victim = running[-1][0]
                halfway = max(1, len(report.reference_token_ids) // 2)
                generated = 0

                def kill_halfway(_token: int) -> None:
                    nonlocal generated
                    generated += 1
                    if generated == halfway:
                        victim.popen.kill()

                say(f"\n--- run 2: the same prompt; {victim.name} is killed (SIGKILL) after token {halfway} ---")
                if show_text is not None:
                    show_text(prompt)
                result, sources, healthy = _run(sm, lambda: generate(sm, prompt_tokens, max_tokens,
                                                                     on_text=show_text, on_token=kill_halfway))
                report.runs.append(DemoRun(result.text, result.token_ids, result.stats.tokens_per_s, sources,
                                           result.token_ids == report.reference_token_ids, victim.name, halfway,
                                           healthy))
                say("\n" + format_run(report.runs[-1]))
                say(f"\nnext: `{command} chat --model {packed}` to talk to it, "
                    f"`{command} serve --model {packed}` for an "
                    "OpenAI-compatible API; README.md shows how to run a real model")
            finally:
                sm.close()
        finally:
            children.stop_all()
    return report


def format_run(run: DemoRun) -> str:
    s = run.sources
    rows = [("coordinator RAM cache", s.cache)] + [(name, n) for name, n in s.nodes.items()] + \
        [("coordinator SSD", s.ssd)]
    lines = [f"where the experts came from ({s.total} expert loads, one per distinct expert per layer call):"]
    for label, count in rows:
        lines.append(f"  {label:<22} {count:>6}  {100 * count / s.total if s.total else 0:5.1f}%")
    lines.append(f"  {s.peer_calls} requests to nodes (one per node per MoE layer and token), "
                 f"{s.fallbacks} answered from the SSD instead")
    if run.killed_node:
        lines.append(f"  {run.killed_node} was killed after token {run.killed_after_tokens}: "
                     "its experts came from the coordinator (cache or SSD) from then on")
    lines.append(f"  {len(run.token_ids)} tokens at {run.tokens_per_s:.1f} tok/s; identical to mlx-lm's tokens "
                 f"(all experts in RAM): {'yes' if run.same_as_mlx_lm else 'NO'}")
    return "\n".join(lines)
