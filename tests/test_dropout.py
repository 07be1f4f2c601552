"""Counter-based dropout of pyadapt (pyadapt.reference.philox_uniform / dropout_multiplier).

Formula checked:

    u(seed, n)     = Philox4x32-10 keyed by (seed, 0), counter (n mod 2**32, n >> 32, 0, 0);
                     first word as int32, |.| folded (v < 0 -> -v - 1), times 2**-31
                   == triton.language.rand(seed, n), bit for bit, float32 in [0, 1)
    D[i, j]        = 1 / (1 - p)  if u(seed, i * cols + j) >= float32(p)  else 0

so every backend (Triton, C++, reference) draws the same mask and a kernel can regenerate it in
the backward instead of storing it. The bottleneck op applies D to the (M x r) input of `up`.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import pyadapt
from pyadapt import reference
from conftest import rel_err

F64 = torch.float64
SEEDS = [0, 1, 42, 123_456_789, 2**31 - 1]



# ---------------------------------------------------------------------------------------------
# philox_uniform


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_deterministic_and_in_unit_interval(seed):
    offs = torch.arange(5000, dtype=torch.int64)
    u1 = reference.philox_uniform(seed, offs)
    u2 = reference.philox_uniform(torch.tensor(seed, dtype=torch.int64), offs.clone())
    assert u1.dtype == torch.float32, f"philox_uniform dtype {u1.dtype} (want float32)"
    assert u1.shape == offs.shape, f"philox_uniform shape {tuple(u1.shape)} vs offsets"
    assert torch.equal(u1, u2), "philox_uniform(int seed) vs philox_uniform(tensor seed): differ"
    u3 = reference.philox_uniform(seed, offs.to(torch.int32))
    assert torch.equal(u1, u3), "philox_uniform with int32 vs int64 offsets: differ"
    assert u1.min() >= 0.0 and u1.max() < 1.0, (
        f"philox_uniform range [{u1.min():.3g}, {u1.max():.3g}] not inside [0, 1)")
    # each value depends on its own offset only: shape and order of the offsets do not matter
    perm = torch.randperm(offs.numel())
    up = reference.philox_uniform(seed, offs[perm].view(50, 100))
    assert torch.equal(up.reshape(-1), u1[perm]), "philox_uniform(offsets permuted) vs u[perm]"


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1])
def test_philox_is_roughly_uniform(seed):
    n = 2**16
    u = reference.philox_uniform(seed, torch.arange(n, dtype=torch.int64)).double()
    assert abs(u.mean().item() - 0.5) < 0.01, f"mean of {n} uniforms {u.mean():.4f} vs 0.5"
    assert abs(u.var().item() - 1.0 / 12.0) < 0.005, f"variance {u.var():.4f} vs 1/12"
    # Kolmogorov-Smirnov distance to U(0, 1); the 0.1% critical value at n = 65536 is ~0.0076
    s, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=F64)
    ks = torch.maximum(i / n - s, s - (i - 1) / n).max().item()
    assert ks < 0.01, f"KS distance of philox_uniform to U(0,1): {ks:.4f}"
    # and no 1/16 bucket is far off
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    assert (counts - n / 16).abs().max() < 6 * math.sqrt(n / 16), f"bucket counts {counts}"


@pytest.mark.parametrize("pair", [(0, 1), (123, 124), (2**31 - 2, 2**31 - 1)])
def test_philox_changes_with_seed(pair):
    offs = torch.arange(4096, dtype=torch.int64)
    a = reference.philox_uniform(pair[0], offs)
    b = reference.philox_uniform(pair[1], offs)
    same = (a == b).float().mean().item()
    assert same < 0.01, f"seeds {pair}: {same:.2%} of values equal (should be independent)"
    corr = torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()
    assert abs(corr) < 0.1, f"seeds {pair}: correlation {corr:.3f} of the two streams"


@pytest.mark.parametrize("seed", [3, 99991])
def test_philox_changes_with_offset(seed):
    n = 4096
    offs = torch.arange(n, dtype=torch.int64)
    u = reference.philox_uniform(seed, offs)
    assert torch.unique(u).numel() > 0.99 * n, "philox_uniform repeats values across offsets"
    shifted = reference.philox_uniform(seed, offs + 1)
    assert torch.equal(shifted[:-1], u[1:]), "philox_uniform(n + 1) must equal u at offset n + 1"
    assert (shifted != u).float().mean() > 0.99, "philox_uniform(n + 1) vs (n): too many equal"
    # the high 32 bits of the offset are part of the counter
    for hi in (2**32, 2**40, 2**62):
        v = reference.philox_uniform(seed, offs + hi)
        assert (v != u).float().mean() > 0.99, f"offset + {hi:#x} gives the same values as offset"
        assert v.min() >= 0.0 and v.max() < 1.0, f"offset + {hi:#x}: values outside [0, 1)"


# ---------------------------------------------------------------------------------------------
# dropout_multiplier


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rows,cols", [(300, 32), (1, 7), (777, 3)])
def test_dropout_multiplier_values_and_keep_fraction(dtype, p, rows, cols):
    seed = 2024
    D = reference.dropout_multiplier(seed, rows, cols, p, dtype, "cpu")
    assert D.shape == (rows, cols) and D.dtype == dtype, f"mask shape/dtype {D.shape} {D.dtype}"
    kept_value = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    values = set(torch.unique(D).tolist())
    assert values <= {0.0, kept_value.item()}, f"mask values {values} vs {{0, 1/(1-p)}}"
    # element (i, j) keeps iff u(seed, i * cols + j) >= float32(p)
    offsets = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    u = reference.philox_uniform(seed, offsets)
    keep = u >= torch.tensor(p, dtype=torch.float32)
    assert torch.equal(D != 0, keep), "mask keeps exactly where philox_uniform >= p"
    n = rows * cols
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, (
        f"keep fraction {frac:.4f} vs 1 - p = {1 - p:.2f} ({n} elements)")


def test_dropout_multiplier_p_zero_and_determinism():
    D0 = reference.dropout_multiplier(5, 40, 9, 0.0, F64, "cpu")
    assert torch.equal(D0, torch.ones(40, 9, dtype=F64)), "p = 0: mask must be all ones"
    a = reference.dropout_multiplier(5, 200, 16, 0.3, F64, "cpu")
    b = reference.dropout_multiplier(torch.tensor(5), 200, 16, 0.3, F64, "cpu")
    c = reference.dropout_multiplier(6, 200, 16, 0.3, F64, "cpu")
    assert torch.equal(a, b), "same seed: the mask must be identical"
    assert (a != c).float().mean() > 0.2, "different seeds: masks should differ in many places"
    big = reference.dropout_multiplier(5, 400, 16, 0.3, F64, "cpu")
    assert torch.equal(big[:200], a), "the mask of the first rows does not depend on M"


# ---------------------------------------------------------------------------------------------
# Bit-equality with Triton's own generator (tl.rand), in the interpreter on CPU

_KERNELS = {}


def _triton_kernels():
    """Import triton (a declared dependency: failing here fails the test) and build the kernels.
    Kernels are defined with `tl` as a module global, which the interpreter patches."""
    if _KERNELS:
        return _KERNELS
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def rand_arange(out_ptr, seed, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < N)

    @triton.jit
    def rand_loaded(out_ptr, off_ptr, seed_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        offs = tl.load(off_ptr + i, mask=m, other=0)
        seed = tl.load(seed_ptr)
        tl.store(out_ptr + i, tl.rand(seed, offs), mask=m)

    @triton.jit
    def keep_mask(out_ptr, seed, p, rows, cols, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < rows * cols
        r = i // cols
        c = i % cols
        keep = tl.rand(seed, r * cols + c) >= p
        tl.store(out_ptr + i, keep.to(tl.int8), mask=m)

    _KERNELS.update(rand_arange=rand_arange, rand_loaded=rand_loaded, keep_mask=keep_mask,
                    triton=triton)
    return _KERNELS


def _device():
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    assert interp or torch.cuda.is_available(), (
        "TRITON_INTERPRET must be 1 (tests/conftest.py sets it) or a GPU must be present")
    return "cpu" if interp else "cuda"


@pytest.mark.parametrize("seed", SEEDS + ["random"])
def test_triton_rand_bit_equal_reference(seed):
    k = _triton_kernels()
    dev = _device()
    if seed == "random":
        seed = int(torch.randint(0, 2**31, ()).item())
    n, block = 3000, 512
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
    k["rand_arange"][(k["triton"].cdiv(n, block),)](out, seed, n, BLOCK=block)
    want = reference.philox_uniform(seed, torch.arange(n, dtype=torch.int64))
    mism = (out.cpu() != want).sum().item()
    assert mism == 0, f"tl.rand(seed={seed}, 0..{n - 1}) vs reference: {mism} values differ"


@pytest.mark.parametrize("seed", [0, 17, 2**31 - 1])
def test_triton_rand_int64_offsets_and_loaded_seed(seed):
    k = _triton_kernels()
    dev = _device()
    offs = torch.cat([
        torch.arange(200, dtype=torch.int64),
        torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**33 + 12345, 3 * 2**40 + 7, 2**62 + 99,
                      2**63 - 1]),
        torch.randint(2**32, 2**50, (100,), dtype=torch.int64),
    ])
    n = offs.numel()
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=dev)
    k["rand_loaded"][(k["triton"].cdiv(n, 128),)](out, offs.to(dev), seed_t, n, BLOCK=128)
    want = reference.philox_uniform(seed, offs)
    bad = (out.cpu() != want).nonzero().flatten()
    assert bad.numel() == 0, (
        f"tl.rand(int64 seed {seed}, int64 offsets) vs reference differ at offsets {offs[bad][:5]}")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_triton_keep_mask_equals_dropout_multiplier(p):
    k = _triton_kernels()
    dev = _device()
    rows, cols, seed = 70, 13, 31337
    out = torch.full((rows * cols,), -1, dtype=torch.int8, device=dev)
    k["keep_mask"][(k["triton"].cdiv(rows * cols, 256),)](out, seed, p, rows, cols, BLOCK=256)
    D = reference.dropout_multiplier(seed, rows, cols, p, F64, "cpu")
    assert torch.equal(out.cpu().view(rows, cols).bool(), D != 0), (
        "Triton keep mask (tl.rand >= p) vs reference.dropout_multiplier")


# ---------------------------------------------------------------------------------------------
# Dropout inside the bottleneck op and FusedAdapter


def _hand_delta(x, wd, bd, wu, bu, D, scale):
    h = torch.relu(x @ wd.T + bd) * D
    return scale * (h @ wu.T + bu)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("M,d,r", [(64, 32, 8), (1, 8, 1), (65, 100, 7)])
def test_op_dropout_uses_seeded_mask(dtype, M, d, r):
    x = torch.randn(M, d, dtype=dtype)
    wd, bd = torch.randn(r, d, dtype=dtype) / math.sqrt(d), 0.2 * torch.randn(r, dtype=dtype)
    wu, bu = torch.randn(d, r, dtype=dtype) / math.sqrt(r), 0.2 * torch.randn(d, dtype=dtype)
    p, seed = 0.35, 77
    y = pyadapt.ops.bottleneck(x, wd, bd, wu, bu, scale=0.9, dropout_p=p,
                               seed=torch.tensor(seed, dtype=torch.int64))
    D = reference.dropout_multiplier(seed, M, r, p, F64, "cpu")
    want = x.double() + _hand_delta(x.double(), wd.double(), bd.double(), wu.double(),
                                    bu.double(), D, 0.9)
    tol = 1e-12 if dtype == F64 else 1e-5
    err = rel_err(y, want)
    assert err <= tol, f"op with dropout seed {seed} vs hand formula with its mask: {err:.2e}"
    y2 = pyadapt.ops.bottleneck(x, wd, bd, wu, bu, scale=0.9, dropout_p=p,
                                seed=torch.tensor(seed, dtype=torch.int64))
    assert torch.equal(y, y2), "same seed: the op output must be identical"
    if M * r >= 64:
        y3 = pyadapt.ops.bottleneck(x, wd, bd, wu, bu, scale=0.9, dropout_p=p,
                                    seed=torch.tensor(seed + 1, dtype=torch.int64))
        assert rel_err(y3 - x, y - x) > 1e-3, "a different seed must give a different mask"


def _mask_probe(d, r, p):
    """FusedAdapter whose output exposes the mask: identity activation, up = [I_r; 0], no biases,
    scale 1, so (y - x)[:, :r] = (x W_d^T) * D."""
    a = pyadapt.FusedAdapter(d, r, activation="identity", bias=False, scale=1.0, dropout=p,
                             init="bert").double()
    with torch.no_grad():
        a.down.weight.normal_(0.0, 1.0 / math.sqrt(d))
        a.up.weight.zero_()
        a.up.weight[:r].copy_(torch.eye(r, dtype=F64))
    return a


def _recover_mask(a, x, y):
    r = a.bottleneck
    h = x.detach() @ a.down.weight.detach().T
    return (y.detach() - x.detach())[:, :r] / h


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_module_dropout_train_eval_and_fresh_masks(p):
    M, d, r = 500, 24, 8
    a = _mask_probe(d, r, p)
    x = torch.randn(M, d, dtype=F64)
    a.train()
    D1 = _recover_mask(a, x, a(x))
    D2 = _recover_mask(a, x, a(x))
    kept = 1.0 / (1.0 - p)
    for D in (D1, D2):
        dev = torch.minimum((D - 0.0).abs(), (D - kept).abs()).max().item()
        assert dev < 1e-9, f"train-mode mask values deviate from {{0, 1/(1-p)}} by {dev:.2e}"
        frac = (D > 0.5 * kept).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / D.numel())
        assert abs(frac - (1 - p)) < 5 * sigma, f"train-mode keep fraction {frac:.3f} vs {1 - p}"
    assert ((D1 > 0.5 * kept) != (D2 > 0.5 * kept)).any(), (
        "two training forward passes drew the same dropout mask")
    a.eval()
    D0 = _recover_mask(a, x, a(x))
    err = (D0 - 1.0).abs().max().item()
    assert err < 1e-9, f"eval mode must not drop: recovered factors deviate from 1 by {err:.2e}"


def test_module_dropout_backward_uses_forward_mask():
    M, d, r, p = 300, 20, 6, 0.4
    a = _mask_probe(d, r, p)
    a.train()
    x = torch.randn(M, d, dtype=F64, requires_grad=True)
    y = a(x)
    kept = 1.0 / (1.0 - p)
    D = _recover_mask(a, x, y)
    D = torch.where(D > 0.5 * kept, torch.full_like(D, kept), torch.zeros_like(D))
    g = torch.randn(M, d, dtype=F64)
    y.backward(g)
    # hand gradients of y = x + ((x W_d^T) * D) W_u^T with this very mask, W_u = [I; 0]
    wd = a.down.weight.detach().clone().requires_grad_(True)
    wu = a.up.weight.detach().clone().requires_grad_(True)
    xl = x.detach().clone().requires_grad_(True)
    (xl + ((xl @ wd.T) * D) @ wu.T).backward(g)
    for name, got, want in (("x", x.grad, xl.grad), ("down.weight", a.down.weight.grad, wd.grad),
                            ("up.weight", a.up.weight.grad, wu.grad)):
        err = rel_err(got, want)
        assert err <= 1e-12, (
            f"train-mode d{name} vs hand gradient with the forward's mask: {err:.2e}")


def test_module_dropout_empty_input():
    a = pyadapt.FusedAdapter(16, 4, dropout=0.3, init="bert").double().train()
    x = torch.randn(0, 16, dtype=F64, requires_grad=True)
    y = a(x)
    assert y.shape == (0, 16), f"dropout with M = 0: output shape {tuple(y.shape)}"
    y.sum().backward()
    assert torch.count_nonzero(a.down.weight.grad) == 0, "dropout with M = 0: d down.weight != 0"
