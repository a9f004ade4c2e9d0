"""The Python API behind `edgemoe.load` and `edgemoe.stats` (see edgemoe/__init__.py).

A loaded model is mlx-lm's own model object with its routed-expert modules replaced,
so mlx-lm's `generate`/`stream_generate` run it unchanged; its dispatchers lead back
to the expert cache and the cluster, so `stats` needs nothing but the model.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.nn as nn

from edgemoe.node.credentials import ClusterCredentials
from edgemoe.node.local import LocalExperts

from .cluster import Cluster
from .counters import snapshot
from .discovery import resolve_peers
from .loader import load_streaming_model
from .streaming import StreamingExperts, StreamingModel


def load(
    path: str | Path,
    cache_mb: float | None = None,
    peers: list[str] | str | None = None,
    interface: str | None = None,
    cluster_dir: str | Path | None = None,
    hot_set: bool = True,
    **options: Any,
) -> tuple[nn.Module, Any]:
    addresses: list[str] = []
    credentials: ClusterCredentials | None = None
    if peers is not None and peers != "none" and peers != []:
        spec = peers if isinstance(peers, str) else ",".join(peers)
        addresses, credentials = resolve_peers(spec, interface, cluster_dir)
    cache_bytes = None if cache_mb is None else int(cache_mb * 2**20)
    sm = load_streaming_model(Path(path).expanduser(), cache_bytes=cache_bytes, peers=addresses,
                              credentials=credentials, hot_set=hot_set, **options)
    # Kept on the model (a plain attribute: mlx's Module registers only arrays and containers),
    # so `stats` and `close` find the cluster and the hot set with it.
    sm.model.edgemoe_streaming_model = sm
    return sm.model, sm.tokenizer


def _parts(model: nn.Module) -> tuple[LocalExperts, Cluster | None]:
    for _, module in model.named_modules():
        if isinstance(module, StreamingExperts):
            remote = module.dispatch.remote
            assert remote is None or isinstance(remote, Cluster)  # what load_streaming_model gives dispatchers
            return module.dispatch.local, remote
    raise TypeError("not a model loaded by edgemoe.load: it has no streaming expert layers")


def streaming_model(model: nn.Module) -> StreamingModel:
    """The `StreamingModel` a model from `load` came from (what the CLI works with); for a
    model of `load_streaming_model`, a view of its experts and cluster."""
    loaded = model.__dict__.get("edgemoe_streaming_model")
    if isinstance(loaded, StreamingModel):
        return loaded
    local, cluster = _parts(model)
    return StreamingModel(model, None, {}, local.manifest, local, 0, cluster)


def stats(model: nn.Module) -> dict[str, Any]:
    """The model's counters so far. Call it between generations, from the thread that
    generates: it first counts the routing of layers computed from resident tables, which
    waits for any token still computing."""
    sm = streaming_model(model)
    sm.local.settle(everything=True)
    counters = snapshot(sm)
    figures = {k: v for k, v in asdict(counters).items() if k != "t"}
    figures.update(
        cache_hit_rate=counters.cache_hit_rate,
        ssd_read_gbps=counters.ssd_read_gbps,
        prefetch_accuracy=counters.prefetch_accuracy,
        cache_bytes_used=sm.local.cache_bytes_used,
        cache_budget_bytes=sm.local.budget_bytes,
        cached_experts=sm.local.cached_experts,
    )
    if sm.cluster is not None:
        figures["cluster"] = sm.cluster.snapshot()
    return figures


def close(model: nn.Module) -> None:
    streaming_model(model).close()
