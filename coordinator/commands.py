"""What each `edgemoe` command does, given its parsed arguments (cli.py builds the parser).

Heavy modules (mlx, grpc, zeroconf) are imported inside each command, so that
building the parser and `edgemoe --help` stay light.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from edgemoe.node.errors import EdgemoeError

if TYPE_CHECKING:
    from edgemoe.node.credentials import ClusterCredentials

    from .watch import NodeWatcher


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


def _audit_rate(args: argparse.Namespace) -> float:
    """`--audit`, checked (none given: the default)."""
    from .cluster import DEFAULT_AUDIT_RATE

    if args.audit is None:
        return DEFAULT_AUDIT_RATE
    if not 0 <= args.audit <= 1:  # NaN too
        raise EdgemoeError(f"--audit {args.audit} must be a share of node replies between 0 and 1 (0: no audits)")
    return args.audit


def _check_max_tokens(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise EdgemoeError(f"--max-tokens {args.max_tokens} must be at least 1")


def _peers(args: argparse.Namespace) -> tuple[list[str], ClusterCredentials | None]:
    from .discovery import resolve_peers

    return resolve_peers(args.peers, args.interface, args.cluster_dir, must_look=args.func is cmd_peers)


@contextmanager
def _watched_peers(
    args: argparse.Namespace,
) -> Iterator[tuple[list[str], ClusterCredentials | None, NodeWatcher | None]]:
    """`_peers`, and with `--peers auto` a watcher that keeps browsing while the command runs
    (`follow` the loaded cluster); stopped on the way out."""
    from .discovery import discover

    addresses, credentials, browsers = discover(args.peers, args.interface, args.cluster_dir, keep_browsing=True)
    if not browsers:
        yield addresses, credentials, None
        return
    from .watch import NodeWatcher

    assert credentials is not None  # browsing needs the cluster's token
    watcher = NodeWatcher(browsers, credentials)
    try:
        yield addresses, credentials, watcher
    finally:
        watcher.close()


def cmd_pack(args: argparse.Namespace) -> None:
    from .pack import pack

    result = pack(Path(args.src), Path(args.dst), in_place=args.in_place, force=args.force, progress=args.progress)
    mode = "in place (experts read from the source files)" if result.in_place else "experts repacked"
    print(
        f"packed {result.layers} MoE layers, {result.experts} experts "
        f"({result.expert_bytes / 2**20:.1f} MiB experts, {result.dense_bytes / 2**20:.1f} MiB dense), "
        f"{mode}, in {result.seconds:.1f}s -> {result.dst}"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import build_prompt, generate
    from .loader import load_streaming_model
    from .status import nodes_in_use, save_last_run

    _check_max_tokens(args)
    with _watched_peers(args) as (peers, credentials, watcher):
        sm = load_streaming_model(
            Path(args.model),
            cache_bytes=_cache_bytes(args),
            experts_per_token=args.experts_per_token,
            cache_policy=args.cache_policy,
            io_mode=args.io,
            prefetch=_auto_on_off(args.prefetch),
            peers=peers,
            credentials=credentials,
            node_timeout_s=_node_timeout(args),
            audit_rate=_audit_rate(args),
            keep_cluster=watcher is not None,
            hot_set=not args.no_hot_set,
            map_experts=_map_experts(args),
        )
        if watcher is not None:
            watcher.follow(sm.cluster)
        try:
            prompt = build_prompt(sm.tokenizer, args.prompt, chat_template=not args.no_chat_template)
            if not prompt:
                raise EdgemoeError(
                    f"--prompt {args.prompt!r} encodes to no tokens with the tokenizer in {args.model}; pass some "
                    "text (if you did, the model's tokenizer files may be missing: repack it)"
                )
            stream = None if args.json else (lambda text: print(text, end="", flush=True))
            result = generate(sm, prompt, max_tokens=args.max_tokens, temp=args.temp, seed=args.seed, on_text=stream)
            # Before close: closing the cluster closes every peer, so none would show as healthy.
            cluster = sm.cluster.snapshot() if sm.cluster is not None else None
            stats = {**result.stats.to_dict(), **(cluster or {})}
            save_last_run("generate", args.model, stats, sm.dense_bytes, nodes_in_use(cluster))
        finally:
            if watcher is not None:
                watcher.follow(None)
            sm.close()
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": stats}))
    else:
        print()
        print(result.stats.summary(), file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from .loader import load_streaming_model
    from .server import serve

    _check_max_tokens(args)
    if not 0 <= args.port <= 65535:
        raise EdgemoeError(f"--port {args.port} must be between 0 and 65535")
    cache_bytes = _cache_bytes(args)
    node_timeout = _node_timeout(args)
    audit = _audit_rate(args)

    from .server.limits import limits_from_flags

    limits = limits_from_flags(args)
    with _watched_peers(args) as (peers, credentials, watcher):

        def load():
            if watcher is not None:
                watcher.follow(None)  # the model is loaded again after a failure: follow the new cluster
            sm = load_streaming_model(Path(args.model), cache_bytes=cache_bytes,
                                      experts_per_token=args.experts_per_token, io_mode=args.io,
                                      prefetch=_auto_on_off(args.prefetch), peers=peers, credentials=credentials,
                                      node_timeout_s=node_timeout, audit_rate=audit, keep_cluster=watcher is not None,
                                      hot_set=not args.no_hot_set, map_experts=_map_experts(args))
            if watcher is not None:
                watcher.follow(sm.cluster)
            return sm

        serve(Path(args.model), args.host, args.port, load, api_key=args.api_key,
              default_max_tokens=args.max_tokens, limits=limits)


def _map_experts(args: argparse.Namespace) -> bool | None:
    return _auto_on_off(args.map_experts)


def _auto_on_off(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def cmd_chat(args: argparse.Namespace) -> None:
    from .chat import run_chat
    from .loader import load_streaming_model

    _check_max_tokens(args)
    with _watched_peers(args) as (peers, credentials, watcher):
        sm = load_streaming_model(Path(args.model), cache_bytes=_cache_bytes(args),
                                  experts_per_token=args.experts_per_token, peers=peers, credentials=credentials,
                                  node_timeout_s=_node_timeout(args), audit_rate=_audit_rate(args),
                                  keep_cluster=watcher is not None, hot_set=not args.no_hot_set,
                                  map_experts=_map_experts(args), prefetch=_auto_on_off(args.prefetch))
        if watcher is not None:
            watcher.follow(sm.cluster)
        try:
            run_chat(sm, args.model, max_tokens=args.max_tokens, temp=args.temp, seed=args.seed)
        finally:
            if watcher is not None:
                watcher.follow(None)
            sm.close()


def cmd_forget(args: argparse.Namespace) -> None:
    from .hotset import forget, hot_set_dir, prune

    if args.all:
        print(f"forgot {len(prune(keep=0))} learned hot set(s) in {hot_set_dir()}")
        return
    path = forget(Path(args.model))
    print(f"forgot the learned hot set {path}" if path else f"no learned hot set is kept for {args.model}")


def cmd_peers(args: argparse.Namespace) -> None:
    from .status import format_peer_rows, probe_peers

    addresses, credentials = _peers(args)
    rows = probe_peers(addresses, credentials)
    if args.json:
        print(json.dumps(rows))
        return
    for line in format_peer_rows(rows):
        print(line)


def cmd_status(args: argparse.Namespace) -> None:
    from .discovery import cluster_directory
    from .status import collect_status, format_status

    addresses, credentials = _peers(args)
    status = collect_status(addresses, credentials, cluster_directory(args.cluster_dir))
    print(json.dumps(status) if args.json else format_status(status))


def cmd_doctor(args: argparse.Namespace) -> None:
    from .discovery import cluster_directory
    from .doctor import FAIL, run_doctor

    if not args.verbose:
        # A node's line says what is wrong with it; the peer's own warning would only repeat it.
        logging.getLogger("edgemoe.coordinator.peers").setLevel(logging.ERROR)
    checks = run_doctor(Path(args.model) if args.model else None, args.peers, args.interface,
                        cluster_directory(args.cluster_dir), progress=args.progress)
    print(json.dumps([c.to_dict() for c in checks]) if args.json else "\n".join(c.line() for c in checks))
    failed = [c.name for c in checks if c.level == FAIL]
    if failed:
        raise EdgemoeError(f"{len(failed)} check(s) failed ({', '.join(failed)}): fix what the lines say")


def cmd_plan(args: argparse.Namespace) -> None:
    from .plan import format_plan, run_plan

    cache_bytes = _cache_bytes(args)
    addresses, credentials = _peers(args)
    report = run_plan(Path(args.model), cache_bytes, addresses, credentials)
    print(json.dumps(report) if args.json else format_plan(report))


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
        prefetch=_auto_on_off(args.prefetch),
    )
    print(json.dumps(report) if args.json else format_report(report))


def cmd_cluster_bench(args: argparse.Namespace) -> None:
    from .bench import format_cluster_report, run_cluster_bench

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
    from .loader import load_streaming_model
    from .members import peer_label
    from .progress import show_push_progress

    peers, credentials = _peers(args)
    if not peers:
        raise EdgemoeError("no nodes to push to: start edge-node on another device, then pass --peers HOST:PORT "
                           "or --interface ADDR (this machine's LAN address)")
    sm = load_streaming_model(Path(args.model), cache_bytes=_cache_bytes(args), peers=peers, credentials=credentials)
    assert sm.cluster is not None  # loaded with peers
    try:
        for peer in sm.cluster.peers:
            if not peer.healthy:
                print(f"skipping {peer_label(peer)}: {peer.last_error}", file=sys.stderr)
        usable = [peer for peer in sm.cluster.peers if peer.healthy]
        if not usable:
            raise EdgemoeError("none of the nodes can be used (see above)")
        complete = show_push_progress(sm.cluster, args.timeout, always=args.progress)
        shares = sm.cluster.push_progress()
        lost = [f"{peer_label(peer)}: {peer.last_error}" for peer in usable if not peer.healthy]
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


def cmd_install_service(args: argparse.Namespace) -> None:
    from . import deploy

    if args.cache_mb is not None and args.cache_mb <= 0:
        raise EdgemoeError(f"--cache-mb {args.cache_mb:g} must be positive")
    edge_node = deploy.find_edge_node(args.edge_node)
    token, source = deploy.read_token(args.token_file)
    node_args = deploy.node_args(args.listen, args.interface, args.cache_mb, args.name, args.data_dir)
    output = Path(args.output).expanduser() if args.output else None
    service = deploy.plan(args.platform or deploy.current_platform(), edge_node, node_args, token, output, args.user)
    if not args.dry_run:
        deploy.write(service)
    print(deploy.show(service, source, args.dry_run))
