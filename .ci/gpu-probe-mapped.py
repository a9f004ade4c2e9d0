"""Whether a GPU can compute experts that stay in host memory, read over the bus at compute
time, with no host round trip: MLX's CUDA arrays are managed memory, and the driver can be
told to keep a range's pages on the host and map them for the GPU (cuMemAdvise: preferred
location the CPU, accessed by the GPU). Run on the GPU machine: python3 .ci/gpu-probe-mapped.py

For a stack of experts (the large demo model's shape, float32, 6 MiB each, and a 4-bit one),
a decode-sized SwitchGLU call on 4 random experts, evaluated one at a time:
- on-gpu: the pages where MLX leaves them (on the GPU once read there);
- mapped: the same arrays advised to live on the host and prefetched there;
- back: advised back to the GPU and prefetched there.
Prints the median call time and the experts' bytes over it, and whether the outputs match
bit for bit (the arithmetic is the same kernel's: they must)."""

import ctypes
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

CU_MEM_ADVISE_SET_PREFERRED_LOCATION, CU_MEM_ADVISE_SET_ACCESSED_BY = 3, 5
CU_DEVICE_CPU = -1

mx.eval(mx.ones(4) + 1)  # MLX creates the primary context
cuda = ctypes.CDLL("libcuda.so.1")
device, context, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0 and cuda.cuCtxSetCurrent(context) == 0
version = ctypes.c_int()
cuda.cuDriverGetVersion(ctypes.byref(version))
print("driver", version.value)
cuda.cuMemAdvise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]


class Location(ctypes.Structure):  # CUmemLocation: type 1 a device, 2 the host
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


cuda.cuMemAdvise_v2.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, Location]
cuda.cuMemPrefetchAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_size_t, Location, ctypes.c_uint, ctypes.c_void_p]


def advise(ptr: int, n: int, advice: int, where: int) -> int:
    status = cuda.cuMemAdvise(ptr, n, advice, where)
    if status:
        status = cuda.cuMemAdvise_v2(ptr, n, advice, Location(2, 0) if where == CU_DEVICE_CPU else Location(1, where))
    return status


def address(arr: mx.array) -> int:
    return np.frombuffer(memoryview(arr).cast("B"), dtype=np.uint8).ctypes.data  # type: ignore[arg-type]


def place(arrays: list[mx.array], on_host: bool) -> None:
    for arr in arrays:
        ptr, n = address(arr), arr.nbytes
        where = CU_DEVICE_CPU if on_host else device.value
        status = advise(ptr, n, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, where)
        assert status == 0, f"cuMemAdvise preferred: {status}"
        status = advise(ptr, n, CU_MEM_ADVISE_SET_ACCESSED_BY, device.value)
        assert status == 0, f"cuMemAdvise accessed-by: {status}"
        location = Location(2, 0) if on_host else Location(1, device.value)
        status = cuda.cuMemPrefetchAsync_v2(ptr, n, location, 0, None)
        if status:
            print("  prefetch", "host" if on_host else "gpu", "failed:", status)
    cuda.cuCtxSynchronize()


def run(glu: nn.Module, x: mx.array, picks: list[mx.array]) -> tuple[float, list[np.ndarray]]:
    times, outs = [], []
    for idx in picks:
        t = time.perf_counter()
        y = glu(x, idx)
        mx.eval(y)
        times.append(time.perf_counter() - t)
        outs.append(np.array(y.astype(mx.float32)))
    return statistics.median(times[5:]), outs


for name, bits in (("float32", None), ("4-bit", 4)):
    hidden, inter, experts, k = 1024, 512, 64, 4
    glu = SwitchGLU(hidden, inter, experts)
    if bits:
        nn.quantize(glu, group_size=64, bits=bits)
    mx.eval(glu.parameters())
    arrays = [a for _, a in nn.utils.tree_flatten(glu.parameters())]
    per_expert = sum(a.nbytes for a in arrays) / experts
    rng = np.random.default_rng(0)
    picks = [mx.array(rng.choice(experts, k, replace=False)[None, None].astype(np.uint32)) for _ in range(60)]
    x = mx.random.normal((1, 1, hidden), key=mx.random.key(1))
    results = {}
    for variant in ("on-gpu", "mapped", "back", "mapped"):
        if variant != "on-gpu":
            place(arrays, on_host=variant == "mapped")
        median, outs = run(glu, x, picks)
        same = all(np.array_equal(a, b) for a, b in zip(outs, results.get("on-gpu", outs)))
        results.setdefault(variant, outs)
        rate = k * per_expert / median / 1e9
        print(f"{name:8s} {variant:7s} {median * 1e6:8.1f} us/call  {rate:7.2f} GB/s of experts  "
              f"same bits as on-gpu: {same}", flush=True)
