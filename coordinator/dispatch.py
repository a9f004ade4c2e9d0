"""One MoE layer's expert work, split between this machine and the nodes.

The router's choice for a layer is a set of (row, expert) pairs. Pairs whose expert a
healthy node holds (and this machine does not cache) are remote work: one request per
node, sent first. The rest are local work: cache hits, prefetched experts and SSD
misses, computed here while the nodes compute theirs. A node that fails or misses its
deadline hands its pairs back to the same local path. Outputs are merged back into the
router's order, so the result is the tensor mlx-lm's SwitchGLU/SwitchMLP returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from edgemoe.node.compute import SORT_MIN_PAIRS, ExpertKernel, compute_pairs
from edgemoe.node.local import LocalExperts
from edgemoe.node.misses import Misses


class RemoteCall(Protocol):
    pairs: np.ndarray


class Remote(Protocol):
    """The nodes as a layer sees them (`cluster.Cluster`): the engine never imports the cluster client."""

    def route(self, layer: int, experts: list[int]) -> dict[Any, list[int]]: ...

    def is_remote(self, layer: int, expert: int) -> bool: ...

    def send(self, layer: int, hidden: mx.array, rows: np.ndarray, flat: np.ndarray,
             by_node: dict[Any, list[int]], sort: bool) -> Sequence[RemoteCall]: ...

    def collect(self, calls: Any, hidden: mx.array, dtype: mx.Dtype) -> Iterable[tuple[Any, mx.array | None]]: ...

    def should_audit(self) -> bool: ...

    def audited(self, layer: int, call: Any, same: bool) -> None: ...


@dataclass
class Prefetch:
    """How a layer guesses the next MoE layer's experts: that layer's router applied to
    this layer's input (an approximation: the residual has not changed yet)."""

    next_layer: LayerDispatch
    logits: Callable[[mx.array], mx.array]


@dataclass
class LayerTimes:
    """Where a layer's host time goes (for the bench's per-layer breakdown): waiting to read
    the router's choice back (which waits for every queued op it depends on), and the
    dispatcher's own work after it (slot lookups, read waits, building the expert ops)."""

    calls: int = 0
    routing_wait_s: float = 0.0
    dispatch_s: float = 0.0


