"""What a node keeps on disk is checked: a pushed expert whose bytes do not match its checksum is
refused, and an expert that went bad on the node's disk after a restart is dropped, not served."""

from __future__ import annotations

import asyncio
import json
import mmap as mmap_module
import os

import grpc
import mlx.core as mx
import numpy as np
import pytest
from conftest import MAX_TOKENS, PROMPT, encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, wait_for_placement

from edgemoe.coordinator.generate import generate
from edgemoe.node import holdings as holdings_module
from edgemoe.node.credentials import CHANNEL_OPTIONS, ClusterCredentials, channel_credentials, format_token, new_secret
from edgemoe.node.holdings import ModelHoldings, NodeFullError, NodeHoldings, layer_specs_to_json
from edgemoe.node.limits import DIRECT_ALIGNMENT
from edgemoe.node.manifest import RECORD_ALIGNMENT, align, read_manifest
from edgemoe.node.service import NodeIdentity, NodeService
from edgemoe.node.store import ExpertStore
from edgemoe.protos import edgemoe_node_pb2 as pb
from edgemoe.protos import edgemoe_node_pb2_grpc as pb_grpc


@pytest.fixture
def token() -> str:
    return format_token(new_secret())


def _stub(token: str, address: str):
    channel = grpc.secure_channel(address, channel_credentials(ClusterCredentials.from_token(token, "test-client")),
                                  options=CHANNEL_OPTIONS)
    return pb_grpc.EdgeNodeStub(channel), channel


def _held(stub, fingerprint: str) -> set[tuple[int, int]]:
    for model in stub.Info(pb.InfoRequest(), timeout=10).models:
        if model.fingerprint == fingerprint:
            return set(zip(model.layers, model.experts))
    return set()


def test_a_pushed_expert_that_fails_its_checksum_is_refused(models, token, tmp_path):
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    layer = manifest.layers[0].layer
    with ExpertStore(packed, manifest) as store:
        good = store.read(layer, 0).tobytes()
    flipped = bytes([good[0] ^ 0xFF]) + good[1:]
    spec = pb.ModelSpec(fingerprint=manifest.fingerprint, config_json=(packed / "config.json").read_bytes(),
                        layers_json=layer_specs_to_json(manifest))
    node = NodeProcess(token, tmp_path / "node")
    stub, channel = _stub(token, node.address)
    try:
        def push(record: bytes) -> pb.PushReply:
            chunk = pb.PushChunk(layer=layer, expert=0, checksum=manifest.layer(layer).experts[0].checksum,
                                 record_bytes=len(record), offset=0, data=record)
            # An accepted push warms the node's kernels before it replies: on a fresh CUDA
            # machine their first compile took over 30 s (H200).
            return stub.PushExperts(iter([pb.PushChunk(model=spec), chunk]), timeout=180)

        refused = push(flipped)
        assert refused.experts_stored == 0 and len(refused.errors) == 1 and "checksum" in refused.errors[0]
        assert _held(stub, manifest.fingerprint) == set()
        accepted = push(good)
        assert accepted.experts_stored == 1 and not accepted.errors
        assert _held(stub, manifest.fingerprint) == {(layer, 0)}
    finally:
        channel.close()
        node.stop()


