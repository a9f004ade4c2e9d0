"""A/B of building a decode layer's call before its routing is read back (`LayerDispatch.prebuild`,
the CPU backend's default) against after, as before: 1/8 of the experts cached, page cache
warm, alternating runs in one process, same tokens both ways. From the repository root:

    .venv/bin/python .ci/ab-prebuild.py PACKED TOKENS ROUNDS"""

import sys

from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line, summary

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
case = open_warm_eighth(path)
shipped = {d: d.prebuild for d in case.sm.dispatchers}
runs: dict[str, list] = {"prebuilt": [], "after": []}
for _ in range(rounds):
    for mode, done in runs.items():
        for d, default in shipped.items():
            d.prebuild = default and mode == "prebuilt"
        done.append(case.run(tokens))
        print(run_line(mode, done[-1]), flush=True)
print(summary(runs))
case.sm.close()