class LayerDispatch:
    """Computes one MoE layer's routed experts for the router's choice `chosen`
    (`x.shape[:-1] + (k,)` expert ids), from wherever each expert is."""

    def __init__(
        self,
        layer: int,
        kernel: ExpertKernel,
        local: LocalExperts,
        max_inflight: int,
        remote: Remote | None = None,
        prefetch: Prefetch | None = None,
    ):
        self.layer = layer
        self.kernel = kernel
        self.local = local
        self.max_inflight = max_inflight
        self.remote = remote
        self.prefetch = prefetch
        # What the previous layer guessed this one would ask for, and how well it did.
        self.guess: set[int] | None = None
        self.guessed = 0
        self.guessed_right = 0
        self._bound: dict[str, mx.array] | None = None
        self.times = LayerTimes()
        # Whether a resident layer starts its compute at once, while Python builds the next
        # layer: on the CPU backend +17% tok/s (109.6 against 93.7, every expert cached); on
        # CUDA each evaluation is a launch, and once per token, as mlx-lm does, was faster
        # (278 against 240 tok/s on an H200).
        self._overlap = mx.default_device() == mx.cpu
        # Whether a decode layer's call is built before its routing is read back, on a device
        # array of expert -> slot that the host fills in after (the CPU backend, whose arrays
        # the host writes in place). The build then overlaps the compute instead of following it.
        self.prebuild = self._overlap
        self._slot_table: tuple[mx.array, np.ndarray] | None = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        began = time.perf_counter()
        out, read_back = self._dispatch(x, indices)
        self.times.calls += 1
        self.times.routing_wait_s += read_back - began
        self.times.dispatch_s += time.perf_counter() - read_back
        return out

    def _dispatch(self, x: mx.array, indices: mx.array) -> tuple[mx.array, float]:
        """The layer's output, and when the router's choice was on the host."""
        resident = self.local.resident_arrays(self.layer) if self.remote is None else None
        if resident is not None:
            # Every expert of the layer is in its slot for good, in expert order: mlx-lm's
            # module computes on them as on its own, with no host round trip.
            no_wait = time.perf_counter()
            self._bind(resident)
            self.local.defer_hits(self.layer, indices)
            out = self.kernel(x, indices)
            if self._overlap:
                mx.async_eval(out)
            return out, no_wait
        self._bind(self.local.arrays(self.layer))
        # The host round trip: which experts the router chose, and with it the guess of the
        # next layer's, so that its reads start as soon as this layer's compute is queued
        # (read back after that, the guess waited for the compute to finish).
        prebuilt = None
        if self.prebuild and self.remote is None and indices.size == indices.shape[-1]:
            prebuilt = self.kernel(x, self._table()[0][indices])
        ahead = self._guess_next(x, indices)
        if ahead is not None:
            mx.eval(indices, ahead)
        chosen = np.array(indices)
        read_back = time.perf_counter()
        return self._route(x, chosen, None if ahead is None else np.array(ahead).tolist(), prebuilt), read_back

    def _bind(self, arrays: dict[str, mx.array]) -> None:
        """Points the kernel at a pool (rebuilt when the cache is reset) or at a resident
        layer's experts."""
        if arrays is not self._bound:
            self.kernel.bind(arrays)
            self._bound = arrays

    def _table(self) -> tuple[mx.array, np.ndarray]:
        """This layer's expert -> slot table, and a host view of its memory."""
        if self._slot_table is None:
            table = mx.zeros((self.kernel.spec.num_experts,), dtype=mx.uint32)
            mx.eval(table)
            self._slot_table = table, np.frombuffer(memoryview(table), dtype=np.uint32)  # type: ignore[arg-type]
        return self._slot_table

    def _guess_next(self, x: mx.array, indices: mx.array) -> mx.array | None:
        """In decode (one token), the next layer's likely experts: its router's top k for this
        layer's input. None where there is no guess to make."""
        if self.prefetch is None or indices.size != indices.shape[-1]:
            return None
        width = min(self.local.prefetch_width, self.prefetch.next_layer.kernel.spec.num_experts)
        if not width:
            return None
        # A (1, D) row, not 1-D: MLX's CUDA quantized matmul fails on a 1-D input
        # (tests/upstream/mlx_cuda_qmm_1d.py).
        logits = self.prefetch.logits(x.reshape(-1, x.shape[-1])[-1:])[0].astype(mx.float32)
        # Most likely first: the disk serves the reads roughly in the order they are asked for.
        return mx.argsort(-logits)[:width]

    def _route(self, x: mx.array, chosen: np.ndarray, guess: list[int] | None,
               prebuilt: mx.array | None = None) -> mx.array:
        """`prebuilt`: the layer's call, built on `_table()` before the routing was known."""
        flat = chosen.reshape(-1)
        needed = sorted(set(flat.tolist()))
        if self.guess is not None:
            self.guessed += len(self.guess)
            self.guessed_right += len(self.guess.intersection(needed))
            self.guess = None
        remote = self.remote
        by_node = remote.route(self.layer, needed) if remote is not None else {}
        if remote is not None and by_node:
            return self._split(remote, x, chosen, by_node, guess)
        if len(needed) > self.max_inflight:
            return self._chunked(x, chosen)
        slots, misses = self.local.start_slots(self.layer, needed)
        slot_of = dict(zip(needed, slots.tolist()))
        if misses is not None and misses.experts:
            k = chosen.shape[-1]
            out = self._as_read(x.reshape(-1, x.shape[-1]), np.arange(flat.size) // k, flat, slot_of, misses,
                                flat.size >= SORT_MIN_PAIRS)
            out = out.reshape(*chosen.shape, -1)
        elif prebuilt is not None:
            # Every graph that read the table before is computed (each read-back since waited
            # for it): it can be rewritten for this one.
            self._table()[1][needed] = slots
            out = prebuilt
        else:
            # The whole layer in one call, in mlx-lm's own batch shape.
            out = self.kernel(x, np.array([slot_of[e] for e in flat.tolist()], dtype=np.uint32).reshape(chosen.shape))
        # Start computing now, while Python builds the next layer's graph.
        mx.async_eval(out)
        self._prefetch_next(guess)
        return out

    def _split(self, remote: Remote, x: mx.array, chosen: np.ndarray, by_node: dict,
               guess: list[int] | None) -> mx.array:
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        rows = np.arange(flat.size) // k
        hidden = x.reshape(-1, x.shape[-1])
        sort = flat.size >= SORT_MIN_PAIRS  # as mlx-lm's one call would
        remote_experts = [e for experts in by_node.values() for e in experts]
        calls = remote.send(self.layer, hidden, rows, flat, by_node, sort)
        parts: list[tuple[np.ndarray, mx.array]] = []
        local_pairs = np.flatnonzero(~np.isin(flat, remote_experts))
        if local_pairs.size:
            parts.append((local_pairs, self._pairs(hidden, rows[local_pairs], flat[local_pairs], sort)))
        self._prefetch_next(guess)
        for call, y in remote.collect(calls, hidden, self._output_dtype(hidden)):
            audit = y is not None and remote.should_audit()
            if y is None or audit:
                # The fallback's reads may reuse scratch or evicted slots that the work
                # queued so far still reads: finish that work first.
                mx.eval([part for _, part in parts])
                here = self._pairs(hidden, rows[call.pairs], flat[call.pairs], sort)
                if audit:
                    assert y is not None
                    remote.audited(self.layer, call, _same_bits(y, here))
                # An audited call's output is this machine's either way: a wrong node changes no token.
                y = here
            parts.append((call.pairs, y))
        order = np.concatenate([pairs for pairs, _ in parts])
        merged = mx.concatenate([y for _, y in parts])[mx.array(np.argsort(order))].reshape(*chosen.shape, -1)
        mx.async_eval(merged)
        return merged

    def _output_dtype(self, hidden: mx.array) -> mx.Dtype:
        """The dtype this layer's experts compute in for `hidden` (a quantized kernel with
        float32 scales turns bf16 input into float32): a node's output must have it too.
        Read off the lazy graph of a one-row call, which is never evaluated."""
        return self.kernel(hidden[:1], np.zeros((1, 1), dtype=np.uint32)).dtype

    def _pairs(self, hidden: mx.array, rows: np.ndarray, experts: np.ndarray, sort: bool) -> mx.array:
        """Output i is expert `experts[i]` applied to `hidden[rows[i]]`, computed here; `sort`:
        as on mlx-lm's sorted path (`ExpertKernel.__call__`)."""
        needed = sorted(set(experts.tolist()))
        if len(needed) > self.max_inflight:
            return compute_pairs(self.kernel, lambda group: self.local.slots(self.layer, group), hidden, rows,
                                 experts, self.max_inflight, sort)
        slots, misses = self.local.start_slots(self.layer, needed)
        return self._as_read(hidden, rows, experts, dict(zip(needed, slots.tolist())), misses, sort)

    def _as_read(self, hidden: mx.array, rows: np.ndarray, experts: np.ndarray, slot_of: dict[int, int],
                 misses: Misses | None, sort: bool) -> mx.array:
        """Computes the experts at hand at once, then each miss as soon as its read is in,
        so compute overlaps the reads still in flight. Every (row, expert) pair is the
        same arithmetic as in one call (as in `compute_pairs`), so the output is too."""
        pending = misses.experts if misses is not None else []
        at_hand = [e for e in slot_of if e not in pending]
        groups = ([(at_hand, None)] if at_hand else []) + [([e], e) for e in pending]
        parts, order = [], []
        for group, read in groups:
            if read is not None:
                assert misses is not None
                misses.wait(read)
            picked = np.flatnonzero(np.isin(experts, group))
            slots = np.array([slot_of[e] for e in experts[picked].tolist()], dtype=np.uint32)
            y = self.kernel(hidden[mx.array(rows[picked])], slots[:, None], sort).reshape(len(picked), -1)
            mx.async_eval(y)
            parts.append(y)
            order.append(picked)
        if len(parts) == 1:
            return parts[0]
        return mx.concatenate(parts)[mx.array(np.argsort(np.concatenate(order)))]

    def _chunked(self, x: mx.array, chosen: np.ndarray) -> mx.array:
        """Every (token, slot) pair as a row, a group of experts at a time: a prompt can
        route to more experts than the scratch slots hold."""
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        out = compute_pairs(self.kernel, lambda group: self.local.slots(self.layer, group),
                            x.reshape(-1, x.shape[-1]), np.arange(flat.size) // k, flat, self.max_inflight,
                            flat.size >= SORT_MIN_PAIRS)
        return out.reshape(*chosen.shape, -1)

    def _prefetch_next(self, guess: list[int] | None) -> None:
        """Starts reading the next layer's guessed experts, except those a node will
        compute: their reads would only cost disk time."""
        if self.prefetch is None or guess is None:
            return
        following = self.prefetch.next_layer
        following.guess = set(guess)
        if self.remote is not None:
            guess = [e for e in guess if not self.remote.is_remote(following.layer, e)]
        self.local.prefetch(following.layer, guess)


def _same_bits(a: mx.array, b: mx.array) -> bool:
    """Whether two arrays are bit for bit the same (NaNs included, which a float compare is not)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = {2: mx.uint16, 4: mx.uint32}[a.dtype.size]
    return bool(mx.array_equal(a.view(bits), b.view(bits)))
