"""Where the every-expert-cached (resident) decode loses to plain mlx-lm: tok/s of mlx-lm and
of edgemoe with parts of its per-token host work taken out, alternating in one process, and
the host time to build one token's graph. On the GPU machine, after
`source .gpu-b/on-device.sh` and with the package importable (as .ci/gpu-check arranges):

    [ORDER=a,b,c,d] python3 .ci/gpu-profile-resident.py PACKED SRC TOKENS ROUNDS

Variants (a diagnosis, not a mode: counting off loses the routing counts):
  edgemoe         as shipped
  slot table      each MoE layer computes on the whole pool through an expert -> slot table,
                  `kernel(x, table[indices])`, as before the layer's slots were a slice of it
  no settle       the per-token count of deferred routing choices skipped
  bare layer      each MoE layer is only mlx-lm's module on the layer's slice of the pool
                  (no dispatcher, no count)"""

import os
import statistics
import sys
import time

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache

from edgemoe.coordinator.bench.decode import cache_everything, ignore_eos, warm_up
from edgemoe.coordinator.generate import build_prompt, generate, stream
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.coordinator.streaming import StreamingExperts
from edgemoe.node.manifest import read_manifest

packed, src, tokens, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ref, tokenizer = mlx_lm.load(src)
sm = load_streaming_model(packed, cache_bytes=read_manifest(packed).total_expert_bytes)
cache_everything(sm)
warm_up(sm)
prompt = build_prompt(sm.tokenizer, "Write a short story about a robot who learns to paint.")
experts = [m for _, m in sm.model.named_modules() if isinstance(m, StreamingExperts)]
dispatchers = [m.dispatch for m in experts]


def bare(d):
    arrays = sm.local.resident_arrays(d.layer)
    template = d.kernel.template

    def call(x, indices):
        d._bind(arrays)
        return template(x, indices)
    return call


def slot_table(d):
    group = sm.local._group_of[d.layer]
    table = mx.array([group.slot_of[(d.layer, e)] for e in range(d.kernel.spec.num_experts)], dtype=mx.uint32)
    pool = sm.local.arrays(d.layer)

    def call(x, indices):
        d._bind(pool)
        sm.local.defer_hits(d.layer, indices)
        return d.kernel(x, table[indices])
    return call


def mlx_lm_run() -> tuple[float, list[int]]:
    with ignore_eos(tokenizer):
        out = list(stream(ref, tokenizer, prompt, tokens))
    return out[-1].generation_tps, [r.token for r in out]


def edgemoe_run(variant: str) -> tuple[float, list[int]]:
    settle = sm.local.settle
    if variant == "no settle":
        sm.local.settle = lambda everything=False: None
    if variant in ("bare layer", "slot table"):
        for m, d in zip(experts, dispatchers):
            m.dispatch = bare(d) if variant == "bare layer" else slot_table(d)
    try:
        with ignore_eos(sm.tokenizer):
            result = generate(sm, prompt, max_tokens=tokens)
    finally:
        sm.local.settle = settle
        for m, d in zip(experts, dispatchers):
            m.dispatch = d
        sm.local.drop_unsettled()
    return result.stats.tokens_per_s, result.token_ids


def build_us(model, n: int = 100) -> float:
    """Median host time to build one decode token's graph (no evaluation in it)."""
    for d in dispatchers:
        d._overlap = False  # as on a GPU: no evaluation starts while the graph is built
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt[:8]]), cache=cache))
    token = mx.array([[prompt[8]]])
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = model(token, cache=cache)
        times.append(time.perf_counter() - t)
        mx.eval(out)
    return statistics.median(times) * 1e6


# ORDER="edgemoe,mlx-lm,..." runs the variants in another order within each round.
order = [name.strip() for name in os.environ.get("ORDER", "mlx-lm,edgemoe,slot table,no settle,bare layer").split(",")]
assert sorted(order) == ["bare layer", "edgemoe", "mlx-lm", "no settle", "slot table"], \
    f"ORDER names each variant once: {order}"
runs: dict[str, list[float]] = {name: [] for name in order}
token_sets = set()
mlx_lm_run()
for _ in range(rounds):
    for name, done in runs.items():
        tps, ids = mlx_lm_run() if name == "mlx-lm" else edgemoe_run(name)
        done.append(tps)
        token_sets.add(tuple(ids))
        print(f"  {name:12s} {tps:8.1f} tok/s", flush=True)
base = statistics.median(runs["mlx-lm"])
for name, done in runs.items():
    print(f"{name:12s} median {statistics.median(done):8.1f} tok/s  ({statistics.median(done) / base:.2f} of mlx-lm)")
print("same tokens:", len(token_sets) == 1)
for _ in range(2):
    print(f"graph build per token: mlx-lm {build_us(ref):.0f} us, edgemoe {build_us(sm.model):.0f} us")
sm.local.settle(everything=True)
sm.close()
