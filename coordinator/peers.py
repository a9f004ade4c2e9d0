"""One edge node as the coordinator sees it: a TLS channel, a long-lived compute stream,
health with growing back-off, and round-trip times."""

from __future__ import annotations

import bisect
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc

from edgemoe.node.credentials import CHANNEL_OPTIONS, ClusterCredentials, channel_credentials
from edgemoe.node.holdings import held_checksums_sha256
from edgemoe.node.limits import compute_backend
from edgemoe.node.manifest import Manifest
from edgemoe.node.version import PROTOCOL_VERSION
from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
PUSH_CHUNK_BYTES = 1 << 20


class PeerDown(Exception):
    """The peer's stream is broken; its pending calls go to the SSD path."""


# Upper bounds (ms) of the round-trip histogram's buckets, as Prometheus histograms have them:
# a fixed set, so a node's statistics stay the same size however long the coordinator runs.
RTT_BUCKETS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)


@dataclass
class PeerStats:
    calls: int = 0
    failures: int = 0
    # distinct experts per layer call it computed for us, counted as LocalExperts counts its own
    experts: int = 0
    rtt_count: int = 0
    rtt_sum_ms: float = 0.0
    rtt_min_ms: float | None = None
    rtt_max_ms: float | None = None
    # replies per bucket of RTT_BUCKETS_MS (not cumulative); those over the last bound only in rtt_count
    rtt_buckets: list[int] = field(default_factory=lambda: [0] * len(RTT_BUCKETS_MS))
    # replies are counted on the stream's thread and read by /metrics on another: one lock keeps
    # count, sum and buckets consistent with each other
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def observe_rtt(self, ms: float) -> None:
        with self._lock:
            self.rtt_count += 1
            self.rtt_sum_ms += ms
            self.rtt_min_ms = ms if self.rtt_min_ms is None else min(self.rtt_min_ms, ms)
            self.rtt_max_ms = ms if self.rtt_max_ms is None else max(self.rtt_max_ms, ms)
            i = bisect.bisect_left(RTT_BUCKETS_MS, ms)
            if i < len(self.rtt_buckets):
                self.rtt_buckets[i] += 1

    def rtt_histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """The round trips as a Prometheus histogram: cumulative (bound in ms, replies at most that),
        then the count and the sum (ms)."""
        with self._lock:
            buckets, count, total = list(self.rtt_buckets), self.rtt_count, self.rtt_sum_ms
        return list(zip(RTT_BUCKETS_MS, itertools.accumulate(buckets))), count, total

    @property
    def mean_rtt_ms(self) -> float | None:
        return self.rtt_sum_ms / self.rtt_count if self.rtt_count else None


