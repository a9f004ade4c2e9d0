"""Host time of one resident layer call, nothing evaluated: the dispatcher (as shipped), the
bare `template(x, indices)` on the layer's slice of the pool, `ExpertKernel` on the same, and
the bare call through an expert -> slot table on the whole pool, 20 000 calls each
(the GPU case is host-bound near 1 ms a token). With the package importable:

    python3 .ci/gpu-host-cost.py PACKED"""

import sys
import time

import mlx.core as mx

from edgemoe.coordinator.bench.decode import cache_everything
from edgemoe.coordinator.loader import load_streaming_model
from edgemoe.node.compute import input_dims
from edgemoe.node.manifest import read_manifest

path = sys.argv[1]
manifest = read_manifest(path)
sm = load_streaming_model(path, cache_bytes=manifest.total_expert_bytes)
cache_everything(sm)
d = sm.dispatchers[0]
d._overlap = False  # build only, as on a GPU
arrays = sm.local.resident_arrays(d.layer)
assert arrays is not None, "every expert is cached: the layer should be resident"
group = sm.local._group_of[d.layer]
table = mx.array([group.slot_of[(d.layer, e)] for e in range(d.kernel.spec.num_experts)], dtype=mx.uint32)
x = mx.random.normal((1, 1, input_dims(d.kernel)))
indices = mx.array([[list(range(sm.config["num_experts_per_tok"]))]], dtype=mx.uint32)
mx.eval(x, indices)
calls = 20000
variants = {"dispatch": lambda: d(x, indices), "bare": lambda: d.kernel.template(x, indices),
            "kernel": lambda: d.kernel(x, indices), "table": lambda: d.kernel.template(x, table[indices])}
for name, call in variants.items():
    d._bind(sm.local.arrays(d.layer) if name == "table" else arrays)
    for _ in range(200):
        call()
    sm.local.settle(everything=True)
    start = time.perf_counter()
    for i in range(calls):
        call()
        if i % 1000 == 0:
            sm.local.drop_unsettled()  # the deferred choices of graphs never evaluated
    print(f"{name:9s} {(time.perf_counter() - start) / calls * 1e6:.1f} us/call")
sm.close()
