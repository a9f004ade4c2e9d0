"""A/B of staged misses (node/staging.py) against reading them straight into their slots,
alternating runs in one process, same tokens both ways. On the GPU machine, after
`source .gpu-b/on-device.sh` and with the package importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-staging.py PACKED TOKENS ROUNDS warm|cold

warm: 1/8 of the experts cached, page cache warm; cold: direct I/O, page cache dropped
before every token."""

import sys

from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line, summary
from edgemoe.coordinator.bench.decode import cold_run

path, tokens, rounds, case_name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
assert case_name in ("warm", "cold"), f"the case is warm or cold, not {case_name!r}"
case = open_warm_eighth(path, io_mode="buffered" if case_name == "warm" else "direct")
print("dma:", case.sm.local.dma)
runs: dict[str, list] = {"staged": [], "straight into the slot": []}
for _ in range(rounds):
    for mode, done in runs.items():
        case.sm.local.staged_reads = mode == "staged"
        if case_name == "warm":
            done.append(case.run(tokens))
        else:
            done.append(cold_run(case.sm, case.paths, case.prompt_tokens, tokens, case.budget, every_token=True))
        print(run_line(mode, done[-1]), flush=True)
print(summary(runs))
case.sm.close()
