"""The node's gRPC service: what it holds, receiving experts, computing them."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import mlx.core as mx
import numpy as np
from google.protobuf.message import DecodeError

from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

from .architecture import build_model, routed_expert_modules
from .compute import SORT_MIN_PAIRS, ExpertKernel, compute_pairs, input_dims
from .errors import ChecksumError, EdgemoeError
from .holdings import ModelHoldings, NodeFullError, NodeHoldings, PushError, held_checksums_sha256
from .limits import MAX_INFLIGHT_EXPERTS, compute_backend
from .local import LocalExperts
from .manifest import Manifest
from .pool import layout_key
from .staging import open_dma
from .store import ExpertStore
from .version import EDGEMOE_VERSION, PROTOCOL_VERSION
from .wire import MAX_ROWS, WireError, array_from_tensor, tensor_from_array

log = logging.getLogger(__name__)

# A push's reply lists at most this many failed experts (a hostile push must not grow it).
MAX_PUSH_ERRORS = 64


@dataclass
class NodeIdentity:
    node_id: str
    name: str
    cache_bytes: int


def ram_plan(manifest: Manifest, budget_bytes: int) -> tuple[int, int, int]:
    """How a model uses up to `budget_bytes` of RAM: (cache bytes, experts in flight per layer
    group, RAM its slot pools take).

    Each layout group's slot pool has cache slots plus in-flight (scratch) slots, one
    record each; both count against the node's one budget. In-flight slots take at most
    a quarter of it (at least one, at most MAX_INFLIGHT_EXPERTS); the cache the rest, up
    to the model's whole size. LocalExperts refuses a cache that holds no expert of a group.
    """
    per_slot = sum({layout_key(spec): spec.record_bytes for spec in manifest.layers}.values())
    inflight = max(1, min(MAX_INFLIGHT_EXPERTS, budget_bytes // 4 // per_slot))
    cache = min(manifest.total_expert_bytes, budget_bytes - inflight * per_slot)
    return cache, inflight, cache + inflight * per_slot


def min_ram(manifest: Manifest) -> int:
    """The least RAM a model computes in: one in-flight slot and one cached expert per layout group."""
    groups: dict[tuple, list] = {}
    for spec in manifest.layers:
        groups.setdefault(layout_key(spec), []).append(spec)
    total = manifest.total_expert_bytes
    per_slot = sum(specs[0].record_bytes for specs in groups.values())
    # LocalExperts gives a group its share of the cache: it must cover one record.
    cache = max(-(-specs[0].record_bytes * total // sum(s.record_bytes * s.num_experts for s in specs))
                for specs in groups.values())
    return per_slot + cache + len(groups)  # + rounding of each group's float share


def activation_dtype(config: dict) -> mx.Dtype:
    """The dtype hidden states arrive in: the checkpoint's (config's `torch_dtype`), float32 if unnamed."""
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(mx, str(name), None)
    return dtype if isinstance(dtype, mx.Dtype) and mx.issubdtype(dtype, mx.floating) else mx.float32


class _ComputeModel:
    """One held model, ready to compute: its experts' cache and a kernel per MoE layer."""

    def __init__(self, holdings: ModelHoldings, budget_bytes: int):
        self.holdings = holdings
        manifest = holdings.manifest
        cache_bytes, self.inflight, self.ram_bytes = ram_plan(manifest, budget_bytes)
        store = ExpertStore(holdings.root, manifest, io_mode="buffered")
        self.local = LocalExperts(store, cache_bytes, scratch_slots=self.inflight, dma=open_dma())
        try:
            modules = dict(routed_expert_modules(build_model(holdings.config)))
            self.kernels = {
                spec.layer: ExpertKernel(modules[spec.module_path], spec, self.local.arrays(spec.layer))
                for spec in manifest.layers
            }
            self._warm_kernels(activation_dtype(holdings.config))
        except BaseException:
            self.local.close()
            raise

    def _warm_kernels(self, dtype: mx.Dtype) -> None:
        """Each layer's request path once, for a decode row and for a batch mlx-lm sorts, on
        whatever slot 0 holds, the outputs dropped: a backend compiles a kernel on first use
        (seconds on CUDA), which a coordinator's first call would otherwise wait for past its
        deadline."""
        for kernel in self.kernels.values():
            for rows in (1, SORT_MIN_PAIRS):
                hidden = mx.zeros((rows, input_dims(kernel)), dtype=dtype)
                out = compute_pairs(kernel, lambda group: np.zeros(len(group), dtype=np.uint32), hidden,
                                    np.arange(rows), np.zeros(rows, dtype=np.int64), self.inflight)
                tensor_from_array(out)

    def compute(self, layer: int, hidden: mx.array, rows: np.ndarray, experts: np.ndarray,
                sort: bool = False) -> mx.array:
        kernel = self.kernels[layer]
        return compute_pairs(kernel, lambda group: self.local.slots(layer, group), hidden, rows, experts,
                             self.inflight, sort)


