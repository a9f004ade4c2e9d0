"""The coordinator's view of its nodes: placement (which node holds which experts), transport
(requests and replies, pushes) and health. What a layer computes where is `dispatch`."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from edgemoe.node.credentials import ClusterCredentials
from edgemoe.node.holdings import layer_specs_to_json
from edgemoe.node.limits import MAX_MESSAGE_BYTES
from edgemoe.node.local import LocalExperts
from edgemoe.node.manifest import Manifest
from edgemoe.node.wire import MAX_ROWS, WireError, array_from_tensor, tensor_from_array
from edgemoe.protos import edgemoe_node_pb2 as pb

from .members import Members, peer_label
from .peers import Peer, PeerDown

log = logging.getLogger(__name__)
REPLY_DEADLINE_S = 2.0
# Placement is redone at most this often (or at once when the usable nodes change):
# ranking every expert of a large model holds the GIL for tens of milliseconds.
REPLAN_S = 5.0
# Hidden states per compute request, leaving room under gRPC's message cap for the rest.
MAX_REQUEST_HIDDEN_BYTES = MAX_MESSAGE_BYTES - (1 << 20)
# Experts pushed to one node per pass of the push loop, so a pass stays short.
PUSH_BATCH = 64
# The share of node replies recomputed here and compared bit for bit (`--audit`).
DEFAULT_AUDIT_RATE = 0.01

Key = tuple[int, int]


def keep_local(
    experts: Sequence[Key],
    record_bytes: Mapping[int, int],
    counts: Mapping[Key, int],
    cached: Collection[Key],
    free_bytes: int,
) -> set[Key]:
    """The experts the coordinator computes itself: those it caches now and, while its
    cache has room, the most-routed others that fill that room (ties in (layer, expert)
    order, so a cold start keeps whole layers local: a layer with no expert on a node
    costs no round trip)."""
    keep = set(cached)
    for key in sorted((k for k in experts if k not in keep), key=lambda k: (-counts.get(k, 0), k)):
        size = record_bytes[key[0]]
        if size > free_bytes:
            break
        keep.add(key)
        free_bytes -= size
    return keep


def place_experts(
    experts: Sequence[Key],
    record_bytes: Mapping[int, int],
    counts: Mapping[Key, int],
    capacities: Sequence[int],
    local: Collection[Key] = (),
    held: Sequence[Collection[Key]] = (),
) -> list[list[Key]]:
    """Which experts each node should hold, most-routed first.

    `experts` are (layer, expert) keys, `record_bytes` a layer's expert size,
    `counts` how often each key was routed to, `capacities` each node's RAM
    budget in bytes, `local` the keys the coordinator caches itself (never
    placed), `held` what each node holds already. The most-routed remaining
    experts are placed first; each goes to the node that holds it already if it
    has room (so a change in the counts moves few experts), else to the node
    with room that is least full relative to its capacity (ties: the lower
    index). Every expert goes to at most one node: a second copy would not
    shorten a layer, which waits one round trip whichever node answers, and
    would take room a colder expert could use. Deterministic: ties in the
    counts go in (layer, expert) order.
    """
    local = set(local)
    held = [h if isinstance(h, (set, frozenset)) else set(h) for h in held]
    order = sorted((k for k in experts if k not in local), key=lambda k: (-counts.get(k, 0), k))
    used = [0] * len(capacities)
    plan: list[list[Key]] = [[] for _ in capacities]
    smallest = min(record_bytes.values(), default=0)
    for key in order:
        size = record_bytes[key[0]]
        room = [i for i, cap in enumerate(capacities) if used[i] + size <= cap]
        if not room:
            if all(cap - u < smallest for cap, u in zip(capacities, used)):
                break
            continue
        holders = [i for i in room if i < len(held) and key in held[i]]
        node = holders[0] if holders else min(room, key=lambda i: (used[i] / capacities[i], i))
        plan[node].append(key)
        used[node] += size
    return plan


@dataclass
class ClusterStats:
    peer_calls: int = 0
    experts_from_peers: int = 0
    fallbacks: int = 0
    # MoE layer calls while a cluster is configured, those that sent work to a node, those
    # of which a node answered, and over the last the sum of each layer's slowest reply.
    layers: int = 0
    peer_layers: int = 0
    answered_layers: int = 0
    slowest_rtt_ms_total: float = 0.0
    audits: int = 0  # node replies recomputed here and compared (`--audit`)
    audit_failures: int = 0


@dataclass
class Call:
    """A compute request in flight: its node, the layer's pairs it carries (indices
    into the router's flattened choice) and their experts, its reply, and its turn
    among that node's requests of the layer."""

    peer: Peer
    pairs: np.ndarray
    experts: np.ndarray
    future: Future
    turn: int


