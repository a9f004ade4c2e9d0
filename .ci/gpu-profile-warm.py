"""Where a partially cached decode's host time goes: cProfile of the warm case (1/8 of the
experts cached, page cache warm), the functions by their own time, and the per-layer split.
On the GPU machine, after `source .gpu-b/on-device.sh`, with the package importable:

    python3 .ci/gpu-profile-warm.py PACKED TOKENS"""

import cProfile
import pstats
import sys

from edgemoe.coordinator.bench.decode import WARMUP_PROMPT, fresh_cache, ignore_eos, timed_generate, warm_up
from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest

path, tokens = sys.argv[1], int(sys.argv[2])
manifest = read_manifest(path)
budget = max(manifest.expert_bytes, manifest.total_expert_bytes // 8)
sm = load_streaming_model(path, cache_bytes=budget, io_mode="buffered")
warm_page_cache(expert_paths(path, manifest))
warm_up(sm)
prompt = build_prompt(sm.tokenizer, "Write a short story about a robot who learns to paint.")
for profiled in (False, True):
    fresh_cache(sm, budget)
    with ignore_eos(sm.tokenizer):
        generate(sm, build_prompt(sm.tokenizer, WARMUP_PROMPT), max_tokens=tokens)
    profile = cProfile.Profile()
    if profiled:
        profile.enable()
    run = timed_generate(sm, prompt, tokens)
    profile.disable()
    print(f"{'profiled' if profiled else 'plain'}: {run.tokens_per_s:.1f} tok/s, layer {run.layer_us:.0f} us, routing "
          f"{run.routing_wait_us:.0f}, dispatch {run.dispatch_us:.0f}, hit {run.cache_hit_rate:.3f}", flush=True)
pstats.Stats(profile).sort_stats("tottime").print_stats(30)
sm.close()