class NodeService(pb_grpc.EdgeNodeServicer):
    def __init__(self, identity: NodeIdentity, holdings: NodeHoldings):
        self.identity = identity
        self.holdings = holdings
        # Models ready to compute, least recently used first; their RAM shares one budget.
        self._models: OrderedDict[str, _ComputeModel] = OrderedDict()
        self._models_lock = threading.Lock()
        # MLX work runs on one thread: the arrays and kernels are not shared across threads.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-compute")

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        if request is UNDECODABLE:
            await refuse_undecodable(context)
        snapshot = self.holdings.snapshot()
        models = []
        for fingerprint, pairs in snapshot.items():
            model = self.holdings.get(fingerprint)
            if model is not None:  # a model dropped since the snapshot is not reported
                models.append(pb.ModelHoldings(fingerprint=fingerprint, layers=[layer for layer, _ in pairs],
                                               experts=[e for _, e in pairs],
                                               checksums_sha256=held_checksums_sha256(model.manifest, pairs)))
        with self._models_lock:
            used = sum(m.local.cache_bytes_used for m in self._models.values())
        disk_free = await asyncio.to_thread(self.holdings.free_disk_bytes)
        return pb.NodeInfo(node_id=self.identity.node_id, name=self.identity.name, version=EDGEMOE_VERSION,
                           protocol_version=PROTOCOL_VERSION, models=models,
                           cache_budget_bytes=self.identity.cache_bytes, cache_used_bytes=used,
                           disk_free_bytes=disk_free, backend=compute_backend(), unix_time=time.time())

    async def PushExperts(self, request_iterator: AsyncIterator[pb.PushChunk], context) -> pb.PushReply:
        """Stores pushed experts. Each chunk is checked against the registered spec (layer,
        expert, record size, checksum), never the sender's own claims: a bad spec or a chunk
        that does not fit it ends the push with INVALID_ARGUMENT before any buffer grows; a
        record failing its checksum is an error in the reply and the push goes on."""
        stored, errors = 0, list[str]()
        model: ModelHoldings | None = None
        record, current, record_bytes = bytearray(), None, 0
        async for chunk in request_iterator:
            if chunk is UNDECODABLE:
                await refuse_undecodable(context)
            if chunk.HasField("model"):
                model = await self._register(chunk.model, context)
                continue
            if model is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with the model spec")
            assert model is not None  # abort raises
            key = (chunk.layer, chunk.expert)
            if key != current:
                try:
                    record_bytes = model.record_bytes(chunk.layer, chunk.expert)
                except PushError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                record, current = bytearray(), key
            if chunk.record_bytes != record_bytes or chunk.offset != len(record) or (
                    len(record) + len(chunk.data) > record_bytes):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"layer {chunk.layer} expert {chunk.expert}: chunk at {chunk.offset} of "
                                    f"{len(chunk.data)} bytes does not fit its {record_bytes}-byte record "
                                    f"(sent as {chunk.record_bytes}); send each record whole, in order")
            record += chunk.data
            if len(record) == record_bytes:
                try:
                    await asyncio.to_thread(model.store_expert, chunk.layer, chunk.expert, bytes(record))
                    stored += 1
                except PushError as exc:
                    if len(errors) < MAX_PUSH_ERRORS:
                        errors.append(str(exc))
                record, current = bytearray(), None
        if model is not None:
            with self._models_lock:
                # Rebuilt on the next compute so its store sees what was just written.
                stale = self._models.pop(model.fingerprint, None)
            if stale is not None:
                self._compute.submit(stale.local.close)
            stale = None  # its pools are freed before the new ones are allocated
            if stored and self._builds_alone():
                # Built (and its kernels compiled) before the reply, so the coordinator's first call
                # after placement meets a node ready to compute. A head start only: if it fails,
                # the first compute builds it (and reports the error).
                try:
                    await asyncio.get_running_loop().run_in_executor(self._compute, self._model, model.fingerprint)
                except Exception as exc:
                    log.warning("model %s could not be made ready after its push: %s", model.fingerprint[:12], exc)
        return pb.PushReply(experts_stored=stored, errors=errors)

    def _builds_alone(self) -> bool:
        """Whether building a model now would evict no other model's compute state (which a
        push of a second model would otherwise do for every batch)."""
        with self._models_lock:
            return not self._models

    async def _register(self, spec: pb.ModelSpec, context) -> ModelHoldings:
        """The model a push is for, registered if new; aborts the push with a clear status otherwise."""
        try:
            model = await asyncio.to_thread(self.holdings.register, spec.fingerprint, spec.config_json,
                                            spec.layers_json)
        except NodeFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EdgemoeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        need = min_ram(model.manifest)
        if need > self.identity.cache_bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"model {spec.fingerprint[:12]} needs at least {need / 2**20:.2f} MiB of this "
                                f"node's RAM; restart it with --cache-mb {-(-need // 2**20)} or more")
        return model

    async def Compute(self, request_iterator: AsyncIterator[pb.ComputeRequest],
                      context) -> AsyncIterator[pb.ComputeReply]:
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            if request is UNDECODABLE:
                await refuse_undecodable(context)
            try:
                output = await loop.run_in_executor(self._compute, self._compute_one, request)
                yield pb.ComputeReply(request_id=request.request_id, output=output)
            except (EdgemoeError, WireError) as exc:
                yield pb.ComputeReply(request_id=request.request_id, error=str(exc))

    def _model(self, fingerprint: str) -> _ComputeModel:
        """The model ready to compute (on the compute thread). A model built anew gets the node's RAM
        budget less what the others hold; least recently used ones are closed to make room."""
        with self._models_lock:
            model = self._models.get(fingerprint)
            if model is not None:
                self._models.move_to_end(fingerprint)
                return model
            held = self.holdings.get(fingerprint)
            if held is None:
                raise WireError(f"this node holds no experts of model {fingerprint[:12]!r}")
            need = min_ram(held.manifest)
            evicted = []
            while self._models and self.identity.cache_bytes - sum(m.ram_bytes for m in self._models.values()) < need:
                evicted.append(self._models.popitem(last=False)[1])
        for old in evicted:
            old.local.close()
        with self._models_lock:
            free = self.identity.cache_bytes - sum(m.ram_bytes for m in self._models.values())
        model = _ComputeModel(held, free)
        with self._models_lock:
            self._models[fingerprint] = model
        return model

    def _compute_one(self, request: pb.ComputeRequest) -> pb.Tensor:
        """Validates everything before any compute: ids, shapes, dtypes, sizes."""
        model = self._model(request.fingerprint)
        layer = request.layer
        if layer not in model.kernels:
            raise WireError(f"layer {layer} has no routed experts")
        hidden = array_from_tensor(request.hidden, max_rows=MAX_ROWS)
        if hidden.ndim != 2 or hidden.shape[1] != input_dims(model.kernels[layer]):
            raise WireError(f"hidden states of shape {list(hidden.shape)}; layer {layer} takes [tokens, "
                            f"{input_dims(model.kernels[layer])}]")
        rows = np.asarray(request.rows, dtype=np.int64)
        experts = np.asarray(request.experts, dtype=np.int64)
        if len(rows) != len(experts) or not len(rows) or len(rows) > MAX_ROWS:
            raise WireError(f"{len(rows)} rows and {len(experts)} experts: need the same number, 1 to {MAX_ROWS}")
        if rows.min() < 0 or rows.max() >= hidden.shape[0]:
            raise WireError(f"row ids must be below {hidden.shape[0]}")
        missing = {e for e in experts.tolist() if (layer, e) not in model.holdings.held}
        if missing:
            raise WireError(f"layer {layer} experts {sorted(missing)[:8]} are not held here")
        try:
            out = model.compute(layer, hidden, rows, experts, request.sort)
        except ChecksumError:
            self._drop_model(request.fingerprint)
            bad = model.holdings.drop_corrupted(layer, set(experts.tolist()))
            if not bad:
                raise
            log.warning("layer %d experts %s fail their checksums on this node's disk: no longer held", layer, bad)
            raise ChecksumError(f"layer {layer} experts {bad} failed their checksums on this node's disk and are no "
                                "longer held here; the coordinator pushes them again") from None
        return tensor_from_array(out)

    def _drop_model(self, fingerprint: str) -> None:
        """Forgets a model's compute state (on the compute thread): rebuilt from disk on next use."""
        with self._models_lock:
            model = self._models.pop(fingerprint, None)
        if model is not None:
            model.local.close()

    def close(self) -> None:
        for model in self._models.values():
            model.local.close()
        self._compute.shutdown(wait=True)