def test_a_node_restarted_on_corrupted_experts_drops_them_and_the_tokens_stay_mlx_lms(models, token, tmp_path):
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    data_dir = tmp_path / "node"
    node = NodeProcess(token, data_dir)
    sm = coordinator(packed, token, [node.address], manifest.expert_bytes)
    try:
        wait_for_placement(sm)
    finally:
        sm.close()
        node.stop()

    # The disk goes bad under every expert the node holds, while it is down.
    on_disk = ModelHoldings(data_dir / "models" / manifest.fingerprint, manifest.fingerprint)
    assert on_disk.held
    for layer, expert in on_disk.held:
        segment = on_disk.manifest.layer(layer).experts[expert].segments[0]
        with open(on_disk.root / on_disk.manifest.files[segment.file], "r+b") as f:
            f.seek(segment.offset)
            flipped = bytes(b ^ 0x5A for b in f.read(64))
            f.seek(segment.offset)
            f.write(flipped)

    node = NodeProcess(token, data_dir)
    sm = coordinator(packed, token, [node.address], manifest.expert_bytes)
    try:
        peer = sm.cluster.peers[0]
        assert peer.held == on_disk.held
        send, asked = peer.compute, set()

        def send_and_note(request):
            asked.update((request.layer, e) for e in request.experts)
            return send(request)

        peer.compute = send_and_note
        assert generate(sm, prompt, max_tokens=MAX_TOKENS).token_ids == expected
        assert asked, "the node was never asked for an expert"
        assert sm.cluster.stats.fallbacks >= 1
    finally:
        sm.close()
    stub, channel = _stub(token, node.address)
    try:
        held = _held(stub, manifest.fingerprint)
    finally:
        channel.close()
        node.stop()
    # Every expert the node was asked for is no longer held, or held again with good bytes
    # (pushed anew): never held with the bad bytes.
    with ExpertStore(packed, manifest) as store:
        good = {key: store.read(*key).tobytes() for key in asked}
    for layer, expert in asked & held:
        segment = on_disk.manifest.layer(layer).experts[expert].segments[0]
        with open(on_disk.root / on_disk.manifest.files[segment.file], "rb") as f:
            f.seek(segment.offset)
            held = f.read(len(good[layer, expert]))
            assert held == good[layer, expert], f"layer {layer} expert {expert} held corrupted"
    assert "fail their checksums on this node's disk" in node.proc.stderr.read()


def _register(holdings: NodeHoldings, packed) -> ModelHoldings:
    manifest = read_manifest(packed)
    return holdings.register(manifest.fingerprint, (packed / "config.json").read_bytes(),
                             layer_specs_to_json(manifest))


def _store_first(model: ModelHoldings, packed) -> tuple[int, int]:
    manifest = read_manifest(packed)
    layer = manifest.layers[0].layer
    with ExpertStore(packed, manifest) as store:
        model.store_expert(layer, 0, store.read(layer, 0).tobytes())
    return layer, 0


def test_a_damaged_data_dir_is_quarantined_and_the_node_starts(models, token, tmp_path):
    """A zero-length held index, a UTF-16 config.json, a model poisoned before nodes checked
    fingerprints and a cut-short registration: each used to stop the node from starting (or
    was served); now each is moved aside with one log line and the node starts."""
    packed, other, third = (models.packed("qwen3_moe", True), models.packed("qwen3_moe", False),
                            models.packed("qwen3_moe", True, seed=1))
    data_dir = tmp_path / "node"
    holdings = NodeHoldings(data_dir)
    kept = _register(holdings, packed)
    _store_first(kept, packed)
    utf16 = _register(holdings, other)
    poisoned = _register(holdings, third)
    (kept.root / "held.msgpack").write_bytes(b"")
    (utf16.root / "config.json").write_bytes((utf16.root / "config.json").read_text().encode("utf-16"))
    layers = json.loads((poisoned.root / "layers.json").read_bytes())
    experts = layers["layers"][0]["experts"]
    experts[0], experts[1] = experts[1], experts[0]
    (poisoned.root / "layers.json").write_text(json.dumps(layers))
    partial = data_dir / "models" / f".{'0' * 64}.partial"
    partial.mkdir()
    (partial / "layers.json").write_text("{}")

    node = NodeProcess(token, data_dir)
    stub, channel = _stub(token, node.address)
    try:
        info = stub.Info(pb.InfoRequest(), timeout=10)
    finally:
        channel.close()
        node.stop()
    assert [(m.fingerprint, list(m.experts)) for m in info.models] == [(kept.fingerprint, [])]
    log = node.proc.stderr.read()
    assert log.count("moved aside") == 3, log
    names = sorted(p.name for p in (data_dir / "models").iterdir())
    assert names[-1] == kept.fingerprint and len(names) == 3 and not partial.exists(), names
    assert any(p.name.startswith(".quarantine-held.msgpack") for p in kept.root.iterdir())


