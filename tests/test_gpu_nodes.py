"""A node computes on its machine's default device (on the GPU machine, from CUDA memory),
and a coordinator uses only nodes on its own backend: those give its own bits.

On the GPU machine (`.ci/gpu-check`) the node runs on CUDA. A coordinator on CUDA uses it
and gives mlx-lm's CUDA tokens; a coordinator on the CPU, in the same process, sets it
aside and gives mlx-lm's CPU tokens. On a CPU-only machine both coordinators share the
node's backend and use it."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import mlx.core as mx
import pytest
from conftest import computing_on, encode, mlx_lm_tokens
from nodes import NodeProcess, coordinator, wait_for_placement

from edgemoe.coordinator.generate import generate
from edgemoe.node.credentials import format_token, new_secret
from edgemoe.node.limits import compute_backend
from edgemoe.node.manifest import read_manifest

PROMPT = "The quick brown fox jumps over the lazy dog."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[tuple[NodeProcess, str]]:
    token = format_token(new_secret())
    started = NodeProcess(token, tmp_path_factory.mktemp("gpu-node") / "node0")
    yield started, token
    started.stop(signal.SIGKILL)


@pytest.mark.parametrize("device", ["default", "cpu"])
def test_a_coordinator_uses_a_node_only_on_its_own_backend(models, node, device):
    process, token = node
    node_backend = compute_backend()  # the node runs on this machine's default device
    src, packed = models.src("qwen3_moe", True), models.packed("qwen3_moe", True)
    prompt = encode(models, src, PROMPT)
    with computing_on(mx.default_device() if device == "default" else mx.cpu):
        expected, _ = mlx_lm_tokens(src, prompt, max_tokens=MAX_TOKENS, models=models)
        sm = coordinator(packed, token, [process.address], 2 * read_manifest(packed).expert_bytes)
        try:
            peer = sm.cluster.peers[0]
            if compute_backend() == node_backend:
                wait_for_placement(sm)
                result = generate(sm, prompt, max_tokens=MAX_TOKENS)
                assert result.token_ids == expected
                assert sm.cluster.stats.experts_from_peers > 0 and sm.cluster.stats.fallbacks == 0
                assert peer.info is not None and peer.info.backend == node_backend
            else:
                result = generate(sm, prompt, max_tokens=MAX_TOKENS)
                assert result.token_ids == expected
                assert sm.cluster.stats.peer_calls == 0
                assert f"computes on {node_backend}, this coordinator on cpu" in peer.last_error
        finally:
            sm.close()
