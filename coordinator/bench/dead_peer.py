"""Peers configured but all down, against no peers: with no node to answer, a layer's
work must take the same local path at the same speed (same model, cache budget and I/O
mode). Runs alternate, so a disk or CPU that drifts during the bench drifts for both."""

from __future__ import annotations

import contextlib
import logging
import socket
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgemoe.node.credentials import ClusterCredentials, new_secret
from edgemoe.node.limits import array_memory_bytes, array_memory_kind

from ..counters import snapshot
from ..loader import load_streaming_model
from ..streaming import StreamingModel
from .decode import DecodeRun, cold_run, warm_up
from .report import Notes

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEAD_PEER_RUNS = 3
# Two models are loaded at once (dense part and expert cache each).
TWO_MODELS_RAM_FRACTION = 0.8
KEYS = ("dead_peer_address", "dead_peer_runs", "dead_peer_tokens_per_s_runs", "no_peers_tokens_per_s_runs",
        "dead_peer_tokens_per_s", "no_peers_tokens_per_s", "dead_peer_relative_to_no_peers",
        "dead_peer_same_tokens_as_no_peers", "dead_peer_peer_calls", "dead_peer_fallbacks")


@contextlib.contextmanager
def refused_address() -> Iterator[str]:
    """A loopback port bound but not listening: every connection to it is refused at once,
    and no other process can take the port while the case runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        yield f"{HOST}:{s.getsockname()[1]}"


@contextlib.contextmanager
def quiet_peers() -> Iterator[None]:
    """The dead peer's "cannot reach node" warnings are this case's premise, not news."""
    peers_log = logging.getLogger("edgemoe.coordinator.peers")
    level = peers_log.level
    peers_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        peers_log.setLevel(level)


def _median(runs: list[DecodeRun]) -> float | None:
    speeds = [r.tokens_per_s for r in runs if r.tokens_per_s is not None]
    return statistics.median(speeds) if len(speeds) == len(runs) else None


def dead_peer_figures(sm: StreamingModel, model_dir: Path, load_options: dict[str, Any], paths: list[Path],
                      prompt_tokens: list[int], tokens: int, budget: int, notes: Notes,
                      runs: int = DEAD_PEER_RUNS) -> dict[str, Any]:
    """Alternating cold runs of `sm` (no peers) and of the same model loaded with one peer
    that refuses connections; the medians and their ratio."""
    out: dict[str, Any] = dict.fromkeys(KEYS)
    if 2 * (sm.dense_bytes + budget) > TWO_MODELS_RAM_FRACTION * array_memory_bytes():
        notes.add("dead-peer case skipped: two copies of the dense part and the expert cache do not fit in "
                  f"{TWO_MODELS_RAM_FRACTION:.0%} of {array_memory_kind()}")
        return out
    credentials = ClusterCredentials.create(new_secret(), "coordinator")
    with refused_address() as address, quiet_peers():
        log.info("decode with a dead peer (%s) against no peers, %d alternating runs each", address, runs)
        dead = load_streaming_model(model_dir, peers=[address], credentials=credentials, **load_options)
        try:
            warm_up(dead)
            before = snapshot(dead)
            alone: list[DecodeRun] = []
            with_dead: list[DecodeRun] = []
            for _ in range(runs):
                alone.append(cold_run(sm, paths, prompt_tokens, tokens, budget))
                with_dead.append(cold_run(dead, paths, prompt_tokens, tokens, budget))
            spent = snapshot(dead) - before
        finally:
            dead.close()
    dead_median, alone_median = _median(with_dead), _median(alone)
    out.update(
        dead_peer_address=address,
        dead_peer_runs=runs,
        dead_peer_tokens_per_s_runs=[r.tokens_per_s for r in with_dead],
        no_peers_tokens_per_s_runs=[r.tokens_per_s for r in alone],
        dead_peer_tokens_per_s=dead_median,
        no_peers_tokens_per_s=alone_median,
        dead_peer_relative_to_no_peers=dead_median / alone_median if dead_median is not None and alone_median else None,
        dead_peer_same_tokens_as_no_peers=all(r.token_ids == alone[0].token_ids for r in alone + with_dead),
        dead_peer_peer_calls=spent.peer_calls,
        dead_peer_fallbacks=spent.fallbacks,
    )
    return out