class Undecodable:
    """Stands for a request whose bytes are no message of the RPC: the servicer refuses it."""


UNDECODABLE = Undecodable()


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A deserializer that never raises: grpc.aio's own handling of a parse error answers
    UNKNOWN and, repeated, stopped the node answering at all (about 80 bad requests)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return UNDECODABLE

    return parse


async def refuse_undecodable(context: grpc.aio.ServicerContext) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a message of this RPC: check that "
                        "the client runs the same edgemoe version as this node")
    raise AssertionError("abort returned")


def add_to_server(service: NodeService, server: grpc.aio.Server) -> None:
    """Registers the service as the generated code would, but with deserializers that let the
    servicer refuse undecodable requests with INVALID_ARGUMENT (see `_lenient`)."""
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            service.Info, request_deserializer=_lenient(pb.InfoRequest),
            response_serializer=pb.NodeInfo.SerializeToString),
        "PushExperts": grpc.stream_unary_rpc_method_handler(
            service.PushExperts, request_deserializer=_lenient(pb.PushChunk),
            response_serializer=pb.PushReply.SerializeToString),
        "Compute": grpc.stream_stream_rpc_method_handler(
            service.Compute, request_deserializer=_lenient(pb.ComputeRequest),
            response_serializer=pb.ComputeReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("edgemoe.node.v1.EdgeNode", handlers),))
