"""How fast an expert gets into a slot of a pool the GPU has read, on MLX's CUDA backend
(node/staging.py's reason to exist). Run on the GPU machine: python3 .ci/gpu-probe-copy.py

- host-write: the bytes written into the slot through the array's memory (managed memory:
  the pages migrate back to the host, then fault by fault to the GPU);
- memcpy-pageable / memcpy-pinned: copied by cuMemcpyHtoDAsync from ordinary / pinned host memory.
Each variant: 8 slots of 64 rewritten, then a kernel reads them; medians of 25 rounds.
"""

import ctypes
import time

import mlx.core as mx
import numpy as np

mx.eval(mx.ones(4) + 1)  # MLX creates the primary context
cuda = ctypes.CDLL("libcuda.so.1")
cuda.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
cuda.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
device, context, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0 and cuda.cuCtxSetCurrent(context) == 0
assert cuda.cuStreamCreate(ctypes.byref(stream), 1) == 0

for record in (256 * 1024, 6 * 2**20):
    slots, n = 64, record // 4
    pool = mx.zeros((slots, n), dtype=mx.float32)
    mx.eval(pool.sum())
    view = memoryview(pool).cast("B")  # type: ignore[arg-type]
    base = np.frombuffer(view, dtype=np.uint8).ctypes.data
    pageable = np.random.default_rng(0).standard_normal((8, n)).astype(np.float32)
    pinned = np.random.default_rng(1).standard_normal((8, n)).astype(np.float32)
    assert cuda.cuMemHostRegister_v2(pinned.ctypes.data, pinned.nbytes, 0) == 0
    rng = np.random.default_rng(2)
    for variant in ("host-write", "memcpy-pageable", "memcpy-pinned"):
        times = []
        for _ in range(30):
            picked = rng.choice(slots, 8, replace=False)
            src = pinned if variant == "memcpy-pinned" else pageable
            t0 = time.perf_counter()
            for j, s in enumerate(picked.tolist()):
                if variant == "host-write":
                    view[s * record : (s + 1) * record] = memoryview(src[j]).cast("B")
                else:
                    assert cuda.cuMemcpyHtoDAsync_v2(base + s * record, src[j].ctypes.data, record, stream) == 0
            assert cuda.cuStreamSynchronize(stream) == 0
            t1 = time.perf_counter()
            out = pool[mx.array(picked)].sum(axis=1)
            mx.eval(out)
            t2 = time.perf_counter()
            assert np.allclose(np.array(out), src.sum(axis=1), rtol=1e-3), variant
            times.append((t1 - t0, t2 - t1))
        copy_s, kernel_s = np.median(np.array(times[5:]), axis=0)
        print(f"{record >> 10:5d} KiB x 8  {variant:16s} copy {copy_s * 1e6:7.0f} us  kernel {kernel_s * 1e6:6.0f} us  "
              f"{8 * record / (copy_s + kernel_s) / 1e9:6.2f} GB/s")
