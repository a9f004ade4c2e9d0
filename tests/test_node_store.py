"""What a node keeps on disk is checked: a pushed expert whose bytes do not match its checksum is
refused, and an expert that went bad on the node's disk after a restart is dropped, not served."""

from __future__ import annotations

import grpc
import pytest
from conftest import MAX_TOKENS, PROMPT, encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, wait_for_placement

from edgemoe.coordinator.generate import generate
from edgemoe.node.credentials import CHANNEL_OPTIONS, ClusterCredentials, channel_credentials, format_token, new_secret
from edgemoe.node.holdings import ModelHoldings, layer_specs_to_json
from edgemoe.node.manifest import read_manifest
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
            return stub.PushExperts(iter([pb.PushChunk(model=spec), chunk]), timeout=30)

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
