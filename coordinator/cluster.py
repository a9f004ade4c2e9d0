"""The coordinator's view of its peers: which node computes which experts, and what to push where."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from node.compute import ExpertKernel, compute_pairs
from node.credentials import ClusterCredentials
from node.holdings import layer_specs_to_json
from node.local import LocalExperts
from node.manifest import Manifest
from node.wire import WireError, array_from_tensor, tensor_from_array
from protos import edgemoe_node_pb2 as pb

from .peers import Peer, PeerDown

log = logging.getLogger(__name__)

REPLY_DEADLINE_S = 2.0


@dataclass
class ClusterStats:
    peer_calls: int = 0
    experts_from_peers: int = 0
    fallbacks: int = 0


class Cluster:
    def __init__(self, manifest: Manifest, config_json: bytes, local: LocalExperts, credentials: ClusterCredentials,
                 addresses: list[str], deadline_s: float = REPLY_DEADLINE_S, push: bool = True):
        self.manifest = manifest
        self.local = local
        self.deadline_s = deadline_s
        self.stats = ClusterStats()
        self.peers = [Peer(a, credentials) for a in addresses]
        self._spec = pb.ModelSpec(fingerprint=manifest.fingerprint, config_json=config_json,
                                  layers_json=layer_specs_to_json(manifest))
        for peer in self.peers:
            peer.connect(manifest.fingerprint)
        self._stop = threading.Event()
        self._pusher = threading.Thread(target=self._push_loop, daemon=True, name="expert-push") if push else None
        if self._pusher is not None:
            self._pusher.start()

    def owner(self, layer: int, expert: int) -> Peer | None:
        """The healthy peer to send this expert to, if any (the first that holds it)."""
        for peer in self.peers:
            if peer.healthy and (layer, expert) in peer.held:
                return peer
        return None

    def _retry_failed(self) -> None:
        for peer in self.peers:
            if peer.due_for_retry():
                peer.reconnect_in_background(self.manifest.fingerprint)

    def run_layer(self, layer: int, kernel: ExpertKernel, x: mx.array, chosen: np.ndarray, max_inflight: int) -> mx.array:
        """One MoE layer: each peer gets one request with all its (row, expert) pairs; the rest,
        and whatever a peer fails to return in time, is computed here from cache or SSD."""
        self._retry_failed()
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        rows = np.arange(flat.size) // k
        hidden = x.reshape(-1, x.shape[-1])
        by_peer: dict[Peer, list[int]] = {}
        local_pairs = []
        for i, e in enumerate(flat.tolist()):
            peer = None if (layer, e) in self.local else self.owner(layer, e)
            if peer is None:
                local_pairs.append(i)
            else:
                by_peer.setdefault(peer, []).append(i)
        calls = {}
        if by_peer:
            wire_hidden = tensor_from_array(hidden)
            for peer, pairs in by_peer.items():
                request = pb.ComputeRequest(fingerprint=self.manifest.fingerprint, layer=layer, hidden=wire_hidden,
                                            rows=rows[pairs].tolist(), experts=flat[pairs].tolist())
                calls[peer] = (pairs, peer.compute(request))
                self.stats.peer_calls += 1
        out = mx.zeros((flat.size, hidden.shape[-1]), dtype=x.dtype)
        slots_for = lambda group: self.local.slots(layer, group)  # noqa: E731
        if local_pairs:
            picked = np.array(local_pairs)
            out[mx.array(picked)] = compute_pairs(kernel, slots_for, hidden, rows[picked], flat[picked], max_inflight)
        deadline = time.monotonic() + self.deadline_s
        for peer, (pairs, future) in calls.items():
            picked = np.array(pairs)
            try:
                reply = future.result(timeout=max(0.0, deadline - time.monotonic()))
                if reply.error:
                    raise WireError(f"node {peer.name}: {reply.error}")
                y = array_from_tensor(reply.output, max_rows=len(pairs))
                if list(y.shape) != [len(pairs), hidden.shape[-1]] or y.dtype != out.dtype:
                    raise WireError(f"node {peer.name} answered shape {list(y.shape)} {y.dtype}")
                self.stats.experts_from_peers += len(pairs)
            except (FutureTimeout, PeerDown, WireError) as exc:
                if isinstance(exc, FutureTimeout):
                    peer.mark_failed(f"node {peer.name} did not answer within {self.deadline_s:.1f}s")
                elif isinstance(exc, WireError):
                    peer.mark_failed(str(exc))
                self.stats.fallbacks += 1
                y = compute_pairs(kernel, slots_for, hidden, rows[picked], flat[picked], max_inflight)
            out[mx.array(picked)] = y
        return out.reshape(*chosen.shape, -1)

    def _push_loop(self) -> None:
        """Places experts on nodes in the background: each node gets the experts the
        coordinator does not cache, spread round-robin, up to the node's RAM budget."""
        while not self._stop.is_set():
            for peer in self.peers:
                if self._stop.is_set() or not peer.healthy or peer.info is None:
                    continue
                wanted = self._placement(peer)
                todo = [key for key in wanted if key not in peer.held][:64]
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

    def _placement(self, peer: Peer) -> list[tuple[int, int]]:
        healthy = [p for p in self.peers if p.info is not None]
        index = healthy.index(peer)
        capacity = max(1, peer.info.cache_budget_bytes // max(1, self.manifest.expert_bytes))
        keys = [(spec.layer, e) for spec in self.manifest.layers for e in range(spec.num_experts)]
        mine = [key for i, key in enumerate(keys) if i % len(healthy) == index]
        return mine[:capacity]

    def _records(self, keys):
        for layer, expert in keys:
            record = self.local.store.read(layer, expert)
            yield layer, expert, self.manifest.layer(layer).experts[expert].checksum, record.tobytes()

    def close(self) -> None:
        self._stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=5)
        for peer in self.peers:
            peer.close()
