"""Where a partially cached decode's host time goes: cProfile of the warm case (1/8 of the
experts cached, page cache warm), the functions by their own time, and the per-layer split.
On the GPU machine, after `source .gpu-b/on-device.sh`, with the package importable:

    python3 .ci/gpu-profile-warm.py PACKED TOKENS"""

import cProfile
import pstats
import sys

from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line
from edgemoe.coordinator.bench.decode import refill, timed_generate

path, tokens = sys.argv[1], int(sys.argv[2])
case = open_warm_eighth(path)
profile = cProfile.Profile()
for profiled in (False, True):
    refill(case.sm, case.budget, tokens)
    if profiled:  # the timed text only
        profile.enable()
    run = timed_generate(case.sm, case.prompt_tokens, tokens)
    profile.disable()
    print(run_line("profiled" if profiled else "plain", run), flush=True)
pstats.Stats(profile).sort_stats("tottime").print_stats(30)
case.sm.close()
