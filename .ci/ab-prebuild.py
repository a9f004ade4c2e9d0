"""A/B of building a decode layer's call before its routing is read back (`LayerDispatch.prebuild`,
the CPU backend's default) against after, as before: 1/8 of the experts cached, page cache
warm, alternating runs in one process, same tokens both ways. From the repository root:

    .venv/bin/python .ci/ab-prebuild.py PACKED TOKENS ROUNDS"""

import statistics
import sys

from edgemoe.coordinator.bench.decode import WARMUP_PROMPT, fresh_cache, ignore_eos, timed_generate, warm_up
from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
manifest = read_manifest(path)
budget = max(manifest.expert_bytes, manifest.total_expert_bytes // 8)
sm = load_streaming_model(path, cache_bytes=budget, io_mode="buffered")
warm_page_cache(expert_paths(path, manifest))
warm_up(sm)
prompt = build_prompt(sm.tokenizer, "Write a short story about a robot who learns to paint.")
other = build_prompt(sm.tokenizer, WARMUP_PROMPT)
shipped = {d: d.prebuild for d in sm.dispatchers}
runs: dict[str, list] = {"prebuilt": [], "after": []}
for _ in range(rounds):
    for mode, done in runs.items():
        for d, default in shipped.items():
            d.prebuild = default and mode == "prebuilt"
        fresh_cache(sm, budget)
        with ignore_eos(sm.tokenizer):
            generate(sm, other, max_tokens=tokens)
        run = timed_generate(sm, prompt, tokens)
        done.append(run)
        print(f"  {mode:8s} {run.tokens_per_s:8.2f} tok/s  layer {run.layer_us:7.0f} us  routing "
              f"{run.routing_wait_us:6.0f}  dispatch {run.dispatch_us:6.0f}  hit {run.cache_hit_rate:.3f}", flush=True)
for mode, done in runs.items():
    print(mode, f"median {statistics.median(r.tokens_per_s for r in done):.2f} tok/s",
          [round(r.tokens_per_s, 1) for r in done])
print("same tokens:", len({tuple(r.token_ids) for done in runs.values() for r in done}) == 1)
sm.close()