def test_the_nodes_ram_budget_covers_every_model_together(models, tmp_path):
    """Each model used to get the whole --cache-mb (plus 32 in-flight slots) for itself."""
    budget = 2**20
    holdings = NodeHoldings(tmp_path / "node")
    fingerprints = [_register(holdings, models.packed("qwen3_moe", q)).fingerprint for q in (False, True)]
    service = NodeService(NodeIdentity("n", "n", budget), holdings)
    try:
        for fingerprint in fingerprints + fingerprints[:1]:
            service._model(fingerprint)
            pools = [sum(a.nbytes for g in m.local._groups for a in g.pool.arrays.values())
                     for m in service._models.values()]
            assert sum(pools) <= budget, pools
    finally:
        service.close()


def test_info_reads_the_holdings_under_the_lock(models, tmp_path):
    """Info used to iterate the held set while a push's thread added to it."""
    holdings = NodeHoldings(tmp_path / "node")
    model = _register(holdings, models.packed("qwen3_moe", True))

    class LockedSet(set):
        def __iter__(self):
            assert model._lock.locked(), "held experts read without the lock"
            return super().__iter__()

    model.held = LockedSet(model.held)
    service = NodeService(NodeIdentity("n", "n", 2**20), holdings)
    try:
        info = asyncio.run(service.Info(pb.InfoRequest(), None))
    finally:
        service.close()
    assert [m.fingerprint for m in info.models] == [model.fingerprint] and info.disk_free_bytes > 0


def test_the_held_index_is_written_durably(models, tmp_path, monkeypatch):
    """Power loss must leave the old or the new index: the file is synced before the rename,
    the directory after it (the old node did neither)."""
    packed = models.packed("qwen3_moe", True)
    model = _register(NodeHoldings(tmp_path / "node"), packed)
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), replace(a, b))[1])
    _store_first(model, packed)
    index = str(model.root / "held.msgpack")
    tail = [e for e in events if e[1] != str(model.root / model.manifest.files[0])]
    assert tail == [("fsync", str(model.root / ".held.msgpack.tmp")), ("replace", index), ("fsync", str(model.root))]


def test_the_disk_quota_counts_sparse_files_at_full_size_and_free_space_is_kept(models, tmp_path, monkeypatch):
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    logical = sum(align(s.record_bytes, RECORD_ALIGNMENT) * s.num_experts for s in manifest.layers)
    with pytest.raises(NodeFullError, match="--disk-mb"):
        _register(NodeHoldings(tmp_path / "small", disk_bytes=logical - 1), packed)
    assert not list((tmp_path / "small" / "models").iterdir())
    holdings = NodeHoldings(tmp_path / "node", disk_bytes=logical)
    model = _register(holdings, packed)
    assert holdings.free_disk_bytes() == 0  # the quota is used up by the (sparse) files
    monkeypatch.setattr(holdings_module, "free_bytes", lambda path: 1)
    with pytest.raises(NodeFullError, match="disk is full"):
        _store_first(model, packed)
    assert model.snapshot() == []


def test_a_models_kernels_are_run_once_when_it_is_built(models, tmp_path, monkeypatch):
    """The first use of a kernel compiles it (seconds on CUDA): it happens when the node
    builds the model (right after a push), not in a coordinator's first call."""
    from edgemoe.node.compute import ExpertKernel
    from edgemoe.node.service import activation_dtype

    calls = []
    original = ExpertKernel.__call__
    monkeypatch.setattr(ExpertKernel, "__call__",
                        lambda self, x, slots, sort=False: calls.append(x.dtype) or original(self, x, slots, sort))
    holdings = NodeHoldings(tmp_path / "node")
    model = _register(holdings, models.packed("qwen3_moe", True))
    service = NodeService(NodeIdentity("n", "n", 2**20), holdings)
    try:
        service._model(model.fingerprint)
        assert calls == [mx.float32] * 2 * len(model.manifest.layers)  # a decode row and a sorted batch
    finally:
        service.close()
    assert activation_dtype({"torch_dtype": "bfloat16"}) == mx.bfloat16
    assert activation_dtype({"dtype": "float16"}) == mx.float16
    assert activation_dtype({}) == mx.float32 and activation_dtype({"torch_dtype": "nonsense"}) == mx.float32


