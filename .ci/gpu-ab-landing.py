"""A/B of how staged misses land (node/misses.py, node/staging.py): as they are read, in
one copy per tensor for each run of consecutive records and slots (new), against one copy
per tensor per expert once every read is in (old), alternating runs in one process, same
tokens both ways. On the GPU machine, after `source .gpu-b/on-device.sh`, with the package
importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-landing.py PACKED TOKENS ROUNDS"""

import sys

from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line, summary
from edgemoe.node import misses, staging

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
case = open_warm_eighth(path)
print("dma:", case.sm.local.dma)
new_runs, new_wait_all = staging._runs, misses.Misses.wait_all


def old_wait_all(self):
    self.pending.wait_all()
    self._land(list(self._staged))


runs: dict[str, list] = {"new": [], "old": []}
for _ in range(rounds):
    for mode, done in runs.items():
        staging._runs = new_runs if mode == "new" else (lambda pairs: [(r, s, 1) for r, s in pairs])
        misses.Misses.wait_all = new_wait_all if mode == "new" else old_wait_all
        done.append(case.run(tokens))
        print(run_line(mode, done[-1]), flush=True)
print(summary(runs))
case.sm.close()