@dataclass
class NodeShare:
    name: str
    held_experts: int
    planned_experts: int
    held_bytes: int
    planned_bytes: int


class Cluster(Members):
    def __init__(self, manifest: Manifest, config_json: bytes, local: LocalExperts, credentials: ClusterCredentials,
                 addresses: list[str], deadline_s: float = REPLY_DEADLINE_S, push: bool = True,
                 audit_rate: float = DEFAULT_AUDIT_RATE):
        self.manifest = manifest
        self.local = local
        self.deadline_s = deadline_s
        self.audit_rate = audit_rate
        # Its own generator: audits must not draw from MLX's, which samples the tokens.
        self._audit_rng = random.Random()
        self.stats = ClusterStats()
        self.peers: list[Peer] = []
        try:
            for address in addresses:
                self.peers.append(Peer(address, credentials, manifest))
                self.peers[-1].connect(manifest.fingerprint)
        except BaseException:
            for peer in self.peers:
                peer.close()
            raise
        self._spec = pb.ModelSpec(fingerprint=manifest.fingerprint, config_json=config_json,
                                  layers_json=layer_specs_to_json(manifest))
        self._keys: list[Key] = [(spec.layer, e) for spec in manifest.layers for e in range(spec.num_experts)]
        self._record_bytes = {spec.layer: spec.record_bytes for spec in manifest.layers}
        # The latest placement: what each node should hold, and each placed expert's node.
        self._plan: dict[Peer, list[Key]] | None = None
        self._assigned: dict[Key, Peer] = {}
        self._local_keys: set[Key] = set()
        self._stop = threading.Event()
        self._pusher = threading.Thread(target=self._push_loop, daemon=True, name="expert-push") if push else None
        if self._pusher is not None:
            self._pusher.start()

    def owner(self, layer: int, expert: int) -> Peer | None:
        """The healthy peer to send this expert to, if any: none for an expert placement
        keeps local, else the node placement chose, else the first that holds it."""
        if (layer, expert) in self._local_keys:
            return None
        chosen = self._assigned.get((layer, expert))
        if chosen is not None and chosen.healthy and (layer, expert) in chosen.held:
            return chosen
        for peer in self.peers:
            if peer.healthy and (layer, expert) in peer.held:
                return peer
        return None

    def _retry_failed(self) -> None:
        for peer in self.peers:
            if peer.due_for_retry():
                peer.reconnect_in_background(self.manifest.fingerprint)

    def is_remote(self, layer: int, expert: int) -> bool:
        """Whether a node would compute this expert now (this machine does not cache it)."""
        return (layer, expert) not in self.local and self.owner(layer, expert) is not None

    def route(self, layer: int, experts: list[int]) -> dict[Peer, list[int]]:
        """Which of a layer's chosen experts go to which healthy node; the rest stay local."""
        self._retry_failed()
        by_node: dict[Peer, list[int]] = {}
        for e in experts:
            peer = None if (layer, e) in self.local else self.owner(layer, e)
            if peer is not None:
                by_node.setdefault(peer, []).append(e)
        self.stats.layers += 1
        if by_node:
            self.stats.peer_layers += 1
            # The cache counts what the router chose, wherever it was computed: placement ranks by it.
            self.local.note_routed(layer, [e for experts in by_node.values() for e in experts])
        return by_node

    def send(self, layer: int, hidden: mx.array, rows: np.ndarray, flat: np.ndarray,
             by_node: dict[Peer, list[int]], sort: bool = False) -> list[Call]:
        """Starts the compute requests: one per node, or several when its pairs (a long prefill's)
        exceed a request's row or byte limit; a request carries only the rows it uses. `sort`:
        the layer's call is one mlx-lm sorts, so the nodes compute on the sorted path too."""
        row_bytes = hidden.nbytes // hidden.shape[0]
        per_request = max(1, min(MAX_ROWS, MAX_REQUEST_HIDDEN_BYTES // row_bytes))
        whole, calls = None, []
        for peer, experts in by_node.items():
            pairs = np.flatnonzero(np.isin(flat, experts))
            for turn, start in enumerate(range(0, len(pairs), per_request), 1):
                part = pairs[start : start + per_request]
                used, remapped = np.unique(rows[part], return_inverse=True)
                if len(used) == hidden.shape[0]:
                    if whole is None:
                        whole = tensor_from_array(hidden)
                    wire_hidden, wire_rows = whole, rows[part]
                else:
                    wire_hidden, wire_rows = tensor_from_array(hidden[mx.array(used)]), remapped
                request = pb.ComputeRequest(fingerprint=self.manifest.fingerprint, layer=layer, hidden=wire_hidden,
                                            rows=wire_rows.tolist(), experts=flat[part].tolist(), sort=sort)
                calls.append(Call(peer, part, flat[part], peer.compute(request), turn))
                self.stats.peer_calls += 1
        return calls

    def collect(self, calls: list[Call], hidden: mx.array, dtype: mx.Dtype) -> Iterator[tuple[Call, mx.array | None]]:
        """Each call with its output `[len(pairs), hidden]` of `dtype`, in the order they
        complete; None where the node failed, sent a malformed reply or missed its deadline
        (the node is then set aside until its retry), as soon as that is known."""
        sent = time.monotonic()
        # A node answers its requests in turn: the n-th may take n deadlines.
        deadlines = {call.future: sent + self.deadline_s * call.turn for call in calls}
        pending = {call.future: call for call in calls}
        served: dict[Peer, set[int]] = {}
        slowest: float | None = None
        try:
            while pending:
                first = min(deadlines[f] for f in pending)
                done, _ = wait(pending, timeout=max(0.0, first - time.monotonic()), return_when=FIRST_COMPLETED)
                if not done:
                    now = time.monotonic()
                    for future in [f for f in pending if deadlines[f] <= now]:
                        call = pending.pop(future)
                        call.peer.mark_failed(f"node {call.peer.name} did not answer within {self.deadline_s:.1f}s")
                        self.stats.fallbacks += 1
                        yield call, None
                    continue
                for future in done:
                    call = pending.pop(future)
                    y, rtt_ms = self._output(call, hidden.shape[-1], dtype)
                    if y is None:
                        self.stats.fallbacks += 1
                    else:
                        self.stats.experts_from_peers += len(call.pairs)
                        served.setdefault(call.peer, set()).update(call.experts.tolist())
                        slowest = max(slowest or 0.0, rtt_ms)
                    yield call, y
        finally:
            for peer, experts in served.items():
                peer.stats.experts += len(experts)
            if slowest is not None:
                self.stats.answered_layers += 1
                self.stats.slowest_rtt_ms_total += slowest

    def should_audit(self) -> bool:
        """Whether to recompute a node's answered call here: a random `audit_rate` of them."""
        return self.audit_rate > 0 and self._audit_rng.random() < self.audit_rate

    def audited(self, layer: int, call: Call, same: bool) -> None:
        """Counts an audit (`same`: the node's output was bit for bit this machine's); a node
        that answered otherwise is set aside for good."""
        self.stats.audits += 1
        if same:
            return
        self.stats.audit_failures += 1
        call.peer.distrust(f"node {call.peer.name}'s results for layer {layer} differ from this machine's (an audit "
                           "recomputed them): never used again for this model")

    def _output(self, call: Call, hidden_size: int, dtype: mx.Dtype) -> tuple[mx.array | None, float]:
        """A completed call's output and round trip; (None, 0) if it is unusable."""
        peer = call.peer
        if peer.distrusted:  # an audit of another of its calls failed meanwhile
            return None, 0.0
        try:
            reply, rtt_ms = call.future.result()
            if reply.error:
                raise WireError(f"node {peer.name}: {reply.error}")
            y = array_from_tensor(reply.output, max_rows=len(call.pairs))
            if list(y.shape) != [len(call.pairs), hidden_size] or y.dtype != dtype:
                raise WireError(f"node {peer.name} answered shape {list(y.shape)} {y.dtype}")
        except PeerDown:
            return None, 0.0
        except WireError as exc:
            peer.mark_failed(str(exc) if str(exc).startswith(f"node {peer.name}") else
                             f"node {peer.name} sent a malformed reply ({exc}): check that it runs the "
                             "same edgemoe version as this coordinator")
            return None, 0.0
        return y, rtt_ms

    def _push_loop(self) -> None:
        """Places experts on nodes in the background (see `place_experts`), redoing the
        placement as routing counts change, and pushes each node what it lacks, hottest first."""
        planned_at, planned_for = 0.0, None
        while not self._stop.is_set():
            usable = [p for p in self.peers if p.healthy and p.info is not None]
            if not usable:
                # Nothing to place on: ranking every expert of a large model would only hold the GIL.
                self._plan, self._assigned, planned_for = {}, {}, usable
            elif usable != planned_for or time.monotonic() - planned_at >= REPLAN_S:
                self._replan(usable)
                planned_at, planned_for = time.monotonic(), usable
            for peer, wanted in (self._plan or {}).items():
                if self._stop.is_set() or not peer.healthy:
                    continue
                todo = [key for key in wanted if key not in peer.held][:PUSH_BATCH]
                if not todo:
                    continue
                try:
                    reply = peer.push(self._spec, self._records(todo))
                    if reply.errors:
                        log.warning("node %s rejected experts: %s", peer.name, reply.errors[0])
                    peer.refresh(self.manifest.fingerprint)
                except Exception as exc:  # a failed push only delays placement
                    log.warning("pushing experts to node %s failed: %s", peer.name, exc)
            self._stop.wait(1.0)

    def _replan(self, usable: list[Peer]) -> None:
        counts = self.local.routing_counts()
        cached = {key for key in self._keys if key in self.local}
        free = self.local.budget_bytes - self.local.cache_bytes_used
        local = keep_local(self._keys, self._record_bytes, counts, cached, free)
        budgets = []
        for p in usable:
            assert p.info is not None  # usable: answered Info (and info is never cleared)
            budgets.append(p.info.cache_budget_bytes)
        plan = place_experts(self._keys, self._record_bytes, counts, budgets, local, [p.held for p in usable])
        self._plan = dict(zip(usable, plan))
        self._assigned = {key: peer for peer, keys in self._plan.items() for key in keys}
        self._local_keys = local

    def placement_complete(self) -> bool:
        """True once a placement exists and every healthy node holds all it was given."""
        plan = self._plan
        return plan is not None and all(set(keys) <= peer.held for peer, keys in plan.items() if peer.healthy)

    def push_progress(self) -> list[NodeShare]:
        """Per healthy node of the latest placement: how much of its share it holds."""
        shares = []
        for peer, keys in (self._plan or {}).items():
            if peer.healthy:
                held = [k for k in keys if k in peer.held]
                shares.append(NodeShare(peer_label(peer), len(held), len(keys),
                                        sum(self._record_bytes[k[0]] for k in held),
                                        sum(self._record_bytes[k[0]] for k in keys)))
        return shares

    def placed(self) -> dict[str, int]:
        """Experts the latest placement gives each node, by node name."""
        return {peer.name: len(keys) for peer, keys in (self._plan or {}).items()}

    def _records(self, keys):
        for layer, expert in keys:
            record = self.local.store.read(layer, expert)
            yield layer, expert, self.manifest.layer(layer).experts[expert].checksum, record.tobytes()

    def snapshot(self) -> dict:
        """The cluster's counters and each node's state, as `status`, `--json`, the demo and /metrics show them."""
        return {
            "peer_calls": self.stats.peer_calls,
            "experts_from_peers": self.stats.experts_from_peers,
            "fallbacks": self.stats.fallbacks,
            "audits": self.stats.audits,
            "audit_failures": self.stats.audit_failures,
            "nodes": [
                {"address": p.address, "name": p.name, "node_id": p.node_id, "healthy": p.healthy,
                 "calls": p.stats.calls, "failures": p.stats.failures, "experts_computed": p.stats.experts,
                 "mean_rtt_ms": p.stats.mean_rtt_ms, "experts_held": len(p.held), "error": p.last_error or None}
                for p in self.peers
            ],
        }

    def close(self) -> None:
        self._stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=5)
        for peer in self.peers:
            peer.close()

