"""The `cuda` backend (csrc/cuda, pyadapt._C_cuda) on a GPU: every op and every gradient against
the float64 reference on fresh random data, odd sizes (M = 0, rows not a multiple of any block,
d not a power of two, r from 1 to 128), all four dtypes, both vector and scalar memory paths,
poisoned allocator memory, bit-identical reruns, and argument checks.

The bottleneck op has two CUDA paths: the fused tensor-core kernels (csrc/cuda/bottleneck_fused.cu:
bfloat16 / float16, 1 <= r <= 128, d a multiple of 8, 16-byte aligned rows) and the cuBLAS path
(everything else, or PYADAPT_CUDA_FUSED=0); the `fused_switch` fixture picks one.

GPU only (marker `gpu`, deselected on CPU by pyproject's addopts): run with `pytest -m gpu`. On
a machine without CUDA, or where pyadapt._C_cuda did not load, these tests fail, never skip.
"""

from __future__ import annotations

import pytest
import torch

from conftest import REL_TOL, assert_close_rel, rel_err
from pyadapt import reference
from pyadapt.ops import _native_cuda, backend_for, bottleneck, fold, lowrank_linear, radapter
from pyadapt.ops import use_backend

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _cuda_backend():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (torch.cuda.is_available() is False)")
    if not _native_cuda.available:
        pytest.fail(f"pyadapt._C_cuda did not load: {_native_cuda.error} (build it with "
                    "PYADAPT_CUDA=ON tools/native.sh)")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 tolerances assume IEEE products
    with use_backend("cuda"):
        yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def fused_switch(monkeypatch):
    """set_fused(on) sets PYADAPT_CUDA_FUSED to 1 / 0 and has pyadapt._C_cuda re-read it (it
    reads it once otherwise); after the test the environment and the module's setting return."""
    ops = _native_cuda.ops()

    def set_fused(on):
        monkeypatch.setenv("PYADAPT_CUDA_FUSED", "1" if on else "0")
        assert ops.fused_from_env() is on

    yield set_fused
    monkeypatch.undo()
    ops.fused_from_env()


