"""MLX bug report (CUDA backend, mlx 0.32.4, NVIDIA H200): quantized_matmul with a
row of exactly one quantization group (K == group_size == 64) returns garbage for
2..14 rows and NaN for 64; one row, gather_qmm, and K = 2 groups are right.
The CPU backend is right for all. Run: python tests/upstream/mlx_cuda_qmm_one_group.py

Seen on the GPU machine (2026-11-29), relative error against the dequantized matmul:
  M=1: 1.3e-07   M=14: 1.0e+00   M=64: nan        (K=64, N=32, group_size=64, bits=4)
edgemoe's test models avoid such layers (coordinator/tiny_models.py); real models' rows
hold many groups.
"""

import mlx.core as mx

for rows in (1, 14, 64):
    mx.random.seed(0)
    w = mx.random.normal((32, 64))
    x = mx.random.normal((rows, 64))
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    got = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)
    want = x @ mx.dequantize(q, s, b, group_size=64, bits=4).T
    err = mx.max(mx.abs(got - want)) / mx.max(mx.abs(want))
    print(f"{mx.default_device()} rows={rows}: relative error {err.item():.2e}")
