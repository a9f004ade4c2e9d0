"""The node's gRPC service: what it holds, receiving experts, computing them."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import mlx.core as mx
import numpy as np

from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc

from .architecture import build_model, routed_expert_modules
from .compute import ExpertKernel, compute_pairs, input_dims
from .errors import ChecksumError, EdgemoeError
from .holdings import ModelHoldings, NodeHoldings, PushError
from .limits import MAX_INFLIGHT_EXPERTS
from .local import LocalExperts
from .store import ExpertStore
from .version import EDGEMOE_VERSION, PROTOCOL_VERSION
from .wire import MAX_ROWS, WireError, array_from_tensor, tensor_from_array

log = logging.getLogger(__name__)


@dataclass
class NodeIdentity:
    node_id: str
    name: str
    cache_bytes: int


class _ComputeModel:
    """One held model, ready to compute: its experts' cache and a kernel per MoE layer."""

    def __init__(self, holdings: ModelHoldings, cache_bytes: int):
        self.holdings = holdings
        manifest = holdings.manifest
        store = ExpertStore(holdings.root, manifest, io_mode="buffered")
        self.local = LocalExperts(store, min(cache_bytes, manifest.total_expert_bytes),
                                  scratch_slots=MAX_INFLIGHT_EXPERTS)
        modules = dict(routed_expert_modules(build_model(holdings.config)))
        self.kernels = {
            spec.layer: ExpertKernel(modules[spec.module_path], spec, self.local.arrays(spec.layer))
            for spec in manifest.layers
        }

    def compute(self, layer: int, hidden: mx.array, rows: np.ndarray, experts: np.ndarray) -> mx.array:
        kernel = self.kernels[layer]
        return compute_pairs(kernel, lambda group: self.local.slots(layer, group), hidden, rows, experts,
                             MAX_INFLIGHT_EXPERTS)


class NodeService(pb_grpc.EdgeNodeServicer):
    def __init__(self, identity: NodeIdentity, holdings: NodeHoldings):
        self.identity = identity
        self.holdings = holdings
        self._models: dict[str, _ComputeModel] = {}
        self._models_lock = threading.Lock()
        # MLX work runs on one thread: the arrays and kernels are not shared across threads.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-compute")

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        models = []
        for fingerprint, held in self.holdings.models.items():
            pairs = sorted(held.held)
            models.append(pb.ModelHoldings(fingerprint=fingerprint, layers=[layer for layer, _ in pairs],
                                           experts=[e for _, e in pairs]))
        used = sum(m.local.cache_bytes_used for m in self._models.values())
        return pb.NodeInfo(node_id=self.identity.node_id, name=self.identity.name, version=EDGEMOE_VERSION,
                           protocol_version=PROTOCOL_VERSION, models=models,
                           cache_budget_bytes=self.identity.cache_bytes, cache_used_bytes=used)

    async def PushExperts(self, request_iterator: AsyncIterator[pb.PushChunk], context) -> pb.PushReply:
        stored, errors = 0, []
        model: ModelHoldings | None = None
        record, current = bytearray(), None
        async for chunk in request_iterator:
            try:
                if chunk.HasField("model"):
                    spec = chunk.model
                    model = await asyncio.to_thread(self.holdings.register, spec.fingerprint, spec.config_json,
                                                    spec.layers_json)
                    continue
                if model is None:
                    raise PushError("a push must start with the model spec")
                key = (chunk.layer, chunk.expert)
                if key != current:
                    record, current = bytearray(), key
                if chunk.offset != len(record) or len(record) + len(chunk.data) > chunk.record_bytes:
                    raise PushError(f"layer {chunk.layer} expert {chunk.expert}: chunks out of order")
                record += chunk.data
                if len(record) == chunk.record_bytes:
                    await asyncio.to_thread(model.store_expert, chunk.layer, chunk.expert, bytes(record))
                    stored += 1
                    record, current = bytearray(), None
            except EdgemoeError as exc:
                errors.append(str(exc))
                record, current = bytearray(), None
        if model is not None:
            with self._models_lock:
                # Rebuilt on the next compute so its store sees what was just written.
                stale = self._models.pop(model.fingerprint, None)
            if stale is not None:
                self._compute.submit(stale.local.close)
        return pb.PushReply(experts_stored=stored, errors=errors)

    async def Compute(self, request_iterator: AsyncIterator[pb.ComputeRequest],
                      context) -> AsyncIterator[pb.ComputeReply]:
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            try:
                output = await loop.run_in_executor(self._compute, self._compute_one, request)
                yield pb.ComputeReply(request_id=request.request_id, output=output)
            except (EdgemoeError, WireError) as exc:
                yield pb.ComputeReply(request_id=request.request_id, error=str(exc))

    def _model(self, fingerprint: str) -> _ComputeModel:
        with self._models_lock:
            model = self._models.get(fingerprint)
            if model is None:
                held = self.holdings.models.get(fingerprint)
                if held is None:
                    raise WireError(f"this node holds no experts of model {fingerprint[:12]}")
                model = self._models[fingerprint] = _ComputeModel(held, self.identity.cache_bytes)
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
            out = model.compute(layer, hidden, rows, experts)
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