def _poison_allocator():
    """Fill freed blocks of the caching allocator (large and small pools) with NaN: the kernels'
    outputs and workspaces are then carved from NaN memory, so an element never written (or read
    before it is written) shows up as a non-finite value or a wrong result."""
    torch.cuda.synchronize()
    big = torch.full((64 << 20,), float("nan"), device="cuda")  # 256 MiB, large pool
    small = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(16)]  # 512 KiB
    del big, small


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, device="cuda") * scale).to(dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _f64(t):
    return None if t is None else t.detach().double()


def _misaligned(t):
    """A contiguous copy of t whose data pointer is one element off 16-byte alignment."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)


def _check_grads(named, grads, refs, dtype, baselines=None):
    for i, (name, g, ref) in enumerate(zip(named, grads, refs)):
        if ref is None:
            assert g is None, f"{name}: unexpected gradient"
            continue
        assert g is not None, f"{name}: no gradient"
        base = None if baselines is None else baselines[i]
        assert_close_rel(g, ref.reshape(g.shape), dtype, f"grad {name}", baseline=base)


# ---------------------------------------------------------------------------------------------
# bottleneck / MMA

BOTTLENECK_CASES = [
    # M, d, r, shared, activation, dropout, residual, row_scale, learnable scale, biases, gsi
    (0, 48, 8, False, "relu", 0.0, False, False, False, True, False),
    (1, 40, 1, False, "gelu", 0.0, True, False, True, True, False),
    (37, 96, 16, True, "quick_gelu", 0.0, False, True, True, True, False),
    (130, 200, 33, False, "silu", 0.3, True, True, False, False, False),
    (129, 97, 7, True, "relu", 0.25, False, False, True, True, True),
    (257, 768, 128, False, "identity", 0.1, False, True, True, True, True),
]


def _bottleneck_inputs(m, d, r, shared, residual, row_scale, learnable, biases, dtype):
    x = _rand(m, d, dtype=dtype)
    p = {"down_weight": _rand(r, d, dtype=dtype, scale=d ** -0.5),
         "down_bias": _rand(r, dtype=dtype, scale=0.1) if biases else None,
         "up_weight": _rand(d, r, dtype=dtype, scale=r ** -0.5),
         "up_bias": _rand(d, dtype=dtype, scale=0.1) if biases else None,
         "shared_weight": _rand(r, r, dtype=dtype, scale=r ** -0.5) if shared else None,
         "shared_bias": _rand(r, dtype=dtype, scale=0.1) if shared and biases else None}
    res = _rand(m, d, dtype=dtype) if residual else None
    rs = (torch.rand(m, device="cuda") + 0.5).to(dtype) if row_scale else None
    scale = torch.tensor(0.7, dtype=dtype, device="cuda") if learnable else 0.7
    return x, p, res, rs, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BOTTLENECK_CASES, ids=lambda c: f"M{c[0]}-d{c[1]}-r{c[2]}")
def test_bottleneck_forward_backward(case, dtype):
    m, d, r, shared, act, p_drop, residual, row_scale, learnable, biases, gsi = case
    x, p, res, rs, scale = _bottleneck_inputs(m, d, r, shared, residual, row_scale, learnable,
                                              biases, dtype)
    seed = torch.tensor(1234, dtype=torch.int64, device="cuda")
    names = ["x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight",
             "up_bias", "scale"]
    leaves = {"x": _leaf(x), **{k: None if v is None else _leaf(v) for k, v in p.items()},
              "scale": _leaf(scale) if learnable else None}
    kwargs = dict(residual=res, scale=leaves["scale"] if learnable else scale, activation=act,
                  dropout_p=p_drop, seed=seed, row_scale=rs, grad_scale_invariant=gsi)
    assert backend_for("bottleneck_forward", "cuda") == "cuda"
    _poison_allocator()
    y = bottleneck(leaves["x"], leaves["down_weight"], leaves["down_bias"], leaves["up_weight"],
                   leaves["up_bias"], leaves["shared_weight"], leaves["shared_bias"], **kwargs)
    g = _rand(m, d, dtype=dtype)
    inputs = [leaves[n] for n in names if leaves[n] is not None]
    _poison_allocator()
    grads = torch.autograd.grad(y, inputs, g)
    got = dict(zip([n for n in names if leaves[n] is not None], grads))

    def ref_call(cast):
        sc = cast(scale) if learnable else scale
        y_ref = reference.bottleneck_forward(
            cast(x), cast(p["down_weight"]), cast(p["down_bias"]), cast(p["up_weight"]),
            cast(p["up_bias"]), cast(p["shared_weight"]), cast(p["shared_bias"]),
            residual=cast(res), scale=sc, activation_name=act, dropout_p=p_drop, seed=seed,
            row_scale=cast(rs))
        g_ref = reference.bottleneck_backward(
            cast(g), cast(x), cast(p["down_weight"]), cast(p["down_bias"]), cast(p["up_weight"]),
            cast(p["up_bias"]), cast(p["shared_weight"]), cast(p["shared_bias"]),
            has_residual=residual, scale=sc, activation_name=act, dropout_p=p_drop, seed=seed,
            row_scale=cast(rs), grad_scale_invariant=gsi)
        return y_ref, g_ref

    y_ref, g_ref = ref_call(_f64)
    y_base, g_base = ref_call(lambda t: None if t is None else t.detach())
    assert y.dtype == dtype and y.shape == (m, d)
    assert_close_rel(y, y_ref, dtype, "y", baseline=y_base)
    ref_by_name = dict(zip(names, g_ref))
    base_by_name = dict(zip(names, g_base))
    present = [n for n in names if leaves[n] is not None]
    _check_grads(present, [got[n] for n in present], [ref_by_name[n] for n in present], dtype,
                 [base_by_name[n] for n in present])


def test_bottleneck_dropout_mask_is_the_reference_mask():
    """With identity activation and unit weights structure, a wrong Philox bit shows at once:
    compare the rank-space mask the kernel applied with the reference's, element by element."""
    m, d, r, p_drop = 67, 32, 48, 0.5
    x = _rand(m, d, dtype=torch.float64)
    eye_down = torch.zeros(r, d, dtype=torch.float64, device="cuda")
    eye_down[:d, :d] = torch.eye(d, dtype=torch.float64, device="cuda")
    up = torch.zeros(d, r, dtype=torch.float64, device="cuda")
    up[:, :d] = torch.eye(d, dtype=torch.float64, device="cuda")
    seed = torch.tensor(987654, dtype=torch.int64, device="cuda")
    y = bottleneck(x, eye_down, None, up, None, activation="identity", dropout_p=p_drop,
                   seed=seed, residual=torch.zeros_like(x))
    keep = reference.dropout_multiplier(seed, m, r, p_drop, torch.float64, "cuda")[:, :d]
    assert torch.equal(y, x * keep)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bottleneck_scalar_path_misaligned(dtype, fused_switch):
    """A residual whose rows are not 16-byte aligned takes the one-element epilogue: same bits.
    (x stays aligned: cuBLAS may pick another GEMM kernel for a misaligned operand. The cuBLAS
    path: the fused kernels would serve only the aligned call.)"""
    fused_switch(False)
    m, d, r = 33, 64, 8
    x, p, res, rs, _ = _bottleneck_inputs(m, d, r, False, True, True, False, True, dtype)
    args = (x, p["down_weight"], p["down_bias"], p["up_weight"], p["up_bias"])
    aligned = bottleneck(*args, residual=res, row_scale=rs, scale=0.5)
    shifted = bottleneck(*args, residual=_misaligned(res), row_scale=rs,
                         scale=0.5)
    assert torch.equal(aligned, shifted)


def test_bottleneck_bit_identical_reruns():
    m, d, r = 1000, 384, 32
    x, p, res, rs, scale = _bottleneck_inputs(m, d, r, True, False, True, True, True,
                                              torch.bfloat16)
    seed = torch.tensor(7, dtype=torch.int64, device="cuda")
    g = _rand(m, d, dtype=torch.bfloat16)

    def run():
        leaves = {k: None if v is None else _leaf(v) for k, v in p.items()}
        xs, sc = _leaf(x), _leaf(scale)
        y = bottleneck(xs, leaves["down_weight"], leaves["down_bias"], leaves["up_weight"],
                       leaves["up_bias"], leaves["shared_weight"], leaves["shared_bias"],
                       scale=sc, activation="gelu", dropout_p=0.2, seed=seed, row_scale=rs)
        inputs = [xs, sc] + [v for v in leaves.values() if v is not None]
        return [y] + list(torch.autograd.grad(y, inputs, g))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# bottleneck on the fused tensor-core kernels

LOW_PRECISION = (torch.bfloat16, torch.float16)
FUSED_KERNELS = ("bottleneck_fused_forward_kernel", "bottleneck_fused_backward_kernel")
GRAD_NAMES = ["x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight",
              "up_bias", "scale"]
# Together these cover every activation, and each option on and off.
FUSED_CONFIGS = [
    # shared, activation, dropout, residual, row_scale, learnable scale, biases, gsi
    (False, "relu", 0.0, False, False, False, True, False),
    (True, "gelu", 0.2, True, True, True, True, False),
    (False, "quick_gelu", 0.3, True, False, True, False, True),
    (True, "silu", 0.0, False, True, False, True, True),
    (False, "identity", 0.1, False, True, True, True, False),
    (True, "relu", 0.5, True, False, False, False, False),
]
FUSED_ROWS = (0, 1, 63, 64, 65, 1000)  # around the 64-row block of the kernels


def _config_id(config):
    shared, act, p_drop, residual, row_scale, learnable, biases, gsi = config
    flags = [("shared", shared), ("res", residual), ("rs", row_scale), ("learn", learnable),
             ("bias", biases), ("gsi", gsi)]
    return "-".join([act, f"p{p_drop}"] + [name for name, on in flags if on])


def _fused_case(m, d, r, config, dtype):
    """One bottleneck problem: run() -> (y, {input name: gradient}) through the op on whichever
    CUDA path is selected, and reference_in(cast) -> the same from pyadapt.reference on the
    inputs cast by `cast` (float64, or as stored for the eager baseline)."""
    shared, act, p_drop, residual, row_scale, learnable, biases, gsi = config
    x, p, res, rs, scale = _bottleneck_inputs(m, d, r, shared, residual, row_scale, learnable,
                                              biases, dtype)
    seed = torch.tensor(2468, dtype=torch.int64, device="cuda")
    g = _rand(m, d, dtype=dtype)
    options = dict(activation=act, dropout_p=p_drop, seed=seed, row_scale=rs)

    def run():
        leaves = {"x": _leaf(x), **{k: None if v is None else _leaf(v) for k, v in p.items()},
                  "scale": _leaf(scale) if learnable else None}
        _poison_allocator()
        y = bottleneck(leaves["x"], leaves["down_weight"], leaves["down_bias"],
                       leaves["up_weight"], leaves["up_bias"], leaves["shared_weight"],
                       leaves["shared_bias"], residual=res,
                       scale=leaves["scale"] if learnable else scale,
                       grad_scale_invariant=gsi, **options)
        present = [n for n in GRAD_NAMES if leaves[n] is not None]
        _poison_allocator()
        grads = torch.autograd.grad(y, [leaves[n] for n in present], g)
        return y, dict(zip(present, grads))

    def reference_in(cast):
        sc = cast(scale) if learnable else scale
        weights = (cast(p["down_weight"]), cast(p["down_bias"]), cast(p["up_weight"]),
                   cast(p["up_bias"]), cast(p["shared_weight"]), cast(p["shared_bias"]))
        y_ref = reference.bottleneck_forward(
            cast(x), *weights, residual=cast(res), scale=sc, activation_name=act,
            dropout_p=p_drop, seed=seed, row_scale=cast(rs))
        g_ref = reference.bottleneck_backward(
            cast(g), cast(x), *weights, has_residual=residual, scale=sc, activation_name=act,
            dropout_p=p_drop, seed=seed, row_scale=cast(rs), grad_scale_invariant=gsi)
        return y_ref, dict(zip(GRAD_NAMES, g_ref))

    return run, reference_in


def _kernels_launched(fn):
    """Names of the CUDA kernels fn launches (torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert names, "torch.profiler recorded no CUDA kernel (is CUPTI available?)"
    return names


def _ran_fused(names):
    return {k: any(k in name for name in names) for k in FUSED_KERNELS}


@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("d", (8, 104, 768))
@pytest.mark.parametrize("r", (1, 7, 32, 64, 128))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fused_bottleneck_against_float64(dtype, r, d, config, fused_switch):
    """y and every gradient of the fused kernels against the float64 reference, and at most 2x
    the error of eager PyTorch in the same dtype, for M around the 64-row block (0 included)."""
    fused_switch(True)
    for m in FUSED_ROWS:
        run, reference_in = _fused_case(m, d, r, config, dtype)
        y, grads = run()
        y_ref, g_ref = reference_in(_f64)
        y_base, g_base = reference_in(lambda t: None if t is None else t.detach())
        assert y.dtype == dtype and y.shape == (m, d)
        assert_close_rel(y, y_ref, dtype, f"M={m}: y", baseline=y_base)
        for name, grad in grads.items():
            assert grad.dtype == dtype, f"M={m}: grad {name} is {grad.dtype}"
            assert_close_rel(grad, g_ref[name].reshape(grad.shape), dtype, f"M={m}: grad {name}",
                             baseline=g_base[name])


@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("m,d,r", [(1000, 768, 32), (65, 104, 7), (130, 8, 128)])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fused_path_equals_cublas_path(dtype, m, d, r, config, fused_switch):
    """The fused kernels and the cuBLAS path (PYADAPT_CUDA_FUSED=0) on the same inputs: y and
    every gradient agree within the dtype's tolerance plus the cuBLAS path's own error against
    float64. (The cuBLAS path rounds to the storage type after every step, as eager PyTorch
    does; where that costs more than the tolerance, e.g. ReLU derivatives flipped by rounded
    pre-activations behind a shared layer, or dscale, a sum with heavy cancellation, the two
    paths may differ by as much. A mismatch of semantics differs by far more.)"""
    run, reference_in = _fused_case(m, d, r, config, dtype)
    fused_switch(True)
    y_fused, g_fused = run()
    fused_switch(False)
    y_cublas, g_cublas = run()
    y_ref, g_ref = reference_in(_f64)
    err = rel_err(y_fused, y_cublas)
    assert err <= REL_TOL[dtype] + rel_err(y_cublas, y_ref), f"y: fused vs cuBLAS path {err:.3e}"
    assert g_fused.keys() == g_cublas.keys()
    for name in g_fused:
        err = rel_err(g_fused[name], g_cublas[name])
        want = g_ref[name].reshape(g_cublas[name].shape)
        allowed = REL_TOL[dtype] + rel_err(g_cublas[name], want)
        assert err <= allowed, f"grad {name}: fused vs cuBLAS path {err:.3e} > {allowed:.3e}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fused_kernels_run_where_the_shapes_allow(dtype, fused_switch):
    """The fused kernels run for a supported shape and only then: not with PYADAPT_CUDA_FUSED=0,
    not for r > 128, d not a multiple of 8, float32, or a residual off 16-byte alignment (those
    take the cuBLAS path and still match the float64 reference)."""
    fused_switch(True)
    run, _ = _fused_case(65, 104, 7, FUSED_CONFIGS[1], dtype)
    assert all(_ran_fused(_kernels_launched(run)).values()), "fused kernels did not run"
    fused_switch(False)
    assert not any(_ran_fused(_kernels_launched(run)).values()), "PYADAPT_CUDA_FUSED=0 ignored"

    fused_switch(True)
    # (shared layer, row scales, fixed scale: gradients the cuBLAS path meets the tolerance on)
    for m, d, r, dt in [(65, 100, 7, dtype), (65, 104, 129, dtype), (65, 104, 7, torch.float32)]:
        run, reference_in = _fused_case(m, d, r, FUSED_CONFIGS[3], dt)
        assert not any(_ran_fused(_kernels_launched(run)).values()), (m, d, r, dt)
        y, grads = run()
        y_ref, g_ref = reference_in(_f64)
        assert_close_rel(y, y_ref, dt, f"d={d} r={r} {dt}: y")
        for name, grad in grads.items():
            assert_close_rel(grad, g_ref[name].reshape(grad.shape), dt, f"grad {name}")

    m, d, r = 65, 104, 7
    x, p, res, rs, _ = _bottleneck_inputs(m, d, r, False, True, True, False, True, dtype)
    args = (x, p["down_weight"], p["down_bias"], p["up_weight"], p["up_bias"])
    shifted = _misaligned(res)
    names = _kernels_launched(lambda: bottleneck(*args, residual=shifted, row_scale=rs, scale=0.5))
    assert not _ran_fused(names)[FUSED_KERNELS[0]], "misaligned residual on the fused kernel"
    y = bottleneck(*args, residual=shifted, row_scale=rs, scale=0.5)
    y_ref = reference.bottleneck_forward(*[_f64(t) for t in args], residual=_f64(res), scale=0.5,
                                         row_scale=_f64(rs))
    assert_close_rel(y, y_ref, dtype, "y with a misaligned residual")


@pytest.mark.parametrize("r,config", [(64, FUSED_CONFIGS[1]), (128, FUSED_CONFIGS[2]),
                                      (7, FUSED_CONFIGS[5])])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fused_bit_identical_reruns(dtype, r, config, fused_switch):
    """Two runs of the fused kernels (dropout, learnable scale, row scales): identical bits."""
    fused_switch(True)
    run, _ = _fused_case(1000, 768, r, config, dtype)
    (y1, g1), (y2, g2) = run(), run()
    assert torch.equal(y1, y2), "y differs between runs"
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"grad {name} differs between runs"


# ---------------------------------------------------------------------------------------------
# frozen linear + LoRA / CP / Tucker core

LOWRANK_CASES = [
    # M, d_in, d_out, r1, r2 (None: no core), bias, dropout, after core
    (0, 64, 48, 8, None, True, 0.0, True),
    (1, 40, 24, 1, None, False, 0.0, True),
    (37, 96, 80, 16, 12, True, 0.3, True),
    (130, 200, 72, 33, 33, True, 0.2, False),
    (257, 256, 320, 128, None, False, 0.1, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOWRANK_CASES, ids=lambda c: f"M{c[0]}-r{c[3]}-{c[4]}")
def test_lowrank_forward_backward(case, dtype):
    m, d_in, d_out, r1, r2, has_bias, p_drop, after = case
    x = _rand(m, d_in, dtype=dtype)
    w = _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5)
    b = _rand(d_out, dtype=dtype, scale=0.1) if has_bias else None
    down = _rand(r1, d_in, dtype=dtype, scale=d_in ** -0.5)
    core = _rand(r1, r2, dtype=dtype, scale=r1 ** -0.5) if r2 else None
    up = _rand(d_out, r2 or r1, dtype=dtype, scale=r1 ** -0.5)
    seed = torch.tensor(4321, dtype=torch.int64, device="cuda")
    tensors = [x, w, b, down, core, up]
    leaves = [None if t is None else _leaf(t) for t in tensors]
    assert backend_for("lowrank_forward", "cuda") == "cuda"
    _poison_allocator()
    y = lowrank_linear(*leaves, scale=0.8, dropout_p=p_drop, seed=seed, dropout_after_core=after)
    g = _rand(m, d_out, dtype=dtype)
    present = [t for t in leaves if t is not None]
    _poison_allocator()
    grads = torch.autograd.grad(y, present, g)

    def ref_call(cast):
        args = [cast(t) for t in tensors]
        y_ref = reference.lowrank_linear_forward(*args, scale=0.8, dropout_p=p_drop, seed=seed,
                                                 dropout_after_core=after)
        g_ref = reference.lowrank_linear_backward(cast(g), *args, scale=0.8, dropout_p=p_drop,
                                                  seed=seed, dropout_after_core=after)
        return y_ref, g_ref

    y_ref, g_ref = ref_call(_f64)
    y_base, g_base = ref_call(lambda t: None if t is None else t.detach())
    assert_close_rel(y, y_ref, dtype, "y", baseline=y_base)
    names = ["x", "weight", "bias", "down", "core", "up"]
    keep = [i for i, t in enumerate(tensors) if t is not None]
    _check_grads([names[i] for i in keep], grads, [g_ref[i] for i in keep], dtype,
                 [g_base[i] for i in keep])


# ---------------------------------------------------------------------------------------------
# R-Adapter

RADAPTER_CASES = [
    # M, d_in, d_out, rank (None: full), bias, learnable scale, row_scale
    (0, 64, 48, None, True, True, True),
    (1, 40, 24, 4, False, False, False),
    (37, 96, 80, None, True, True, True),
    (130, 200, 72, 1, True, True, False),
    (257, 128, 320, 128, False, True, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RADAPTER_CASES, ids=lambda c: f"M{c[0]}-r{c[3]}")
def test_radapter_forward_backward(case, dtype):
    m, d_in, d_out, rank, has_bias, learnable, row_scale = case
    x = _rand(m, d_in, dtype=dtype)
    wo = _rand(d_out, d_in, dtype=dtype, scale=d_in ** -0.5)
    bo = _rand(d_out, dtype=dtype, scale=0.1) if has_bias else None
    wf = _rand(d_out, d_out, dtype=dtype, scale=d_out ** -0.5) if rank is None else None
    wd = _rand(rank, d_out, dtype=dtype, scale=d_out ** -0.5) if rank else None
    wu = _rand(d_out, rank, dtype=dtype, scale=rank ** -0.5) if rank else None
    scale = torch.tensor(0.3, dtype=dtype, device="cuda") if learnable else 0.3
    rs = (torch.rand(m, device="cuda") + 0.5).to(dtype) if row_scale else None
    tensors = [x, wo, bo, wf, wd, wu, scale if learnable else None]
    leaves = [None if t is None else _leaf(t) for t in tensors]
    assert backend_for("radapter_forward", "cuda") == "cuda"
    _poison_allocator()
    y = radapter(leaves[0], leaves[1], leaves[2], full_weight=leaves[3], down_weight=leaves[4],
                 up_weight=leaves[5], scale=leaves[6] if learnable else scale, row_scale=rs)
    g = _rand(m, d_out, dtype=dtype)
    present = [t for t in leaves if t is not None]
    _poison_allocator()
    grads = torch.autograd.grad(y, present, g)

    def ref_call(cast):
        sc = cast(scale) if learnable else scale
        args = [cast(t) for t in tensors[:6]]
        y_ref = reference.radapter_forward(*args, scale=sc, row_scale=cast(rs))
        g_ref = reference.radapter_backward(cast(g), *args, scale=sc, row_scale=cast(rs))
        return y_ref, g_ref

    y_ref, g_ref = ref_call(_f64)
    y_base, g_base = ref_call(lambda t: None if t is None else t.detach())
    assert_close_rel(y, y_ref, dtype, "y", baseline=y_base)
    names = ["x", "base_weight", "base_bias", "full_weight", "down_weight", "up_weight", "scale"]
    keep = [i for i, t in enumerate(tensors) if t is not None]
    _check_grads([names[i] for i in keep], grads, [g_ref[i] for i in keep], dtype,
                 [g_base[i] for i in keep])


# ---------------------------------------------------------------------------------------------
# grouped fold

def test_fold_weights_mixed_shapes_and_dtypes():
    shapes = [(48, 64, 8), (1, 1, 1), (97, 33, 5), (320, 128, 128), (7, 200, 3), (0, 16, 4)]
    weights, lefts, rights, scales = [], [], [], []
    for i, (rows, cols, k) in enumerate(shapes):
        dtype = DTYPES[i % len(DTYPES)]
        weights.append(_rand(rows, cols, dtype=dtype))
        lefts.append(_rand(rows, k, dtype=dtype))
        rights.append(_rand(k, cols, dtype=dtype, scale=k ** -0.5))
        scales.append(0.1 * (i + 1))
    assert backend_for("fold_weights", "cuda") == "cuda"
    _poison_allocator()
    out = fold(weights, lefts, rights, scales)
    for i, (w, left, right, s, o) in enumerate(zip(weights, lefts, rights, scales, out)):
        assert o.dtype == w.dtype and o.shape == w.shape
        exact = w.double() + s * (left.double() @ right.double())
        baseline = reference.fold_weight(w, left, right, s)  # float32 accumulation, one rounding
        assert_close_rel(o, exact, w.dtype, f"fold {i}", baseline=baseline)
        if w.dtype != torch.float64:
            # Same accumulation and single rounding as the reference: at most 1 ulp apart.
            assert rel_err(o, baseline) <= REL_TOL[w.dtype]
    assert fold([], [], [], []) == []


# ---------------------------------------------------------------------------------------------
# argument checks of the raw ops (the Python entry points check first; these are the C++ ones)

def test_cuda_ops_check_arguments():
    ops = _native_cuda.ops()
    x = _rand(4, 8, dtype=torch.float32)
    wd, wu = _rand(2, 8, dtype=torch.float32), _rand(8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="up_weight"):
        ops.bottleneck_forward(x, None, wd, None, None, None, wu.t().contiguous(), None, None, 1.0,
                               None, None, "relu", 0.0)
    with pytest.raises(TypeError, match="down_weight"):
        ops.bottleneck_forward(x, None, wd.double(), None, None, None, wu, None, None, 1.0, None,
                               None, "relu", 0.0)
    with pytest.raises(ValueError, match="activation"):
        ops.bottleneck_forward(x, None, wd, None, None, None, wu, None, None, 1.0, None, None,
                               "tanh", 0.0)
    with pytest.raises(TypeError, match="seed"):
        ops.bottleneck_forward(x, None, wd, None, None, None, wu, None, None, 1.0, None, None,
                               "relu", 0.5)
    with pytest.raises(ValueError, match="up"):
        ops.lowrank_forward(x, _rand(6, 8, dtype=torch.float32), None, wd, None,
                            _rand(6, 3, dtype=torch.float32), 1.0, None, 0.0, True)
    with pytest.raises(ValueError, match="full_weight"):
        ops.radapter_forward(x, _rand(6, 8, dtype=torch.float32), None, None, None, None, None,
                             1.0, None)
    with pytest.raises(ValueError, match=r"rights\[0\]"):
        ops.fold_weights([x], [_rand(4, 3, dtype=torch.float32)],
                         [_rand(2, 8, dtype=torch.float32)],
                         torch.ones(1, dtype=torch.float64, device="cuda"))
