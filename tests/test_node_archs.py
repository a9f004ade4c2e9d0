"""One `edge-node` computes experts of every architecture the tiny models come in, and of a
bfloat16 checkpoint (as mlx-community's are): the same tokens as mlx-lm, through the node."""

from __future__ import annotations

import pytest
from conftest import MAX_TOKENS, PROMPT, SUPPORTED_ARCHS, encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, wait_for_placement

from edgemoe.coordinator.generate import generate
from edgemoe.node.credentials import format_token, new_secret
from edgemoe.node.manifest import read_manifest

pytestmark = pytest.mark.slow

# bfloat16 weights with bfloat16 quantization scales: the hidden states, and the node's
# answers, cross the wire as bfloat16. (An unquantized bfloat16 MoE does not run on mlx's
# CPU: its gather_mm takes float32 only.)
CASES = [(arch, "float32") for arch in SUPPORTED_ARCHS] + [("qwen3_moe", "bfloat16"), ("deepseek_v3", "bfloat16")]


@pytest.fixture(scope="module")
def token() -> str:
    return format_token(new_secret())


@pytest.fixture(scope="module")
def node(token, tmp_path_factory):
    """One node for every case: it keeps each model's experts apart by fingerprint."""
    node = NodeProcess(token, tmp_path_factory.mktemp("arch-node"), cache_mb=64)
    yield node
    node.stop()


@pytest.mark.parametrize("arch, dtype", CASES)
def test_a_node_computes_each_architecture_with_mlx_lms_tokens(models, node, token, arch, dtype):
    src, packed = models.src(arch, True, dtype=dtype), models.packed(arch, True, dtype=dtype)
    prompt = encode(models, src, PROMPT)
    expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
    # The coordinator caches one expert: nearly every expert is the node's to compute.
    sm = coordinator(packed, token, [node.address], read_manifest(packed).expert_bytes)
    try:
        wait_for_placement(sm)
        peer = sm.cluster.peers[0]
        send, wire_dtypes = peer.compute, set()

        def send_and_note_dtype(request):
            wire_dtypes.add(request.hidden.dtype)
            return send(request)

        peer.compute = send_and_note_dtype
        result = generate(sm, prompt, max_tokens=MAX_TOKENS)
        assert result.token_ids == expected
        assert sm.cluster.stats.experts_from_peers > 0 and sm.cluster.stats.fallbacks == 0
        assert peer.healthy and peer.stats.failures == 0
        assert wire_dtypes == {dtype}
    finally:
        sm.close()