def test_direct_reads_land_in_place_in_page_aligned_slots(large, monkeypatch):
    """Slot arrays start on a page, so an O_DIRECT read of an aligned tensor goes straight
    into its slot: no bounce buffer, and the slot holds the expert's bytes."""
    from edgemoe.node import store as store_module
    from edgemoe.node.dtypes import address_of
    from edgemoe.node.local import LocalExperts
    from edgemoe.node.store import ExpertStore

    _, packed = large
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    bounces, real_mmap = [], mmap_module.mmap
    # (the store's probe of O_DIRECT support maps one block; a bounce buffer holds a read chunk)
    def mapping(fd, size):
        if size >= store_module.READ_CHUNK_BYTES:
            bounces.append(size)
        return real_mmap(fd, size)

    monkeypatch.setattr(store_module.mmap, "mmap", mapping)
    local = LocalExperts(ExpertStore(packed, manifest, io_mode="direct"), manifest.total_expert_bytes)
    try:
        assert local.store.direct
        views = local._group_of[spec.layer].pool.byte_views()
        assert all(address_of(v) % DIRECT_ALIGNMENT == 0 for v in views.values())
        slots = local.slots(spec.layer, [0, 1, 2])
        assert bounces == []
        reference = ExpertStore(packed, manifest, io_mode="buffered")
        record = reference.read(spec.layer, 2)
        reference.close()
        in_slot = [bytes(v) for v in local._group_of[spec.layer].pool.views(int(slots[2]))]
        assert in_slot == [record[t.offset : t.offset + t.nbytes].tobytes() for t in spec.tensors]
    finally:
        local.close()


def test_aligned_pool_arrays_past_2_gib():
    """A pool tensor's array can pass 2 GiB (one layout's share of a large cache): no MLX
    dimension may reach 2**31, as a flat byte buffer of that size would."""
    from edgemoe.node.dtypes import address_of, aligned_zeros

    arr = aligned_zeros((2, 2**28 + 512), mx.float32, DIRECT_ALIGNMENT)
    view = memoryview(arr).cast("B")
    assert arr.nbytes > 2**31 and address_of(view) % DIRECT_ALIGNMENT == 0
    view[-4:] = np.array([3.0], dtype=np.float32).tobytes()
    assert arr[1, -1].item() == 3.0 and arr.sum().item() == 3.0
    del view, arr


@pytest.mark.parametrize("errno_name", ["EFAULT", "EIO"])
def test_a_direct_read_the_kernel_refuses(large, monkeypatch, errno_name):
    """EFAULT (memory the kernel cannot read into directly) takes the bounce buffer and still
    reads the expert; any other error is one line, and the expert is not cached."""
    import errno

    from edgemoe.node import store as store_module
    from edgemoe.node.errors import ExpertFileError
    from edgemoe.node.local import LocalExperts
    from edgemoe.node.store import ExpertStore

    _, packed = large
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    from edgemoe.node.dtypes import address_of

    real = store_module.os.preadv
    local = LocalExperts(ExpertStore(packed, manifest, io_mode="direct"), manifest.total_expert_bytes)
    pools = [(address_of(v), address_of(v) + len(v)) for v in local._group_of[spec.layer].pool.byte_views().values()]

    def refusing(fd, buffers, offset, *flags):
        if any(lo <= address_of(b) < hi for b in buffers for lo, hi in pools):  # straight into a slot
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
        return real(fd, buffers, offset, *flags)

    try:
        monkeypatch.setattr(store_module.os, "preadv", refusing)
        if errno_name == "EIO":
            with pytest.raises(ExpertFileError, match="failed") as caught:
                local.slots(spec.layer, [3])
            assert "\n" not in str(caught.value) and (spec.layer, 3) not in local
            return
        slot = int(local.slots(spec.layer, [3])[0])
        monkeypatch.setattr(store_module.os, "preadv", real)
        reference = ExpertStore(packed, manifest, io_mode="buffered")
        record = reference.read(spec.layer, 3)
        reference.close()
        in_slot = [bytes(v) for v in local._group_of[spec.layer].pool.views(slot)]
        assert in_slot == [record[t.offset : t.offset + t.nbytes].tobytes() for t in spec.tensors]
    finally:
        monkeypatch.setattr(store_module.os, "preadv", real)
        local.close()


