"""A/B of how staged misses land (node/misses.py, node/staging.py): as they are read, in
one copy per tensor for each run of consecutive records and slots (new), against one copy
per tensor per expert once every read is in (old), alternating runs in one process, same
tokens both ways. On the GPU machine, after `source .gpu-b/on-device.sh`, with the package
importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-landing.py PACKED TOKENS ROUNDS"""

import statistics
import sys

from edgemoe.coordinator.bench.decode import WARMUP_PROMPT, fresh_cache, ignore_eos, timed_generate, warm_up
from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node import misses, staging
from edgemoe.node.manifest import read_manifest

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
manifest = read_manifest(path)
budget = max(manifest.expert_bytes, manifest.total_expert_bytes // 8)
sm = load_streaming_model(path, cache_bytes=budget, io_mode="buffered")
print("dma:", sm.local.dma)
warm_page_cache(expert_paths(path, manifest))
warm_up(sm)
prompt = build_prompt(sm.tokenizer, "Write a short story about a robot who learns to paint.")
other = build_prompt(sm.tokenizer, WARMUP_PROMPT)
new_runs, new_wait_all = staging._runs, misses.Misses.wait_all


def old_wait_all(self):
    self.pending.wait_all()
    self._land(list(self._staged))


runs: dict[str, list] = {"new": [], "old": []}
for _ in range(rounds):
    for mode, done in runs.items():
        staging._runs = new_runs if mode == "new" else (lambda pairs: [(r, s, 1) for r, s in pairs])
        misses.Misses.wait_all = new_wait_all if mode == "new" else old_wait_all
        fresh_cache(sm, budget)
        with ignore_eos(sm.tokenizer):
            generate(sm, other, max_tokens=tokens)
        run = timed_generate(sm, prompt, tokens)
        done.append(run)
        print(f"  {mode:4s} {run.tokens_per_s:8.2f} tok/s  layer {run.layer_us:7.0f} us  routing "
              f"{run.routing_wait_us:6.0f}  dispatch {run.dispatch_us:6.0f}  hit {run.cache_hit_rate:.3f}", flush=True)
for mode, done in runs.items():
    print(mode, f"median {statistics.median(r.tokens_per_s for r in done):.2f} tok/s")
print("same tokens:", len({tuple(r.token_ids) for done in runs.values() for r in done}) == 1)
sm.close()