class Peer:
    """One node. With `manifest` (the model it computes for) the node must compute on this
    machine's backend and hold experts whose checksums are the manifest's (`_unfit`)."""

    def __init__(self, address: str, credentials: ClusterCredentials, manifest: Manifest | None = None):
        self.address = address
        self.manifest = manifest
        self.node_id = ""
        self.name = address
        self.stats = PeerStats()
        self.held: set[tuple[int, int]] = set()
        self.info: pb.NodeInfo | None = None
        self._channel = grpc.secure_channel(address, channel_credentials(credentials), options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.EdgeNodeStub(self._channel)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Future, float]] = {}
        self._requests: queue.Queue | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self.last_error = ""
        self.connecting = False
        # Why this node is never used again for this model (its checksums or results differed).
        self.distrusted = ""

    @property
    def healthy(self) -> bool:
        return self._requests is not None

    def due_for_retry(self) -> bool:
        return not self.healthy and not self.connecting and not self.distrusted and time.monotonic() >= self._retry_at

    def reconnect_in_background(self, fingerprint: str) -> None:
        """Tries the node again without holding up generation."""
        self.connecting = True

        def attempt() -> None:
            try:
                self.connect(fingerprint)
            except ValueError:  # grpc's "Channel closed": close() ran meanwhile, nothing to reconnect
                log.debug("node %s closed while reconnecting", self.address)
            finally:
                self.connecting = False

        threading.Thread(target=attempt, daemon=True, name=f"reconnect-{self.address}").start()

    def connect(self, fingerprint: str, timeout: float = 2.0) -> bool:
        """Asks the node what it is and holds, then opens the compute stream. False if it is unusable."""
        if self.distrusted:
            return False
        try:
            info = self._stub.Info(pb.InfoRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            if "handshake" in _detail(exc).lower():
                self._failed(f"node at {self.address} is not of this cluster (TLS handshake refused): it holds another "
                             "join token, or an old one since `edgemoe cluster init --rotate`; restart it with the "
                             "current token")
            else:
                self._failed(f"cannot reach node at {self.address} ({exc.code().name}): check that edge-node runs "
                             "there and the address and port are right")
            return False
        if info.protocol_version != PROTOCOL_VERSION:
            self._failed(f"node {info.name or self.address} speaks protocol {info.protocol_version}, "
                         f"this coordinator {PROTOCOL_VERSION}: upgrade edgemoe on both")
            return False
        if info.backend != compute_backend() and self.manifest is not None:
            self._failed(f"node {info.name or self.address} computes on {info.backend or 'an unknown backend'}, this "
                         f"coordinator on {compute_backend()}: backends round differently, so its results could "
                         "change the tokens; run the node on this machine's backend")
            return False
        if not self._fits(info):
            return False
        self.info, self.node_id, self.name = info, info.node_id, info.name or self.address
        self.held = _held(info, fingerprint)
        requests: queue.Queue = queue.Queue()
        replies = self._stub.Compute(iter(requests.get, None))
        with self._lock:
            self._requests = requests
        threading.Thread(target=self._read_replies, args=(replies, requests), daemon=True,
                         name=f"peer-{self.name}").start()
        self._backoff = 0.0
        log.info("node %s (%s) holds %d experts of this model", self.name, self.address, len(self.held))
        return True

    def refresh(self, fingerprint: str, timeout: float = 2.0) -> None:
        try:
            info = self._stub.Info(pb.InfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return
        if not self._fits(info):
            return
        self.info = info
        self.held = _held(info, fingerprint)

    def compute(self, request: pb.ComputeRequest) -> Future:
        """Sends a request on the compute stream; the future resolves to (reply, round trip in ms)."""
        future: Future = Future()
        with self._lock:
            if self._requests is None:
                future.set_exception(PeerDown(self.last_error or "not connected"))
                return future
            request.request_id = next(self._ids)
            self._pending[request.request_id] = (future, time.perf_counter())
            self._requests.put(request)
        self.stats.calls += 1
        return future

    def mark_failed(self, reason: str) -> None:
        self._failed(reason)

    def distrust(self, reason: str) -> None:
        """Sets the node aside for good: it is never retried for this model."""
        self.distrusted = reason
        self._failed(reason)

    def _fits(self, info: pb.NodeInfo) -> bool:
        """Whether the checksums of the experts the node holds of this model are this manifest's;
        if not, the node is distrusted. A member can register a model under its real fingerprint
        only with the real checksums (the node recomputes the fingerprint), so a difference means
        a node that does not check what it is pushed: none of its experts can be trusted."""
        manifest = self.manifest
        if manifest is None:
            return True
        for model in info.models:
            if model.fingerprint != manifest.fingerprint:
                continue
            try:
                expected = held_checksums_sha256(manifest, zip(model.layers, model.experts))
            except (KeyError, IndexError):  # experts this model does not have
                expected = ""
            if model.checksums_sha256 != expected:
                self.distrust(f"node {info.name or self.address} holds experts of model {manifest.fingerprint[:12]} "
                              "whose checksums differ from this coordinator's manifest: never used for this model")
                return False
        return True

    def _read_replies(self, replies, stream: queue.Queue) -> None:
        try:
            for reply in replies:
                with self._lock:
                    entry = self._pending.pop(reply.request_id, None)
                if entry is not None:
                    future, sent = entry
                    rtt = (time.perf_counter() - sent) * 1e3
                    self.stats.observe_rtt(rtt)
                    future.set_result((reply, rtt))
            self._failed(f"node {self.name} closed its stream", stream)
        except grpc.RpcError as exc:
            self._failed(f"node {self.name} failed: {exc.code().name} {_detail(exc)}", stream)

    def _failed(self, reason: str, stream: queue.Queue | None = None) -> None:
        """Sets the node aside. With `stream`, only if that stream is still the current one: a
        stream ends after the node was already set aside (or closed), or was replaced on reconnect."""
        with self._lock:
            if stream is not None and self._requests is not stream:
                return
            requests, self._requests = self._requests, None
            pending, self._pending = self._pending, {}
            if requests is not None:
                requests.put(None)
            self._backoff = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            self.stats.failures += 1
        if reason != self.last_error:
            retry = "never retried" if self.distrusted else f"retry in {self._backoff:.1f}s"
            log.warning("%s; using the local SSD for its experts (%s)", reason, retry)
        self.last_error = reason
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(PeerDown(reason))

    def push(self, spec: pb.ModelSpec, records) -> pb.PushReply:
        """Streams experts to the node: `records` yields (layer, expert, checksum, record bytes)."""

        def chunks():
            yield pb.PushChunk(model=spec)
            for layer, expert, checksum, record in records:
                for offset in range(0, len(record), PUSH_CHUNK_BYTES):
                    yield pb.PushChunk(layer=layer, expert=expert, checksum=checksum, record_bytes=len(record),
                                       offset=offset, data=bytes(record[offset : offset + PUSH_CHUNK_BYTES]))

        return self._stub.PushExperts(chunks(), timeout=600)

    def close(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, None
        if requests is not None:
            requests.put(None)
        self._channel.close()


def _held(info: pb.NodeInfo, fingerprint: str) -> set[tuple[int, int]]:
    for model in info.models:
        if model.fingerprint == fingerprint:
            return set(zip(model.layers, model.experts))
    return set()


def _detail(exc: grpc.RpcError) -> str:
    details = exc.details() if hasattr(exc, "details") else ""
    return (details or "").splitlines()[0][:200] if details else ""
