"""A/B of the host-routing path's `mx.async_eval` per layer (as shipped) against none (the
next layer's routing read-back evaluates it anyway): 1/8 of the experts cached, page cache
warm, alternating runs in one process, same tokens both ways. On the GPU machine, after
`source .gpu-b/on-device.sh` and with the package importable (as .ci/gpu-check arranges):

    python3 .ci/gpu-ab-async.py PACKED TOKENS ROUNDS"""

import sys

import mlx.core as mx

from edgemoe.coordinator import dispatch
from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line, summary


class NoAsync:
    """mlx.core, less `async_eval`."""

    def __getattr__(self, name):
        return getattr(mx, name)

    @staticmethod
    def async_eval(*args):
        pass


path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
case = open_warm_eighth(path)
runs: dict[str, list] = {"async_eval": [], "none": []}
for _ in range(rounds):
    for mode, done in runs.items():
        dispatch.mx = mx if mode == "async_eval" else NoAsync()
        done.append(case.run(tokens))
        print(run_line(mode, done[-1]), flush=True)
dispatch.mx = mx
print(summary(runs))
case.sm.close()
