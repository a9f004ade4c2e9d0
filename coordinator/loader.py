"""Loads a packed model as a `StreamingModel`: mlx-lm's architecture, the dense weights in
RAM, and a dispatcher per MoE layer over the expert store, the cache and the nodes."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_tokenizer

from edgemoe.node.architecture import (
    build_model,
    read_config,
    replace_module,
    routed_expert_modules,
    routed_experts_per_token,
    router_of,
    with_experts_per_token,
)
from edgemoe.node.compute import ExpertKernel
from edgemoe.node.credentials import ClusterCredentials
from edgemoe.node.errors import ClusterConfigError, ManifestError
from edgemoe.node.limits import DEFAULT_CACHE_FRACTION, MAX_INFLIGHT_EXPERTS, array_memory_bytes
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import DENSE_NAME, Manifest, read_manifest
from edgemoe.node.mapped import mapping_chosen, open_mapped
from edgemoe.node.prefetch import prefetch_chosen
from edgemoe.node.staging import open_dma
from edgemoe.node.store import ExpertStore

from .cluster import DEFAULT_AUDIT_RATE, REPLY_DEADLINE_S, Cluster
from .dispatch import LayerDispatch, Prefetch
from .hotset import attach
from .progress import progress_bar
from .streaming import StreamingExperts, StreamingModel, router_logits

log = logging.getLogger(__name__)


def _dispatchers(model: nn.Module, manifest: Manifest, local: LocalExperts, max_inflight: int,
                 remote: Cluster | None, prefetch: bool) -> dict[str, LayerDispatch]:
    """Every MoE layer's dispatcher by module path, built last to first so that each is
    given the next one (to prefetch into, through that layer's router)."""
    modules = dict(routed_expert_modules(model))
    specs = sorted(manifest.layers, key=lambda spec: spec.layer)
    built: dict[str, LayerDispatch] = {}
    for spec, following in reversed(list(zip(specs, [*specs[1:], None]))):
        ahead = None
        if prefetch and following is not None:
            logits = router_logits(router_of(model, following.module_path))
            if logits is None:
                log.info("no router found for layer %d: no prefetch into it", following.layer)
            else:
                ahead = Prefetch(built[following.module_path], logits)
        kernel = ExpertKernel(modules[spec.module_path], spec, local.arrays(spec.layer))
        built[spec.module_path] = LayerDispatch(spec.layer, kernel, local, max_inflight, remote, ahead)
    return built


def _read_dense(weights: dict[str, mx.array], path: Path) -> None:
    """Reads the dense tensors (mx.load is lazy) one by one, behind a progress bar."""
    total = sum(a.nbytes for a in weights.values())
    with progress_bar(total, "loading dense weights", leave=False) as bar:
        for array in weights.values():
            try:
                mx.eval(array)
            except (RuntimeError, ValueError) as exc:
                raise ManifestError(f"{path} is unreadable ({exc}); repack the model") from exc
            bar.update(array.nbytes)


def default_cache_bytes(manifest: Manifest) -> int:
    """A quarter of the memory the arrays live in (GPU memory on CUDA), at most every expert."""
    share = int(array_memory_bytes() * DEFAULT_CACHE_FRACTION)
    return max(manifest.expert_bytes, min(manifest.total_expert_bytes, share))


def load_streaming_model(
    model_dir: Path,
    cache_bytes: int | None = None,
    experts_per_token: int | None = None,
    cache_policy: str = "lfu",
    io_threads: int = 8,
    max_inflight_experts: int = MAX_INFLIGHT_EXPERTS,
    io_mode: str = "auto",
    prefetch: bool | None = False,
    peers: list[str] | None = None,
    credentials: ClusterCredentials | None = None,
    node_timeout_s: float | None = None,
    audit_rate: float = DEFAULT_AUDIT_RATE,
    keep_cluster: bool = False,
    hot_set: bool = False,
    map_experts: bool | None = False,
) -> StreamingModel:
    """`hot_set`: seed the routing counts and warm the cache from the model's learned hot set,
    and keep it up to date (coordinator/hotset.py). Off here so that tests and benches start
    cold; the CLI and `edgemoe.load` turn it on unless asked not to.
    `map_experts`: every expert in the pools, so every layer is resident (node/mapped.py): on
    CUDA in host memory mapped for the GPU, `cache_bytes` of them on the GPU; on the CPU the
    page cache's pages of the expert files; None: where that can be had and pays (`mapping_chosen`).
    `prefetch`: guess each next layer's experts and read them early (node/prefetch.py); None:
    where that pays (`prefetch_chosen`)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    config = read_config(model_dir)
    if experts_per_token is not None:
        config = with_experts_per_token(config, experts_per_token)
    model = build_model(config)
    modules = dict(routed_expert_modules(model))
    packed = {spec.module_path for spec in manifest.layers}
    if packed != set(modules):
        raise ManifestError(
            f"{model_dir}: manifest and config.json disagree on the MoE layers; repack the model"
        )
    store = ExpertStore(model_dir, manifest, io_threads, io_mode)
    dma = None
    try:
        budget = cache_bytes if cache_bytes is not None else default_cache_bytes(manifest)
        on_cpu = mx.default_device() == mx.cpu
        if prefetch is None:
            prefetch = prefetch_chosen(store, slots_allowed=on_cpu)
        if prefetch and not on_cpu and not store.can_advise:
            # On CUDA the prefetch into slots gave other tokens than mlx-lm (2026-11-29, cause
            # not yet found): a wrong answer is worse than a slower one. Readahead writes
            # nothing of ours, so it runs everywhere.
            log.warning("--prefetch into spare slots (files not read through the page cache, or no "
                        "posix_fadvise) is not yet exact on %s: running without it", mx.default_device())
            prefetch = False
        k = (routed_experts_per_token(config) or 0) if prefetch else 0
        # Misses computed as they land run in other batch shapes than mlx-lm's one call per
        # layer: the same bits on the CPU, not on a GPU (measured on CUDA), so only there.
        dma = open_dma()
        map_experts = mapping_chosen(map_experts, manifest, budget, dma, cache_policy, nodes=bool(peers),
                                     direct_io=store.direct)
        if map_experts:
            prefetch = False  # every layer resident: nothing to read ahead of it
            local: LocalExperts = open_mapped(store, budget, dma, cache_policy, max_inflight_experts)
        else:
            local = LocalExperts(store, budget, cache_policy, scratch_slots=max_inflight_experts, prefetch_experts=k,
                                 compute_as_read=on_cpu, dma=dma)
    except BaseException:
        if dma is not None:
            dma.close()
        store.close()
        raise
    if map_experts and (peers or keep_cluster):
        # Every expert is here: a node would get no work, and every layer would wait for its
        # routing on the host (a layer with nodes never runs resident).
        if peers:
            log.warning("--map-experts on keeps every expert on this machine: the nodes (%s) are not used "
                        "(--map-experts auto or off uses them)", ", ".join(map(str, peers)))
        peers, keep_cluster = None, False
    cluster = None
    hot = None
    try:
        # Before the cluster: its first placement already starts from the history.
        hot = attach(local) if hot_set else None
        if peers or keep_cluster:  # keep_cluster: nodes may join later (discovery's NodeWatcher)
            if credentials is None:
                raise ClusterConfigError("nodes were given without the cluster's join token; run "
                                         "`edgemoe cluster init` (or pass peers to edgemoe.load with its cluster_dir)")
            if not manifest.dense_sha256:
                # Packs made before the manifest recorded it: nodes need it to recompute the fingerprint.
                manifest.dense_sha256 = file_sha256(model_dir / DENSE_NAME)
            deadline_s = REPLY_DEADLINE_S if node_timeout_s is None else node_timeout_s
            cluster = Cluster(manifest, (model_dir / "config.json").read_bytes(), local, credentials, peers or [],
                              deadline_s=deadline_s, audit_rate=audit_rate)
        quantized = manifest.dense_quantization
        nn.quantize(model, class_predicate=lambda path, _: quantized.get(path, False))
        # After quantizing: a prefetching layer holds the next layer's (quantized) router.
        for path, dispatch in _dispatchers(model, manifest, local, max_inflight_experts, cluster, prefetch).items():
            replace_module(model, path, StreamingExperts(dispatch))
        dense_path = model_dir / DENSE_NAME
        if not dense_path.exists():
            raise ManifestError(f"{dense_path} is missing; repack the model (`edgemoe pack SRC DST --force`)")
        try:
            weights = mx.load(str(dense_path))
        except (RuntimeError, ValueError) as exc:
            raise ManifestError(f"{dense_path} is unreadable ({exc}); repack the model") from exc
        assert isinstance(weights, dict)  # a .safetensors file loads as a dict of arrays
        _read_dense(weights, dense_path)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as exc:
            raise ManifestError(f"{dense_path} does not fit the model ({str(exc).splitlines()[0]}); "
                                "repack the model") from exc
        model.eval()
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    except BaseException:
        if hot is not None:
            hot.close(save=False)
        if cluster is not None:
            cluster.close()
        local.close()
        raise
    dense_bytes = sum(a.nbytes for a in weights.values())
    return StreamingModel(model, tokenizer, config, manifest, local, dense_bytes, cluster, hot)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
