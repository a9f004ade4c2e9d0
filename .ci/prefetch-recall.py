"""How well each way of guessing the next MoE layer's experts would do, on mlx-lm's own forward
pass of an mlx-lm qwen3_moe model (no edgemoe code): for every decode step and layer pair,
the share of the next layer's K picks among the guesses (recall) and of the guesses among
its picks (precision). From the repository root:

    .venv/bin/python .ci/prefetch-recall.py SRC TOKENS"""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step

model, tokenizer = load(sys.argv[1])
layers = model.model.layers
step: dict[int, dict[str, mx.array]] = {}
original_moe = type(layers[0].mlp).__call__


def layer_call(self, x, mask=None, cache=None):
    i = next(j for j, layer in enumerate(layers) if layer is self)
    h = x + self.self_attn(self.input_layernorm(x), mask, cache)
    moe_input = self.post_attention_layernorm(h)
    out = h + self.mlp(moe_input)
    if x.shape[1] == 1:
        step.setdefault(i, {}).update(layer_input=x[0, -1], h=h[0, -1], moe_input=moe_input[0, -1], out=out[0, -1])
    return out


def moe_call(self, x):
    if x.shape[1] == 1:
        i = next(j for j, layer in enumerate(layers) if layer.mlp is self)
        gates = mx.softmax(self.gate(x), axis=-1, precise=True)
        step.setdefault(i, {})["picks"] = mx.argpartition(gates, kth=-self.top_k, axis=-1)[0, -1, -self.top_k :]
    return original_moe(self, x)


type(layers[0]).__call__ = layer_call
type(layers[0].mlp).__call__ = moe_call
prompt = mx.array(tokenizer.encode("Write a short story about a robot who learns to paint."))
steps = []
for _ in generate_step(prompt, model, max_tokens=int(sys.argv[2])):
    if len(step) == len(layers) and all("picks" in d for d in step.values()):
        mx.eval([v for d in step.values() for v in d.values()])
        steps.append({i: {k: np.array(v.astype(mx.float32)) for k, v in d.items()} for i, d in step.items()})
    step = {}

k = layers[0].mlp.top_k


def norm(i, v):
    return layers[i].post_attention_layernorm(mx.array(v)[None])


ways = {
    "this layer's MoE input (edgemoe's guess)": lambda s, i: mx.array(s[i]["moe_input"])[None],
    "the residual after attention, next layer's norm": lambda s, i: norm(i + 1, s[i]["h"]),
    "the residual after this layer's experts (later)": lambda s, i: norm(i + 1, s[i]["out"]),
    "this layer's input, next layer's norm (earlier)": lambda s, i: norm(i + 1, s[i]["layer_input"]),
}
for width in (1, k, 2 * k):
    for name, features in ways.items():
        right = pairs = 0
        for s in steps:
            for i in range(len(layers) - 1):
                logits = np.array(layers[i + 1].mlp.gate(features(s, i)).astype(mx.float32))[0]
                right += len(set(np.argsort(-logits)[:width].tolist()) & set(s[i + 1]["picks"].tolist()))
                pairs += 1
        print(f"top {width:3d} of {name:50s} recall {right / (pairs * k):.3f}, precision {right / (pairs * width):.3f}")
same = sum(len(set(a[i]["picks"].tolist()) & set(b[i]["picks"].tolist())) for a, b in zip(steps, steps[1:])
           for i in range(len(layers)))
print(f"the previous token's picks, same layer: {same / (k * len(layers) * max(len(steps) - 1, 1)):.3f}")
print(f"({len(steps)} decode steps)")
