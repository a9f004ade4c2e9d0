"""`edgemoe`: the command line's parser and entry point; commands.py does the work.

Building the parser imports no mlx, so `edgemoe --help` stays light.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edgemoe.node.errors import EdgemoeError
from edgemoe.node.limits import mlx_backend_missing

from .commands import (
    cmd_bench,
    cmd_chat,
    cmd_cluster_init,
    cmd_demo,
    cmd_demo_model,
    cmd_doctor,
    cmd_forget,
    cmd_generate,
    cmd_install_service,
    cmd_pack,
    cmd_peers,
    cmd_plan,
    cmd_push,
    cmd_serve,
    cmd_status,
)


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
        p.add_argument("--experts-per-token", type=int, metavar="K",
                       help="route each token to K experts (fewer is faster)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument(
            "--io",
            choices=("auto", "direct", "buffered"),
            default="auto",
            help="expert reads through the page cache (buffered) or around it (direct); "
            "auto: direct when the experts exceed half the RAM",
        )
        prefetch_option(p)

    def prefetch_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prefetch", nargs="?", choices=("auto", "on", "off"), const="on", default="auto",
                       help="guess each next layer's experts with its router and start reading them early: the "
                       "kernel reads them into the page cache, or (direct I/O) they are read into spare slots. "
                       "auto (the default): readahead of experts up to 256 KiB; on (or the bare flag): always")

    def peer_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--peers", default="auto",
                       help="auto (browse mDNS on --interface), none, or HOST:PORT,HOST:PORT (default: auto)")
        p.add_argument("--interface", metavar="ADDR", help="this machine's LAN address, to browse for nodes on")
        p.add_argument("--cluster-dir", help="where `edgemoe cluster init` keeps the token")

    def node_timeout_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node-timeout", type=float, metavar="SECONDS",
                       help="how long a node may take to answer a layer's request before its experts are computed "
                       "here instead and it is set aside for a while (default: 2)")
        p.add_argument("--audit", type=float, metavar="RATE",
                       help="the share of node replies recomputed here and compared bit for bit; a node whose "
                       "replies differ is never used again for the model (default: 0.01; 0: no audits)")

    def hot_set_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-hot-set", action="store_true",
                       help="start with a cold cache and keep no routing history (default: warm the cache with the "
                       "experts earlier runs routed to most, kept in $EDGEMOE_HOME/hot-sets; `edgemoe forget`)")

    def map_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--map-experts", nargs="?", choices=("auto", "on", "off"), const="on", default="auto",
                       help="NVIDIA GPUs: keep every expert in host memory, mapped for the GPU, which reads them "
                       "over the bus as it computes (no per-layer round trip); --cache-mb of the most-routed "
                       "stay on the GPU. auto (the default): on CUDA where RAM holds every expert and --cache-mb "
                       "does not; on (or the bare flag): always, or an error saying why not")

    g = sub.add_parser("generate", help="generate text")
    model_options(g)
    peer_options(g)
    node_timeout_option(g)
    hot_set_option(g)
    map_option(g)
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

    s = sub.add_parser("serve",
                       help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /metrics)")
    model_options(s)
    peer_options(s)
    node_timeout_option(s)
    hot_set_option(s)
    map_option(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", metavar="KEY", default=os.environ.get("EDGEMOE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every request but /health "
                   "(default: $EDGEMOE_API_KEY, which keeps the key out of the process list)")
    s.add_argument("--max-tokens", type=int, default=512, help="completion length when a request gives none")
    lim = s.add_argument_group("limits", "what one client may make the server spend (README, OpenAI-compatible "
                               "server)")
    lim.add_argument("--max-tokens-limit", type=int, metavar="N",
                     help="the longest completion a request may ask for (default: 4096)")
    lim.add_argument("--max-body-mb", type=float, metavar="MB", help="largest request body (default: 8)")
    lim.add_argument("--max-prompt-chars", type=int, metavar="N",
                     help="longest prompt, in characters, refused before tokenizing (default: 8 per token of "
                     "the model's context)")
    lim.add_argument("--max-json-depth", type=int, metavar="N", help="deepest nesting of a JSON body (default: 32)")
    lim.add_argument("--max-queue", type=int, metavar="N",
                     help="requests queued or generating; more get 429 with Retry-After (default: 16)")
    lim.add_argument("--max-connections", type=int, metavar="N",
                     help="open connections; beyond them the oldest idle one is closed (default: 1024)")
    lim.add_argument("--header-timeout", type=float, metavar="SECONDS",
                     help="time a client has to send a request's headers, and again its body (default: 10)")
    lim.add_argument("--keep-alive-timeout", type=int, metavar="SECONDS",
                     help="an idle connection is closed after this long between requests (default: 5)")
    lim.add_argument("--max-header-kb", type=float, metavar="KB",
                     help="largest request line and headers together (default: 16)")
    lim.add_argument("--max-dashboards", type=int, metavar="N",
                     help="dashboards (GET /) streaming at once; more get 429 (default: 8)")
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
    hot_set_option(ch)
    map_option(ch)
    prefetch_option(ch)
    ch.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    ch.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ch.add_argument("--seed", type=int)
    ch.set_defaults(func=cmd_chat)

    fo = sub.add_parser("forget", help="delete the learned hot set (routing counts kept across runs in "
                        "$EDGEMOE_HOME/hot-sets) of a model, or of all")
    which = fo.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="packed model directory (from `edgemoe pack`)")
    which.add_argument("--all", action="store_true", help="every model's")
    fo.set_defaults(func=cmd_forget)

    st = sub.add_parser("status", help="the coordinator, each node and the last generation's figures")
    peer_options(st)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_status)

    dr = sub.add_parser("doctor", help="a read-only readiness check: the pack and its checksums, disk, memory, "
                        "the token, the nodes, MLX; one line each, non-zero exit when one fails")
    dr.add_argument("--model", help="packed model directory to check (from `edgemoe pack`)")
    peer_options(dr)
    dr.add_argument("--json", action="store_true", help="print one JSON list of the checks")
    dr.add_argument("--progress", action="store_true",
                    help="show the checksum progress bar even when not on a terminal")
    dr.set_defaults(func=cmd_doctor)

    pl = sub.add_parser("plan", help="measure this machine and the nodes; print the placement and the predicted "
                        "tok/s for a few cache sizes, with and without the nodes (read-only)")
    pl.add_argument("--model", required=True, help="packed model directory (from `edgemoe pack`)")
    pl.add_argument("--cache-mb", type=float, help="the coordinator's expert cache to place for (default: as generate)")
    peer_options(pl)
    pl.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("cluster", help="the cluster's credentials")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    ci = csub.add_parser("init", help="make the cluster secret and print its join token (the last line)")
    ci.add_argument("--dir",
                    help="where to keep the token (default: $EDGEMOE_HOME/cluster or ~/.config/edgemoe/cluster)")
    ci.add_argument("--rotate", action="store_true", help="replace an existing token: re-keys the cluster")
    ci.add_argument("--expires-days", type=float, metavar="DAYS",
                    help="the token (and every certificate made from it) stops working after DAYS")
    ci.set_defaults(func=cmd_cluster_init)

    ins = sub.add_parser("install-service", help="run edge-node at boot: write a systemd unit (Linux) or a "
                         "launchd agent (macOS), the join token in a 0600 env file")
    ins.add_argument("what", choices=["node"], help="the service to install (edge-node)")
    ins.add_argument("--token-file", metavar="FILE", help="a file whose last line is the join token (default: "
                     "$EDGEMOE_JOIN_TOKEN, else the token file of `edgemoe cluster init`)")
    ins.add_argument("--output", metavar="DIR", help="write the files into DIR (default: /etc/systemd/system and "
                     "/etc/edgemoe on Linux, ~/Library/LaunchAgents and ~/.config/edgemoe on macOS)")
    ins.add_argument("--dry-run", action="store_true", help="print the files (not the token); write nothing")
    ins.add_argument("--platform", choices=["linux", "macos"], help="systemd or launchd (default: this machine's)")
    ins.add_argument("--edge-node", metavar="PATH", help="the edge-node to run (default: the one next to this "
                     "edgemoe, else on PATH)")
    ins.add_argument("--user", help="Linux: the user it runs as (default: edge-node's owner; root's: a DynamicUser)")
    ins.add_argument("--listen", default="0.0.0.0:7070", metavar="HOST:PORT", help="edge-node --listen")
    ins.add_argument("--interface", metavar="ADDR|NAME", help="edge-node --interface (the LAN to advertise on)")
    ins.add_argument("--cache-mb", type=float, help="edge-node --cache-mb")
    ins.add_argument("--name", help="edge-node --name")
    ins.add_argument("--data-dir", help="edge-node --data-dir (default on Linux: /var/lib/edgemoe-node)")
    ins.set_defaults(func=cmd_install_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        args.func(args)
    except EdgemoeError as exc:
        print(f"edgemoe: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if (problem := mlx_backend_missing(exc)) is None:
            raise
        print(f"edgemoe: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
