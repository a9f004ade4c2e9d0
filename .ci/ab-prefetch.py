"""A/B of --prefetch: alternating runs of one model loaded with and without it, in one
process, same tokens both ways. CASE `cold`: the page cache dropped before every token (each
miss reads the disk); `warm`: 1/8 of the experts cached, the page cache warm, each run after
other text has filled the cache (as the bench's warm case). From the repository root:

    .venv/bin/python .ci/ab-prefetch.py PACKED TOKENS ROUNDS [auto|direct|buffered] [cold|warm]"""

import statistics
import sys

from edgemoe.coordinator.bench.decode import (
    WARMUP_PROMPT,
    cold_run,
    fresh_cache,
    ignore_eos,
    timed_generate,
    warm_up,
)
from edgemoe.coordinator.bench.page_cache import expert_paths, warm_page_cache
from edgemoe.coordinator.generate import build_prompt, generate
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.manifest import read_manifest

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
io_mode = sys.argv[4] if len(sys.argv) > 4 else "auto"
case = sys.argv[5] if len(sys.argv) > 5 else "cold"
assert case in ("cold", "warm"), f"CASE is cold or warm, not {case!r}"
manifest = read_manifest(path)
budget = max(manifest.expert_bytes, manifest.total_expert_bytes // 8)
models = {name: load_streaming_model(path, cache_bytes=budget, io_mode=io_mode, prefetch=name == "prefetch")
          for name in ("prefetch", "no prefetch")}
paths = expert_paths(path, manifest)
if case == "warm":
    warm_page_cache(paths)
for sm in models.values():
    if case == "warm":
        sm.local.store.set_io_mode("buffered")  # as the bench's warm case: the page cache is the point
    warm_up(sm)
timed_guesses = [0, 0]  # guessed, right: the timed runs' only
tokenizer = models["prefetch"].tokenizer
prompt = build_prompt(tokenizer, "Write a short story about a robot who learns to paint.")
other = build_prompt(tokenizer, WARMUP_PROMPT)


def once(sm):
    if case == "warm":
        fresh_cache(sm, budget)
        with ignore_eos(sm.tokenizer):
            generate(sm, other, max_tokens=tokens)
    guessed, right = sm.guesses()
    if case == "cold":
        run = cold_run(sm, paths, prompt, tokens, budget, every_token=True)
    else:
        run = timed_generate(sm, prompt, tokens)
    if sm is models["prefetch"]:
        timed_guesses[0] += sm.guesses()[0] - guessed
        timed_guesses[1] += sm.guesses()[1] - right
    return run


runs: dict[str, list] = {name: [] for name in models}
for _ in range(rounds):
    for name, sm in models.items():
        run = once(sm)
        runs[name].append(run)
        print(f"  {name:12s} {run.tokens_per_s:7.2f} tok/s  layer {run.layer_us:6.0f} us  routing "
              f"{run.routing_wait_us:5.0f}  dispatch {run.dispatch_us:5.0f}  "
              f"read {run.ssd_bytes_per_token / 2**20:.2f} MiB/token", flush=True)
for name, done in runs.items():
    print(f"{name}: median {statistics.median(r.tokens_per_s for r in done):.2f} tok/s",
          [round(r.tokens_per_s, 1) for r in done])
print(f"guesses right in the timed runs: {timed_guesses[1]} of {timed_guesses[0]}")
print("same tokens:", len({tuple(r.token_ids) for done in runs.values() for r in done}) == 1)
for sm in models.values():
    sm.close()
