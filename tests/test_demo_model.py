"""The built-in demo model: trained, shipped, readable, unevenly routed, and the same when packed."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import run_cli

from edgemoe.coordinator.demo import DEMO_PROMPT as PROMPT
from edgemoe.coordinator.demo_model import WEIGHT_FILES, WEIGHTS_DIR, write_demo_model
from edgemoe.coordinator.generate import generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.coordinator.pack import pack
from edgemoe.node.manifest import read_manifest

MAX_TOKENS = 30
MARKERS = ("def", "self", "return", "(", ":")
# a function the model never saw as such: the model should find it far more
# likely than chance (ln(vocab) ~ 6.9 nats per token)
HELD_OUT = '''\
class Counter:
    """Count things."""

    def __init__(self, name, start=0):
        self.name = name
        self.count = start

    def add(self, n=1):
        if n < 0:
            raise ValueError("n must be positive")
        self.count += n
        return self.count

    def __repr__(self):
        return f"{self.__class__.__name__}({self.name!r}, {self.count})"
'''


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("demo") / "src"
    write_demo_model(dst)
    return dst


@pytest.fixture(scope="module")
def loaded(demo):
    import mlx_lm

    return mlx_lm.load(str(demo))


def greedy(model, tokenizer, prompt_ids, max_tokens=MAX_TOKENS) -> tuple[list[int], str]:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokens, text = [], []
    for r in stream_generate(model, tokenizer, mx.array(prompt_ids), max_tokens=max_tokens,
                             sampler=make_sampler(temp=0.0)):
        tokens.append(r.token)
        text.append(r.text)
    return tokens, "".join(text)


def reads_like_python(text: str) -> bool:
    return sum(m in text for m in MARKERS) >= 3 and ("self" in text or "return" in text)


def test_cli_writes_the_shipped_model(tmp_path):
    dst = tmp_path / "src"
    r = run_cli("demo-model", dst)
    assert r.returncode == 0, r.stderr
    for name in WEIGHT_FILES:
        assert (dst / name).read_bytes() == (WEIGHTS_DIR / name).read_bytes(), name
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["quantization"]["bits"] == 4
    # a few MB, as shipped in the repo
    assert sum((WEIGHTS_DIR / n).stat().st_size for n in WEIGHT_FILES) < 8 * 2**20


def test_greedy_text_reads_like_python(loaded):
    model, tokenizer = loaded
    _, text = greedy(model, tokenizer, tokenizer.encode(PROMPT))
    assert reads_like_python(text), text


def test_chat_prompt_reads_like_python(loaded):
    """`edgemoe chat` and the server feed prompts through the chat template."""
    model, tokenizer = loaded
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "def main("}], add_generation_prompt=True)
    _, text = greedy(model, tokenizer, ids, max_tokens=40)
    # weaker than a raw prompt (a fifth of the training rows are chat turns), but still code
    assert "self" in text or "return" in text, text


def mean_nll(model, tokenizer, text: str) -> float:
    ids = mx.array([tokenizer.encode(text)])
    logits = model(ids[:, :-1])
    return nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean").item()


def test_held_out_python_is_likely(loaded):
    model, tokenizer = loaded
    assert mean_nll(model, tokenizer, HELD_OUT) < 3.5


def test_an_untrained_model_fails_the_same_bars(demo, loaded):
    """The bars above are ones that only training clears."""
    from mlx_lm.utils import _get_classes

    _, tokenizer = loaded
    config = json.loads((demo / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    mx.random.seed(0)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    _, text = greedy(model, tokenizer, tokenizer.encode(PROMPT))
    assert not reads_like_python(text), text
    assert mean_nll(model, tokenizer, HELD_OUT) > 6.0


class _RecordingGate(nn.Module):
    def __init__(self, gate: nn.Module, top_k: int, picks: list):
        super().__init__()
        self.inner = gate
        self.top_k = top_k
        self.picks = picks

    def __call__(self, x):
        logits = self.inner(x)
        self.picks.append(np.array(mx.argpartition(logits, kth=-self.top_k, axis=-1)[..., -self.top_k:]).ravel())
        return logits


def routing_histograms(model, tokenizer, text: str) -> list[np.ndarray]:
    layers = model.model.layers
    picks: list[list] = [[] for _ in layers]
    originals = []
    for layer, p in zip(layers, picks):
        originals.append(layer.mlp.gate)
        layer.mlp.gate = _RecordingGate(layer.mlp.gate, layer.mlp.top_k, p)
    try:
        mx.eval(model(mx.array([tokenizer.encode(text)])))
    finally:
        for layer, gate in zip(layers, originals):
            layer.mlp.gate = gate
    n = layers[0].mlp.num_experts
    return [np.bincount(np.concatenate(p), minlength=n) for p in picks]


def test_routing_is_skewed(loaded):
    model, tokenizer = loaded
    hists = routing_histograms(model, tokenizer, HELD_OUT)
    skews, entropies = [], []
    for h in hists:
        share = h / h.sum()
        skews.append(share.max() * len(h))  # top expert's share over the uniform share
        nz = share[share > 0]
        entropies.append(float(-(nz * np.log(nz)).sum() / math.log(len(h))))
    assert sum(s > SKEW_BOUND for s in skews) >= len(hists) - 1, skews
    assert np.mean(entropies) < ENTROPY_BOUND, entropies


SKEW_BOUND = 2.0
ENTROPY_BOUND = 0.9


@pytest.mark.parametrize("cache", ["all", "one-expert"])
def test_packed_model_says_the_same(demo, loaded, tmp_path, cache):
    model, tokenizer = loaded
    prompt_ids = tokenizer.encode(PROMPT)
    want, _ = greedy(model, tokenizer, prompt_ids)
    packed = tmp_path / "packed"
    pack(demo, packed)
    m = read_manifest(packed)
    sm = load_streaming_model(packed, cache_bytes=m.total_expert_bytes if cache == "all" else m.expert_bytes)
    try:
        got = generate(sm, prompt_ids, max_tokens=MAX_TOKENS).token_ids
    finally:
        sm.close()
    assert got == want