def _reads_with_two_on_the_disk(models, monkeypatch, answer: str, reread_error: bool = False):
    """A store of the small qwen3_moe pack whose RWF_NOWAIT tries of experts 1 and 2 (of
    layer 0) give `answer`; records each preadv (expert, tried) and each WILLNEED (expert)
    in one list. `reread_error`: their blocking reads fail with EIO."""
    import errno

    from edgemoe.node import store as store_module

    if not store_module._RWF_NOWAIT or not hasattr(os, "posix_fadvise"):
        pytest.skip("this OS has no RWF_NOWAIT or no posix_fadvise: small records are always read inline")
    packed = models.packed("qwen3_moe", True)
    manifest = read_manifest(packed)
    spec = manifest.layers[0]
    expert_at = {spec.experts[e].segments[0].offset: e for e in range(4)}
    real_preadv, real_fadvise, calls = os.preadv, os.posix_fadvise, []

    def preadv(fd, buffers, offset, flags=0):
        tried = bool(flags & store_module._RWF_NOWAIT)
        calls.append(("read", expert_at.get(offset), tried))
        if expert_at.get(offset) in (1, 2):
            if tried and answer == "on disk":
                raise BlockingIOError(errno.EAGAIN, "would block")
            if tried and answer == "partly cached":
                got = real_preadv(fd, buffers, offset) - 1
                buffers[-1][-1:] = b"\0"  # the byte it did not read
                return got
            if tried and answer == "no preadv2":
                raise NotImplementedError("preadv2 is not available")
            if tried:
                raise OSError(errno.EOPNOTSUPP, "not supported")
            if reread_error:
                raise OSError(errno.EIO, "input/output error")
        return real_preadv(fd, buffers, offset, flags) if flags else real_preadv(fd, buffers, offset)

    def fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append(("hint", expert_at.get(offset)))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(store_module.os, "preadv", preadv)
    monkeypatch.setattr(store_module.os, "posix_fadvise", fadvise)
    return spec, ExpertStore(packed, manifest, io_mode="buffered"), calls


@pytest.mark.parametrize("way", ["waited", "guess", "no hint"])
@pytest.mark.parametrize("answer", ["on disk", "partly cached", "unsupported", "no preadv2"])
def test_small_reads_of_records_on_the_disk(models, monkeypatch, answer, way):
    """A small batch is read inline with RWF_NOWAIT. Records the page cache does not hold
    (wholly or in part) are, after every record's try, asked of the kernel all at once
    (WILLNEED, so that the disk reads them in parallel) and read on this thread when the
    caller waits for the batch at once (a layer's misses); else (a guess, which nobody waits
    for yet, or no readahead to ask for) on the I/O threads. A file system without RWF_NOWAIT
    gets every small record read inline. Records read here are checksummed before
    `start_reads` returns, the others when waited for."""
    if way == "no hint":  # as where a file is read around the page cache
        monkeypatch.setattr(ExpertStore, "can_advise", property(lambda self: False))
    spec, store, calls = _reads_with_two_on_the_disk(models, monkeypatch, answer)
    reference = ExpertStore(store.model_dir, store.manifest, io_mode="buffered")
    reference._nowait = False
    try:
        records = {e: np.zeros(spec.record_bytes, dtype=np.uint8) for e in range(4)}
        targets = {e: [r.data[t.offset : t.offset + t.nbytes] for t in spec.tensors] for e, r in records.items()}
        pending = store.start_reads(spec.layer, targets, waited=way != "guess")
        tried = answer in ("on disk", "partly cached")
        assert store._nowait == tried
        if tried and way != "waited":
            assert set(pending.chunks) == {1, 2} and store.stats.verified == 2
            assert ("hint", 1) not in calls
        else:
            assert pending.chunks == {} and store.stats.verified == 4
        if tried and way == "waited":  # every try, the hint for both, then their reads in order
            assert calls == [("read", 0, True), ("read", 1, True), ("read", 2, True), ("read", 3, True),
                             ("hint", 1), ("hint", 2), ("read", 1, False), ("read", 2, False)]
        pending.wait_all()
        assert store.stats.verified == 4
        for e, record in records.items():
            assert record.tobytes() == reference.read(spec.layer, e).tobytes()
    finally:
        store.close()
        reference.close()


