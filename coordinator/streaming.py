"""The streaming model: mlx-lm's architecture with every routed-expert module swapped for one that fetches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load_tokenizer

from edgemoe.node.compute import ExpertKernel, compute_pairs
from edgemoe.node.errors import ManifestError
from edgemoe.node.local import LocalExperts, Misses
from edgemoe.node.manifest import DENSE_NAME, Manifest, read_manifest
from edgemoe.node.store import ExpertStore

from edgemoe.node.architecture import (
    build_model,
    module_at,
    read_config,
    replace_module,
    routed_expert_modules,
    routed_experts_per_token,
    router_of,
    with_experts_per_token,
)
from .progress import progress_bar

log = logging.getLogger(__name__)


class ExpertSource(Protocol):
    def arrays(self, layer: int) -> dict[str, mx.array]: ...

    def slots(self, layer: int, experts: list[int]) -> np.ndarray: ...

    def start_slots(self, layer: int, experts: list[int]) -> tuple[np.ndarray, Misses | None]: ...

    def prefetch(self, layer: int, experts: list[int]) -> None: ...


# A prompt can route to every expert of a layer at once; holding them all would
# break the memory bound, so a layer's experts are fetched this many at a time.
MAX_INFLIGHT_EXPERTS = 32


def router_logits(router: nn.Module | None) -> Callable[[mx.array], mx.array] | None:
    """Router logits of a MoE block's gate: a (quantized) Linear, or a gate module
    holding an `[experts, hidden]` weight (DeepSeek's MoEGate). None if neither."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router
    weight = router.get("weight") if isinstance(router, nn.Module) else None
    if isinstance(weight, mx.array) and weight.ndim == 2:
        return lambda x: x @ router["weight"].T
    return None


@dataclass
class Prefetch:
    """How a layer's call guesses the next MoE layer's experts: that layer's router
    applied to this layer's input (an approximation: the residual has not changed yet)."""

    next_module: "StreamingExperts"
    logits: Callable[[mx.array], mx.array]


class StreamingExperts(nn.Module):
    """Stands in for mlx-lm's SwitchGLU/SwitchMLP: same call, experts fetched into slots per call."""

    def __init__(self, layer: int, kernel: ExpertKernel, source: ExpertSource, max_inflight: int = MAX_INFLIGHT_EXPERTS):
        super().__init__()
        self.layer = layer
        self.kernel = kernel
        self.source = source
        self.max_inflight = max_inflight
        self.prefetch: Prefetch | None = None
        self.cluster = None
        # What the previous layer guessed this one would ask for, and how well it did.
        self.guess: set[int] | None = None
        self.guessed = 0
        self.guessed_right = 0
        self._bound = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        arrays = self.source.arrays(self.layer)
        if arrays is not self._bound:
            self.kernel.bind(arrays)
            self._bound = arrays
        # The one host sync per layer: which experts the router chose.
        chosen = np.array(indices)
        if self.cluster is not None:
            return self.cluster.run_layer(self.layer, self.kernel, x, chosen, self.max_inflight)
        flat = chosen.ravel().tolist()
        needed = sorted(set(flat))
        if self.guess is not None:
            self.guessed += len(self.guess)
            self.guessed_right += len(self.guess.intersection(needed))
            self.guess = None
        if len(needed) <= self.max_inflight:
            slots, misses = self.source.start_slots(self.layer, needed)
            slot_of = dict(zip(needed, slots.tolist()))
            if misses is not None and misses.experts:
                out = self._as_read(x, chosen, slot_of, misses)
            else:
                out = self.kernel(x, np.array([slot_of[e] for e in flat], dtype=np.uint32).reshape(chosen.shape))
            # Start computing now, while Python builds the next layer's graph.
            mx.async_eval(out)
            if self.prefetch is not None and chosen.size // chosen.shape[-1] == 1:
                self._prefetch_next(x, chosen.shape[-1])
            return out
        return self._chunked(x, chosen)

    def _as_read(self, x: mx.array, chosen: np.ndarray, slot_of: dict[int, int], misses: Misses) -> mx.array:
        """Computes the experts at hand at once, then each miss as soon as its read is in,
        so compute overlaps the reads still in flight. Every (token, expert) pair is the
        same arithmetic as in one call (as in `compute_pairs`), so the output is too."""
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        rows = np.arange(flat.size) // k
        hidden = x.reshape(-1, x.shape[-1])
        pending = misses.experts
        at_hand = [e for e in slot_of if e not in pending]
        groups = ([(at_hand, None)] if at_hand else []) + [([e], e) for e in pending]
        parts, order = [], []
        for group, read in groups:
            if read is not None:
                misses.wait(read)
            picked = np.flatnonzero(np.isin(flat, group))
            slots = np.array([slot_of[e] for e in flat[picked].tolist()], dtype=np.uint32)
            y = self.kernel(hidden[mx.array(rows[picked])], slots[:, None]).reshape(len(picked), -1)
            mx.async_eval(y)
            parts.append(y)
            order.append(picked)
        inverse = np.argsort(np.concatenate(order))
        return mx.concatenate(parts)[mx.array(inverse)].reshape(*chosen.shape, -1)

    def _prefetch_next(self, x: mx.array, k: int) -> None:
        logits = self.prefetch.logits(x.reshape(-1, x.shape[-1])[-1])
        guess = np.argpartition(-np.array(logits.astype(mx.float32)), k - 1)[:k].tolist()
        following = self.prefetch.next_module
        self.source.prefetch(following.layer, guess)
        following.guess = set(guess)

    def _chunked(self, x: mx.array, chosen: np.ndarray) -> mx.array:
        """Every (token, slot) pair as a row, a group of experts at a time."""
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        out = compute_pairs(self.kernel, lambda group: self.source.slots(self.layer, group),
                            x.reshape(-1, x.shape[-1]), np.arange(flat.size) // k, flat, self.max_inflight)
        return out.reshape(*chosen.shape, -1)


@dataclass
class StreamingModel:
    model: nn.Module
    tokenizer: object
    config: dict
    manifest: Manifest
    local: LocalExperts
    dense_bytes: int
    cluster: object = None

    def guesses(self) -> tuple[int, int]:
        return guesses(self.model)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        self.local.close()


def _wire_prefetch(model: nn.Module, manifest: Manifest) -> None:
    specs = sorted(manifest.layers, key=lambda spec: spec.layer)
    for spec, following in zip(specs, specs[1:]):
        logits = router_logits(router_of(model, following.module_path))
        if logits is None:
            log.info("no router found for layer %d: no prefetch into it", following.layer)
            continue
        module_at(model, spec.module_path).prefetch = Prefetch(module_at(model, following.module_path), logits)


def guesses(model: nn.Module) -> tuple[int, int]:
    """Prefetch guesses made so far, and how many of them the next layer did ask for."""
    modules = [m for _, m in model.named_modules() if isinstance(m, StreamingExperts)]
    return sum(m.guessed for m in modules), sum(m.guessed_right for m in modules)


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
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(manifest.expert_bytes, min(manifest.total_expert_bytes, ram // 4))


def load_streaming_model(
    model_dir: Path,
    cache_bytes: int | None = None,
    experts_per_token: int | None = None,
    cache_policy: str = "lfu",
    io_threads: int = 8,
    max_inflight_experts: int = MAX_INFLIGHT_EXPERTS,
    io_mode: str = "auto",
    prefetch: bool = False,
    peers: list[str] | None = None,
    credentials=None,
    node_timeout_s: float | None = None,
) -> StreamingModel:
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
    try:
        budget = cache_bytes if cache_bytes is not None else default_cache_bytes(manifest)
        k = (routed_experts_per_token(config) or 0) if prefetch else 0
        local = LocalExperts(store, budget, cache_policy, scratch_slots=max_inflight_experts, prefetch_slots=k)
    except BaseException:
        store.close()
        raise
    try:
        for spec in manifest.layers:
            kernel = ExpertKernel(modules[spec.module_path], spec, local.arrays(spec.layer))
            replace_module(model, spec.module_path, StreamingExperts(spec.layer, kernel, local, max_inflight_experts))
        quantized = manifest.dense_quantization
        nn.quantize(model, class_predicate=lambda path, _: quantized.get(path, False))
        dense_path = model_dir / DENSE_NAME
        if not dense_path.exists():
            raise ManifestError(f"{dense_path} is missing; repack the model (`edgemoe pack SRC DST --force`)")
        try:
            weights = mx.load(str(dense_path))
        except (RuntimeError, ValueError) as exc:
            raise ManifestError(f"{dense_path} is unreadable ({exc}); repack the model") from exc
        _read_dense(weights, dense_path)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as exc:
            raise ManifestError(f"{dense_path} does not fit the model ({str(exc).splitlines()[0]}); repack the model") from exc
        if prefetch:
            _wire_prefetch(model, manifest)
        model.eval()
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    except BaseException:
        local.close()
        raise
    dense_bytes = sum(a.nbytes for a in weights.values())
    sm = StreamingModel(model, tokenizer, config, manifest, local, dense_bytes)
    if peers:
        from .cluster import Cluster

        timeout = {} if node_timeout_s is None else {"deadline_s": node_timeout_s}
        sm.cluster = Cluster(manifest, (model_dir / "config.json").read_bytes(), local, credentials, peers, **timeout)
        for spec in manifest.layers:
            module_at(model, spec.module_path).cluster = sm.cluster
    return sm
