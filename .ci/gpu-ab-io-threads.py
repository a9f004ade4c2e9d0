"""A/B of the I/O thread count: 1/8 of the experts cached, page cache warm, one model loaded
per count, alternating runs in one process, same tokens. On the GPU machine, after
`source .gpu-b/on-device.sh` and with the package importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-io-threads.py PACKED TOKENS ROUNDS COUNT [COUNT ...]"""

import statistics
import sys

from edgemoe.coordinator.bench.decode import WARMUP_PROMPT, fresh_cache, ignore_eos, timed_generate, warm_up
from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
counts = [int(a) for a in sys.argv[4:]]
manifest = read_manifest(path)
budget = max(manifest.expert_bytes, manifest.total_expert_bytes // 8)
sms = {n: load_streaming_model(path, cache_bytes=budget, io_mode="buffered", io_threads=n) for n in counts}
warm_page_cache(expert_paths(path, manifest))
for sm in sms.values():
    warm_up(sm)
any_sm = next(iter(sms.values()))
prompt = build_prompt(any_sm.tokenizer, "Write a short story about a robot who learns to paint.")
other = build_prompt(any_sm.tokenizer, WARMUP_PROMPT)
runs = {n: [] for n in counts}
for _ in range(rounds):
    for n, sm in sms.items():
        fresh_cache(sm, budget)
        with ignore_eos(sm.tokenizer):
            generate(sm, other, max_tokens=tokens)
        run = timed_generate(sm, prompt, tokens)
        runs[n].append(run)
        print(f"  threads {n:3d} {run.tokens_per_s:8.2f} tok/s  layer {run.layer_us:7.0f} us  routing "
              f"{run.routing_wait_us:6.0f}  dispatch {run.dispatch_us:6.0f}  hit {run.cache_hit_rate:.3f}", flush=True)
for n, done in runs.items():
    print(f"threads {n}: median {statistics.median(r.tokens_per_s for r in done):.2f} tok/s",
          [round(r.tokens_per_s, 1) for r in done])
print("same tokens:", len({tuple(r.token_ids) for done in runs.values() for r in done}) == 1)
for sm in sms.values():
    sm.close()
