"""The CPU kernels' GEMM (csrc/cpu/gemm.h, through torch.ops.pyadapt_C.gemm_into) against
torch.mm (MKL on x86 builds of torch), float32, side by side in one run.

    pytest bench/bench_gemm.py --benchmark-only

Shapes are the products the CPU kernels run at issue 5's target (M 4096, d 768): the frozen
768 x 768 GEMM, and the rank-wide ones (r 16 and 32) of the LoRA backward. In the table the
"eager" column is torch.mm. Each case first checks both products against float64.
"""

from __future__ import annotations

import pytest
import torch

from pyadapt.ops import _native

SHAPES = {  # name: (m, k, n, a transposed): out (m x n) = a (m x k) @ b (k x n)
    "frozen-4096x768x768": (4096, 768, 768, False),
    "x.A^T-4096x768x16": (4096, 768, 16, False),
    "g^T.u-768x4096x16": (768, 4096, 16, True),
    "g^T.u-768x4096x32": (768, 4096, 32, True),
}
IMPLS = ("eager", "pyadapt-cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemm(benchmark, shape, impl):
    if not _native.available:
        pytest.skip(f"pyadapt._C is not built: {_native.error}")
    m, k, n, a_t = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn((k, m) if a_t else (m, k), generator=gen)
    a = a.t() if a_t else a
    b = torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    if impl == "eager":
        def run():
            torch.mm(a, b, out=out)
    else:
        def run():
            torch.ops.pyadapt_C.gemm_into(out, a, b, None, 1.0, 0.0, False)
    run()
    exact = a.double() @ b.double()
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-5, f"{impl} {shape}: relative error {err:.2e}"
    benchmark.extra_info.update(op="gemm", preset=shape, device="cpu", dtype="float32",
                                impl=impl, **{"pass": "forward"},
                                gflops=2.0 * m * n * k / 1e9)
    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)
