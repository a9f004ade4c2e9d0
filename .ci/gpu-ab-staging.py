"""A/B of staged misses (node/staging.py) against reading them straight into their slots,
alternating runs in one process, same tokens both ways. On the GPU machine, after
`source .gpu-b/on-device.sh` and with the package importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-staging.py PACKED TOKENS ROUNDS warm|cold

warm: 1/8 of the experts cached, page cache warm; cold: direct I/O, page cache dropped
before every token."""

import statistics
import sys

from edgemoe.coordinator.bench.decode import WARMUP_PROMPT, cold_run, fresh_cache, ignore_eos, timed_generate, warm_up
from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest

path, tokens, rounds, case = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
manifest = read_manifest(path)
budget = max(manifest.expert_bytes, manifest.total_expert_bytes // 8)
sm = load_streaming_model(path, cache_bytes=budget, io_mode="buffered" if case == "warm" else "direct")
print("dma:", sm.local.dma)
paths = expert_paths(path, manifest)
warm_page_cache(paths)
warm_up(sm)
prompt = build_prompt(sm.tokenizer, "Write a short story about a robot who learns to paint.")
other = build_prompt(sm.tokenizer, WARMUP_PROMPT)
runs: dict[str, list] = {"staged": [], "straight into the slot": []}
for _ in range(rounds):
    for mode, done in runs.items():
        sm.local.staged_reads = mode == "staged"
        if case == "warm":
            fresh_cache(sm, budget)
            with ignore_eos(sm.tokenizer):
                generate(sm, other, max_tokens=tokens)
            run = timed_generate(sm, prompt, tokens)
        else:
            run = cold_run(sm, paths, prompt, tokens, budget, every_token=True)
        done.append(run)
        print(f"  {mode:24s} {run.tokens_per_s:8.2f} tok/s  layer {run.layer_us:7.0f} us  routing "
              f"{run.routing_wait_us:6.0f}  dispatch {run.dispatch_us:6.0f}  hit {run.cache_hit_rate:.3f}", flush=True)
for mode, done in runs.items():
    print(mode, f"median {statistics.median(r.tokens_per_s for r in done):.2f} tok/s")
print("same tokens:", len({tuple(r.token_ids) for done in runs.values() for r in done}) == 1)
sm.close()
