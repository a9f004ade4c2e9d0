"""`edgemoe`: pack, generate, bench and the demo model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from edgemoe.node.errors import EdgemoeError

log = logging.getLogger("edgemoe")


def _cache_bytes(args: argparse.Namespace) -> int | None:
    if args.cache_mb is None:
        return None
    if args.cache_mb <= 0:
        raise EdgemoeError(f"--cache-mb {args.cache_mb} must be positive")
    return int(args.cache_mb * 2**20)


def _node_timeout(args: argparse.Namespace) -> float | None:
    if args.node_timeout is not None and not args.node_timeout > 0:
        raise EdgemoeError(f"--node-timeout {args.node_timeout} must be a positive number of seconds")
    return args.node_timeout


def cmd_pack(args: argparse.Namespace) -> None:
    from .pack import pack

    result = pack(Path(args.src), Path(args.dst), in_place=args.in_place, force=args.force, progress=args.progress)
    mode = "in place (experts read from the source files)" if result.in_place else "experts repacked"
    print(
        f"packed {result.layers} MoE layers, {result.experts} experts "
        f"({result.expert_bytes / 2**20:.1f} MiB experts, {result.dense_bytes / 2**20:.1f} MiB dense), "
        f"{mode}, in {result.seconds:.1f}s -> {result.dst}"
    )


DISCOVERY_SECONDS = 2.0


def resolve_peers(args: argparse.Namespace) -> tuple[list[str], object]:
    """The peer addresses to use and this coordinator's cluster credentials (none without a cluster)."""
    from edgemoe.node.credentials import ClusterCredentials, default_cluster_dir, load_cluster_secret

    from .discovery import parse_static_peers

    if args.peers == "none":
        return [], None
    directory = Path(args.cluster_dir).expanduser() if args.cluster_dir else default_cluster_dir()
    if args.peers == "auto":
        if not (directory / "join-token").exists():
            log.info("no cluster in %s: running on this machine alone", directory)
            return [], None
        if not args.interface:
            log.warning("not browsing for nodes: pass --interface ADDR (this machine's LAN address) or --peers HOST:PORT")
            return [], None
    secret = load_cluster_secret(directory)
    credentials = ClusterCredentials.create(secret, "coordinator")
    if args.peers != "auto":
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parse_static_peers(args.peers)], credentials
    from edgemoe.node.version import PROTOCOL_VERSION

    from .discovery import PeerBrowser

    with PeerBrowser(args.interface, credentials.cluster_id, PROTOCOL_VERSION) as browser:
        time.sleep(DISCOVERY_SECONDS)
        found = browser.peers()
    log.info("found %d nodes over mDNS", len(found))
    return [f"[{p.host}]:{p.port}" if ":" in p.host else f"{p.host}:{p.port}" for p in found], credentials


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import build_prompt, generate
    from .streaming import load_streaming_model

    if args.max_tokens < 1:
        raise EdgemoeError(f"--max-tokens {args.max_tokens} must be at least 1")
    peers, credentials = resolve_peers(args)
    sm = load_streaming_model(
        Path(args.model),
        cache_bytes=_cache_bytes(args),
        experts_per_token=args.experts_per_token,
        cache_policy=args.cache_policy,
        io_mode=args.io,
        prefetch=args.prefetch,
        peers=peers,
        credentials=credentials,
        node_timeout_s=_node_timeout(args),
    )
    try:
        prompt = build_prompt(sm.tokenizer, args.prompt, chat_template=not args.no_chat_template)
        if not prompt:
            raise EdgemoeError(
                f"--prompt {args.prompt!r} encodes to no tokens with the tokenizer in {args.model}; pass some text "
                "(if you did, the model's tokenizer files may be missing: repack it)"
            )
        stream = None if args.json else (lambda text: print(text, end="", flush=True))
        result = generate(sm, prompt, max_tokens=args.max_tokens, temp=args.temp, seed=args.seed, on_text=stream)
        # Before close: closing the cluster closes every peer, so none would show as healthy.
        peer_stats = cluster_stats(sm.cluster) if sm.cluster is not None else {}
        from .status import nodes_in_use, save_last_run

        save_last_run("generate", args.model, {**result.stats.to_dict(), **peer_stats}, sm.dense_bytes,
                      nodes_in_use(sm.cluster))
    finally:
        sm.close()
    if args.json:
        stats = result.stats.to_dict()
        stats.update(peer_stats)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": stats}))
    else:
        print()
        print(result.stats.summary(), file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve
    from .streaming import load_streaming_model

    if args.max_tokens < 1:
        raise EdgemoeError(f"--max-tokens {args.max_tokens} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise EdgemoeError(f"--port {args.port} must be between 0 and 65535")
    peers, credentials = resolve_peers(args)
    cache_bytes = _cache_bytes(args)
    node_timeout = _node_timeout(args)

    def load():
        return load_streaming_model(Path(args.model), cache_bytes=cache_bytes, experts_per_token=args.experts_per_token,
                                    io_mode=args.io, prefetch=args.prefetch, peers=peers, credentials=credentials,
                                    node_timeout_s=node_timeout)

    serve(Path(args.model), args.host, args.port, load, api_key=args.api_key, default_max_tokens=args.max_tokens)


def cluster_stats(cluster) -> dict:
    return {
        "peer_calls": cluster.stats.peer_calls,
        "experts_from_peers": cluster.stats.experts_from_peers,
        "fallbacks": cluster.stats.fallbacks,
        "nodes": [
            {"address": p.address, "name": p.name, "node_id": p.node_id, "healthy": p.healthy, "calls": p.stats.calls,
             "failures": p.stats.failures, "experts_computed": p.stats.experts, "mean_rtt_ms": p.stats.mean_rtt_ms, "experts_held": len(p.held),
             "error": p.last_error or None}
            for p in cluster.peers
        ],
    }


def cmd_peers(args: argparse.Namespace) -> None:
    from .status import format_peer_rows, probe_peers

    addresses, credentials = resolve_peers(args)
    rows = probe_peers(addresses, credentials)
    if args.json:
        print(json.dumps(rows))
        return
    for line in format_peer_rows(rows):
        print(line)


def cmd_status(args: argparse.Namespace) -> None:
    from edgemoe.node.credentials import default_cluster_dir

    from .status import collect_status, format_status

    addresses, credentials = resolve_peers(args)
    directory = Path(args.cluster_dir).expanduser() if args.cluster_dir else default_cluster_dir()
    status = collect_status(addresses, credentials, directory)
    print(json.dumps(status) if args.json else format_status(status))


def cmd_chat(args: argparse.Namespace) -> None:
    from .chat import run_chat
    from .streaming import load_streaming_model

    if args.max_tokens < 1:
        raise EdgemoeError(f"--max-tokens {args.max_tokens} must be at least 1")
    peers, credentials = resolve_peers(args)
    sm = load_streaming_model(Path(args.model), cache_bytes=_cache_bytes(args),
                              experts_per_token=args.experts_per_token, peers=peers, credentials=credentials,
                              node_timeout_s=_node_timeout(args))
    try:
        run_chat(sm, args.model, max_tokens=args.max_tokens, temp=args.temp, seed=args.seed)
    finally:
        sm.close()


def cmd_bench(args: argparse.Namespace) -> None:
    if args.cluster is not None:
        cmd_cluster_bench(args)
        return
    from .bench import format_report, run_bench

    report = run_bench(
        Path(args.model),
        cache_bytes=_cache_bytes(args),
        tokens=args.tokens,
        prompt=args.prompt,
        experts_per_token=args.experts_per_token,
        compare_mlx_lm=not args.no_mlx_lm,
        in_place_source=Path(args.in_place) if args.in_place else None,
        io_mode=args.io,
        prefetch=args.prefetch,
    )
    print(json.dumps(report) if args.json else format_report(report))


def cmd_cluster_bench(args: argparse.Namespace) -> None:
    from .cluster_bench import format_cluster_report, run_cluster_bench

    report = run_cluster_bench(
        Path(args.model),
        args.cluster,
        cache_bytes=_cache_bytes(args),
        tokens=args.tokens,
        prompt=args.prompt,
        experts_per_token=args.experts_per_token,
        io_mode=args.io,
    )
    print(json.dumps(report) if args.json else format_cluster_report(report))


def cmd_push(args: argparse.Namespace) -> None:
    from .progress import show_push_progress
    from .streaming import load_streaming_model

    peers, credentials = resolve_peers(args)
    if not peers:
        raise EdgemoeError("no nodes to push to: start edge-node on another device, then pass --peers HOST:PORT "
                           "or --interface ADDR (this machine's LAN address)")
    sm = load_streaming_model(Path(args.model), cache_bytes=_cache_bytes(args), peers=peers, credentials=credentials)
    try:
        for peer in sm.cluster.peers:
            if not peer.healthy:
                print(f"skipping {peer.address}: {peer.last_error}", file=sys.stderr)
        usable = [peer for peer in sm.cluster.peers if peer.healthy]
        if not usable:
            raise EdgemoeError("none of the nodes can be used (see above)")
        complete = show_push_progress(sm.cluster, args.timeout, always=args.progress)
        shares = sm.cluster.push_progress()
        lost = [f"{peer.name} ({peer.last_error})" for peer in usable if not peer.healthy]
    finally:
        sm.close()
    for share in shares:
        print(f"{share.name}: holds {share.held_experts} of the {share.planned_experts} experts placed on it "
              f"({share.held_bytes / 2**20:.1f} MiB)")
    if lost:
        raise EdgemoeError(f"lost during the push: {'; '.join(lost)}; what reached a node stays there: run "
                           "`edgemoe push` again once it is back")
    if not complete:
        raise EdgemoeError(f"placement was not complete after {args.timeout:.0f}s; run `edgemoe push` again to go on "
                           "(what was pushed stays on the nodes)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DEMO_PROMPT, run_demo

    if not args.verbose:
        # The demo kills a node on purpose and says so; the peer's own warning would only interleave with the text.
        logging.getLogger("edgemoe.coordinator.peers").setLevel(logging.ERROR)
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    show_text = None if args.json else (lambda text: print(text, end="", flush=True))
    # as the user ran it (`make demo` runs .venv/bin/edgemoe, which is not on PATH)
    command = sys.argv[0] if Path(sys.argv[0]).name == "edgemoe" else "edgemoe"
    report = run_demo(Path(args.dir), nodes=args.nodes, prompt=args.prompt or DEMO_PROMPT,
                      max_tokens=args.max_tokens, say=say, show_text=show_text, command=command)
    if args.json:
        print(report.to_json())
    if not all(run.same_as_mlx_lm for run in report.runs):
        raise EdgemoeError("the tokens differ from mlx-lm's: please report this as a bug, with the output above")


def cmd_demo_model(args: argparse.Namespace) -> None:
    from .demo_model import write_demo_model

    dst = write_demo_model(Path(args.dst), args.size)
    print(f"wrote the demo model to {dst}")


def cmd_cluster_init(args: argparse.Namespace) -> None:
    from edgemoe.node.credentials import init_cluster

    if args.expires_days is not None and args.expires_days <= 0:
        raise EdgemoeError(f"--expires-days {args.expires_days} must be positive")
    expires = int(time.time() + args.expires_days * 86400) if args.expires_days else None
    result = init_cluster(Path(args.dir).expanduser() if args.dir else None, rotate=args.rotate, expires=expires)
    if result.replaced_cluster_id:
        print(f"re-keyed the cluster: {result.replaced_cluster_id} -> {result.cluster_id}; the old token no longer "
              "joins: restart the coordinator and every edge-node with the new token")
    else:
        print(f"made cluster {result.cluster_id}")
    print(f"stored its join token in {result.path} (only you can read it; anyone holding it is a cluster member)")
    if expires:
        print(f"the token stops working on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires))}")
    print("on every other device run:  edge-node --join TOKEN   with this token:")
    print(result.token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemoe", description="Run MoE models larger than RAM by streaming experts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what edgemoe does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack an mlx-lm MoE model directory for streaming")
    p.add_argument("src", help="mlx-lm model directory (config.json, model*.safetensors, tokenizer)")
    p.add_argument("dst", help="directory to write the packed model to")
    p.add_argument("--in-place", action="store_true", help="write no expert copy: read experts from SRC's files")
    p.add_argument("--progress", action="store_true",
                   help="show the progress bar even when not on a terminal (on one it shows anyway)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_pack)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="packed model directory (from `edgemoe pack`)")
        p.add_argument("--cache-mb", type=float, help="RAM budget for cached experts, in MiB")
        p.add_argument("--experts-per-token", type=int, metavar="K", help="route each token to K experts (fewer is faster)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument(
            "--io",
            choices=("auto", "direct", "buffered"),
            default="auto",
            help="expert reads through the page cache (buffered) or around it (direct); "
            "auto: direct when the experts exceed half the RAM",
        )
        p.add_argument(
            "--prefetch",
            action="store_true",
            help="guess each next layer's experts with its router and start reading them early",
        )

    def peer_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--peers", default="auto",
                       help="auto (browse mDNS on --interface), none, or HOST:PORT,HOST:PORT (default: auto)")
        p.add_argument("--interface", metavar="ADDR", help="this machine's LAN address, to browse for nodes on")
        p.add_argument("--cluster-dir", help="where `edgemoe cluster init` keeps the token")

    def node_timeout_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node-timeout", type=float, metavar="SECONDS",
                       help="how long a node may take to answer a layer's request before its experts are computed "
                       "here instead and it is set aside for a while (default: 2)")

    g = sub.add_parser("generate", help="generate text")
    model_options(g)
    peer_options(g)
    node_timeout_option(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=100)
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--seed", type=int)
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is")
    g.add_argument("--cache-policy", choices=("lfu", "lru"), default="lfu")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="measure disk, expert reads and tok/s against the SSD bound and mlx-lm")
    model_options(b)
    b.add_argument("--tokens", type=int, default=64, help="tokens to generate per run")
    b.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    b.add_argument("--no-mlx-lm", action="store_true", help="skip the plain mlx-lm comparison")
    b.add_argument("--in-place", metavar="DIR", help="also bench an --in-place pack of DIR (the model's source)")
    b.add_argument("--cluster", type=int, metavar="N",
                   help="instead: start N edge nodes on 127.0.0.1 and measure tok/s against the cluster bound, "
                   "with 0, 0.5 and 5 ms added round trips (--cache-mb: the coordinator's cache, default 1/8 "
                   "of the experts)")
    b.set_defaults(func=cmd_bench)

    de = sub.add_parser("demo", help="the built-in model generating with edge nodes on this machine, "
                        "showing where its experts come from")
    de.add_argument("--dir", default=".demo", help="where to write and pack the demo model (default: .demo)")
    de.add_argument("--nodes", type=int, default=2, help="edge nodes to start on 127.0.0.1 (default: 2)")
    de.add_argument("--prompt", help="what to continue (default: 'def get(self, key')")
    de.add_argument("--max-tokens", type=int, default=40)
    de.add_argument("--json", action="store_true", help="print one JSON object (the run's figures and tokens)")
    de.set_defaults(func=cmd_demo)

    pu = sub.add_parser("push", help="place experts on the nodes and push them now, with progress "
                        "(generate and serve also push, in the background)")
    pu.add_argument("--model", required=True, help="packed model directory (from `edgemoe pack`)")
    pu.add_argument("--cache-mb", type=float, help="the coordinator's expert cache, as you will generate with: "
                    "placement keeps what fits there local")
    peer_options(pu)
    pu.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default: 3600)")
    pu.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    pu.set_defaults(func=cmd_push)

    d = sub.add_parser("demo-model", help="write the built-in demo model (an mlx-lm directory)")
    d.add_argument("dst")
    d.add_argument("--size", choices=("small", "random", "large"), default="small",
                   help="small: trained on Python's own sources (4 layers, 32 experts); random: 8 layers of 64 "
                   "random experts (36 MiB, the benchmark model); large: 768 MiB of 6 MiB float32 experts")
    d.set_defaults(func=cmd_demo_model)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /metrics)")
    model_options(s)
    peer_options(s)
    node_timeout_option(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", metavar="KEY", default=os.environ.get("EDGEMOE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every request but /health "
                   "(default: $EDGEMOE_API_KEY, which keeps the key out of the process list)")
    s.add_argument("--max-tokens", type=int, default=512, help="completion length when a request gives none")
    s.set_defaults(func=cmd_serve)

    pe = sub.add_parser("peers", help="the nodes this coordinator can use: health, round trip, experts held, cache")
    peer_options(pe)
    pe.add_argument("--json", action="store_true", help="print one JSON list")
    pe.set_defaults(func=cmd_peers)

    ch = sub.add_parser("chat", help="an interactive chat in the terminal (history, streamed replies, a status line)")
    ch.add_argument("--model", required=True, help="packed model directory (from `edgemoe pack`)")
    ch.add_argument("--cache-mb", type=float, help="RAM budget for cached experts, in MiB")
    ch.add_argument("--experts-per-token", type=int, metavar="K", help="route each token to K experts")
    peer_options(ch)
    node_timeout_option(ch)
    ch.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    ch.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ch.add_argument("--seed", type=int)
    ch.set_defaults(func=cmd_chat)

    st = sub.add_parser("status", help="the coordinator, each node and the last generation's figures")
    peer_options(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cluster", help="the cluster's credentials")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    ci = csub.add_parser("init", help="make the cluster secret and print its join token (the last line)")
    ci.add_argument("--dir", help="where to keep the token (default: $EDGEMOE_HOME/cluster or ~/.config/edgemoe/cluster)")
    ci.add_argument("--rotate", action="store_true", help="replace an existing token: re-keys the cluster")
    ci.add_argument("--expires-days", type=float, metavar="DAYS",
                    help="the token (and every certificate made from it) stops working after DAYS")
    ci.set_defaults(func=cmd_cluster_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        args.func(args)
    except EdgemoeError as exc:
        print(f"edgemoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
