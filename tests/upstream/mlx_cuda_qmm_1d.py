"""MLX bug probe (CUDA backend, mlx 0.32.4, NVIDIA H200): a quantized Linear applied to a
1-D input (one token's hidden state, as edgemoe's prefetch guess fed the next router) raised
`IndexError: SmallVector out of range` at eval. The same row as a (1, D) input is right.
Run: python tests/upstream/mlx_cuda_qmm_1d.py  (the CPU backend is right for all)
"""

import mlx.core as mx
import mlx.nn as nn

for dims, bits, group in (((64, 8), 8, 64), ((128, 32), 8, 64), ((256, 64), 4, 32)):
    layer = nn.QuantizedLinear(*dims, bias=False, group_size=group, bits=bits)
    x = mx.random.normal((dims[0],))
    want = None
    for name, inputs in (("(1, D)", x[None]), ("1-D", x)):
        try:
            got = layer(inputs).reshape(-1)
            mx.eval(got)
            want = got if want is None else want
            same = mx.array_equal(got, want).item()
            print(f"{mx.default_device()} {dims} {bits}-bit {name:7s} {'same as (1, D)' if same else 'DIFFERS'}")
        except Exception as exc:
            print(f"{mx.default_device()} {dims} {bits}-bit {name:7s} {type(exc).__name__}: {exc}")
