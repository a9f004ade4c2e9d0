"""A/B of the I/O thread count: 1/8 of the experts cached, page cache warm, one model loaded
per count, alternating runs in one process, same tokens. On the GPU machine, after
`source .gpu-b/on-device.sh` and with the package importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-io-threads.py PACKED TOKENS ROUNDS COUNT [COUNT ...]"""

import sys

from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line, summary

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cases = {f"threads {n}": open_warm_eighth(path, io_threads=n) for n in (int(a) for a in sys.argv[4:])}
runs: dict[str, list] = {name: [] for name in cases}
for _ in range(rounds):
    for name, case in cases.items():
        runs[name].append(case.run(tokens))
        print(run_line(name, runs[name][-1]), flush=True)
print(summary(runs))
for case in cases.values():
    case.sm.close()