def test_a_failed_read_of_a_record_on_the_disk_fails_the_batch_with_nothing_in_flight(models, monkeypatch):
    from edgemoe.node.errors import ExpertFileError

    spec, store, calls = _reads_with_two_on_the_disk(models, monkeypatch, "on disk", reread_error=True)
    try:
        buffers = {e: [np.zeros(t.nbytes, dtype=np.uint8).data for t in spec.tensors] for e in range(4)}
        with pytest.raises(ExpertFileError, match="expert 1 .*input/output error"):
            store.start_reads(spec.layer, buffers)
        assert ("read", 2, False) not in calls  # the batch stopped at the first failure, on this thread
    finally:
        store.close()


def _store_with_a_slow_expert(large, monkeypatch, expert: int):
    """A store of the large-experts pack whose reads of `expert` take 0.3 s; returns its
    first layer's spec, the store, and a list that gets an entry as each of those reads ends."""
    import time

    _, packed = large
    manifest = read_manifest(packed)
    store = ExpertStore(packed, manifest)
    landed: list = []
    read_chunk = store._read_chunk

    def read(layer, e, *job):
        if e == expert:
            time.sleep(0.3)
        read_chunk(layer, e, *job)
        if e == expert:
            landed.append(True)

    monkeypatch.setattr(store, "_read_chunk", read)
    return manifest.layers[0], store, landed


def test_an_interrupted_start_of_reads_returns_only_once_its_reads_are_in(large, monkeypatch):
    """A Ctrl-C (or a closing pool) between two chunks' submissions: the chunk already
    started writes into the caller's buffer, so start_reads raises only once it is in."""
    spec, store, landed = _store_with_a_slow_expert(large, monkeypatch, 0)
    submit, calls = store._pool.submit, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return submit(*args)

    monkeypatch.setattr(store._pool, "submit", interrupted)
    try:
        buffers = [np.zeros(t.nbytes, dtype=np.uint8) for t in spec.tensors]
        with pytest.raises(KeyboardInterrupt):
            store.start_reads(spec.layer, {0: [b.data for b in buffers]})
        assert landed == [True]
    finally:
        monkeypatch.undo()
        store.close()


def test_a_failed_checksum_is_reported_once_the_batchs_other_reads_are_in(large, monkeypatch):
    from edgemoe.node.errors import ChecksumError

    spec, store, landed = _store_with_a_slow_expert(large, monkeypatch, 3)
    verify = store.verify_first_read

    def checked(layer, expert, pieces):
        if expert == 0:
            raise ChecksumError("layer 0 expert 0 fails its checksum")
        verify(layer, expert, pieces)

    monkeypatch.setattr(store, "verify_first_read", checked)
    try:
        targets = {e: [np.zeros(t.nbytes, dtype=np.uint8).data for t in spec.tensors] for e in (0, 3)}
        pending = store.start_reads(spec.layer, targets)
        with pytest.raises(ChecksumError):
            pending.wait(0)
        assert len(landed) == len(pending.chunks[3])  # every chunk of expert 3 is in
    finally:
        store.close()
