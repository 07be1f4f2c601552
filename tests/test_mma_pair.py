"""MMA pair (pyadapt.ops.mma_pair, kernels/mma_pair.py, MultiModalAdapter.both): one layer's
image and text branches, of different widths, sharing the middle projection, in one op:

    y_v = residual_v + scale_v * up_v(act(shared(act(down_v(x_v)))))
    y_t = residual_t + scale_t * up_t(act(shared(act(down_t(x_t)))))

The ground truth is the two branches computed separately by pyadapt.reference in float64
(the gradient of `shared` is the sum of both branches'). Every backend is compared with it,
forward and every gradient; the Triton kernels run under TRITON_INTERPRET=1 on CPU, with every
buffer they allocate poisoned, and must launch ONE forward kernel for both branches.
"""

from __future__ import annotations

import pytest
import torch

import pyadapt
from pyadapt import reference
from pyadapt.ops import bank as bank_ops

from conftest import REL_TOL, assert_close_rel, rel_err, require_native, require_triton

triton = require_triton()
from pyadapt.kernels import mma_pair as K  # noqa: E402

BACKENDS = ["reference", "cpu", "triton"]


def _backend_ready(backend: str) -> None:
    if backend == "cpu":
        require_native()


def make_pair(d_v, d_t, r, dtype, *, bias=True, gen=None):
    def rnd(*shape, std):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    return {"down_v": rnd(r, d_v, std=d_v ** -0.5), "down_b_v": rnd(r, std=0.1) if bias else None,
            "up_v": rnd(d_v, r, std=r ** -0.5), "up_b_v": rnd(d_v, std=0.1) if bias else None,
            "down_t": rnd(r, d_t, std=d_t ** -0.5), "down_b_t": rnd(r, std=0.1) if bias else None,
            "up_t": rnd(d_t, r, std=r ** -0.5), "up_b_t": rnd(d_t, std=0.1) if bias else None,
            "shared_weight": rnd(r, r, std=r ** -0.5), "shared_bias": rnd(r, std=0.1)}


def separate_reference(x_v, x_t, w, *, residual_v, residual_t, scale_v, scale_t, activation):
    """The two branches as two independent reference adapters (autograd sums d shared)."""
    def one(x, res, tag, s):
        return reference.bottleneck_forward(x, w[f"down_{tag}"], w[f"down_b_{tag}"], w[f"up_{tag}"],
                                            w[f"up_b_{tag}"], w["shared_weight"],
                                            w["shared_bias"], residual=res, scale=s,
                                            activation_name=activation)
    return one(x_v, residual_v, "v", scale_v), one(x_t, residual_t, "t", scale_t)


def evaluate(fn, x_v, x_t, w, scales, g_v, g_t):
    """(outputs, gradients by name) of fn(x_v, x_t, w, scale_v, scale_t) with every tensor a
    leaf; learnable scales are 0-dim tensors, fixed ones floats."""
    x_v = x_v.detach().clone().requires_grad_()
    x_t = x_t.detach().clone().requires_grad_()
    w = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in w.items()}
    scales = [s.detach().clone().requires_grad_() if isinstance(s, torch.Tensor) else s
              for s in scales]
    y_v, y_t = fn(x_v, x_t, w, *scales)
    named = {"x_v": x_v, "x_t": x_t, **{k: v for k, v in w.items() if v is not None}}
    for tag, s in zip(("scale_v", "scale_t"), scales):
        if isinstance(s, torch.Tensor):
            named[tag] = s
    loss = (y_v.double() * g_v).sum() + (y_t.double() * g_t).sum()
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    return (y_v.detach(), y_t.detach()), grads


def compare(backend, dtype, *, m_v=70, m_t=33, d_v=40, d_t=24, r=8, bias=True, residual=False,
            learn_scale=False, invariant=False, activation="relu"):
    gen = torch.Generator().manual_seed(3)
    w = make_pair(d_v, d_t, r, dtype, bias=bias, gen=gen)
    x_v = torch.randn(m_v, d_v, generator=gen).to(dtype)
    x_t = torch.randn(m_t, d_t, generator=gen).to(dtype)
    res_v = torch.randn(m_v, d_v, generator=gen).to(dtype) if residual else None
    res_t = torch.randn(m_t, d_t, generator=gen).to(dtype) if residual else None
    scales = [torch.tensor(0.7, dtype=dtype), torch.tensor(1.3, dtype=dtype)] if learn_scale \
        else [0.5, 2.0]
    g_v = torch.randn(m_v, d_v, generator=gen, dtype=torch.float64)
    g_t = torch.randn(m_t, d_t, generator=gen, dtype=torch.float64)

    def op(x_v_, x_t_, w_, s_v, s_t):
        return bank_ops.mma_pair(x_v_, x_t_, w_["down_v"], w_["down_b_v"], w_["up_v"],
                                 w_["up_b_v"], w_["down_t"], w_["down_b_t"], w_["up_t"],
                                 w_["up_b_t"], w_["shared_weight"], w_["shared_bias"],
                                 residual_v=res_v, residual_t=res_t, scale_v=s_v, scale_t=s_t,
                                 activation=activation, grad_scale_invariant=invariant)

    def truth(x_v_, x_t_, w_, s_v, s_t):
        return separate_reference(x_v_, x_t_, w_,
                                  residual_v=None if res_v is None else res_v.double(),
                                  residual_t=None if res_t is None else res_t.double(),
                                  scale_v=s_v, scale_t=s_t, activation=activation)

    with pyadapt.use_backend(backend):
        (y_v, y_t), grads = evaluate(op, x_v, x_t, w, scales, g_v, g_t)
    w64 = {k: None if v is None else v.double() for k, v in w.items()}
    s64 = [s.double() if isinstance(s, torch.Tensor) else s for s in scales]
    (r_v, r_t), grads_ref = evaluate(truth, x_v.double(), x_t.double(), w64, s64, g_v, g_t)
    if invariant:
        # MMA's gradient-scale layers: each branch's parameter gradients (its share of d shared
        # included) divided by that branch's scale; dx unchanged. Branch shares come from
        # back-propagating one branch's output gradient at a time.
        _, only_v = evaluate(truth, x_v.double(), x_t.double(), w64, s64, g_v, g_t * 0)
        _, only_t = evaluate(truth, x_v.double(), x_t.double(), w64, s64, g_v * 0, g_t)
        for k in grads_ref:
            if k in ("x_v", "x_t"):
                continue
            grads_ref[k] = only_v[k] / float(s64[0]) + only_t[k] / float(s64[1])
    assert_close_rel(y_v, r_v, dtype, f"{backend} y_v")
    assert_close_rel(y_t, r_t, dtype, f"{backend} y_t")
    assert set(grads) == set(grads_ref)
    for k, ref in grads_ref.items():
        assert_close_rel(grads[k], ref, dtype, f"{backend} d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_float64(backend, poison_allocations):
    _backend_ready(backend)
    allocated = poison_allocations(K)
    compare(backend, torch.float64, activation="gelu")
    assert backend != "triton" or allocated, "the triton launchers allocate via _new"


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_learnable_scales_residuals_invariant(backend, poison_allocations):
    _backend_ready(backend)
    poison_allocations(K)
    compare(backend, torch.float64, residual=True, learn_scale=True, invariant=True,
            activation="silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_triton_low_precision(dtype, poison_allocations):
    poison_allocations(K)
    compare("triton", dtype, r=32, d_v=130, d_t=48)


@pytest.mark.parametrize("m_v,m_t", [(0, 20), (5, 0), (1, 1)])
def test_pair_triton_small_and_empty(m_v, m_t, poison_allocations):
    poison_allocations(K)
    compare("triton", torch.float64, m_v=m_v, m_t=m_t, r=1, bias=False)


def test_both_is_one_forward_launch(monkeypatch, forbid_launches):
    """MultiModalAdapter.both on triton: one launch of the pair kernel, no single-branch
    bottleneck kernel, and the same result as the two adapters called separately."""
    from pyadapt.kernels import bottleneck as KB
    forbid_launches(KB, "_bottleneck_fwd_kernel")
    launches = []
    real = K._pair_fwd_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(K, "_pair_fwd_kernel", Counting())
    mma = pyadapt.MultiModalAdapter(40, 24, 8, layers=[2], dtype=torch.float64)
    x_v = torch.randn(2, 9, 40, dtype=torch.float64)
    x_t = torch.randn(3, 5, 24, dtype=torch.float64)
    with pyadapt.use_backend("triton"):
        y_v, y_t = mma.both(2, x_v, x_t)
    assert len(launches) == 1, f"expected one forward launch, got {len(launches)}"
    with pyadapt.use_backend("reference"):
        e_v, e_t = mma.vision(2)(x_v), mma.text(2)(x_t)
    assert rel_err(y_v, e_v) <= REL_TOL[torch.float64], "both(): image branch"
    assert rel_err(y_t, e_t) <= REL_TOL[torch.float64], "both(): text branch"


def test_both_gradients_match_separate_adapters():
    torch.manual_seed(0)
    mma = pyadapt.MultiModalAdapter(16, 12, 4, layers=[1], scale=0.01, dtype=torch.float64)
    x_v = torch.randn(2, 3, 16, dtype=torch.float64)
    x_t = torch.randn(4, 12, dtype=torch.float64)
    res_v = torch.randn(2, 3, 16, dtype=torch.float64)
    grads = []
    for call in (lambda: mma.both(1, x_v, x_t, residual_image=res_v),
                 lambda: (mma.vision(1)(x_v, res_v), mma.text(1)(x_t))):
        mma.zero_grad()
        y_v, y_t = call()
        (y_v.square().sum() + y_t.sin().sum()).backward()
        grads.append({k: p.grad.clone() for k, p in mma.named_parameters()})
    for k in grads[1]:
        assert_close_rel(grads[0][k], grads[1][k], torch.float64, f"both() d{k}")


def test_pair_opcheck():
    gen = torch.Generator().manual_seed(4)
    w = make_pair(12, 8, 4, torch.float64, gen=gen)
    w = {k: v.requires_grad_() for k, v in w.items()}
    x_v = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    args = (x_v, None, w["down_v"], w["down_b_v"], w["up_v"], w["up_b_v"], x_t, None, w["down_t"],
            w["down_b_t"], w["up_t"], w["up_b_t"], w["shared_weight"], w["shared_bias"], None,
            0.5, None, 0.25, "relu", True)
    torch.library.opcheck(torch.ops.pyadapt.mma_pair_forward.default, args)


def test_pair_bad_input():
    w = make_pair(12, 8, 4, torch.float32)
    x_v, x_t = torch.randn(3, 12), torch.randn(3, 8)

    def call(**over):
        kw = {**w, **over}
        return bank_ops.mma_pair(over.get("x_v", x_v), over.get("x_t", x_t), kw["down_v"],
                                 kw["down_b_v"], kw["up_v"], kw["up_b_v"], kw["down_t"],
                                 kw["down_b_t"], kw["up_t"], kw["up_b_t"], kw["shared_weight"],
                                 kw["shared_bias"])
    with pytest.raises(ValueError, match=r"down_t.weight: expected shape \(4, 8\)"):
        call(down_t=torch.randn(4, 12))
    with pytest.raises(TypeError, match="x_t: expected dtype"):
        call(x_t=x_t.double())
    with pytest.raises(ValueError, match="shared.weight"):
        call(shared_weight=torch.randn(4, 5))
    with pytest.raises(ValueError, match="bias"):
        call(up_b_t=None)
    mma = pyadapt.MultiModalAdapter(12, 8, 4, layers=[1])
    with pytest.raises(ValueError, match="x_text: expected last dimension 8"):
        mma.both(1, x_v, torch.randn(3, 12))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_pair_clip_shapes(dtype):
    if not torch.cuda.is_available():
        pytest.fail("CUDA is required for @pytest.mark.gpu tests")
    gen = torch.Generator().manual_seed(5)
    w = {k: None if v is None else v.cuda() for k, v in make_pair(768, 512, 32, dtype,
                                                                  gen=gen).items()}
    x_v = torch.randn(16 * 197, 768, generator=gen).to(dtype).cuda()
    x_t = torch.randn(100 * 77, 512, generator=gen).to(dtype).cuda()
    args = [w[k] for k in ("down_v", "down_b_v", "up_v", "up_b_v", "down_t", "down_b_t", "up_t",
                           "up_b_t", "shared_weight", "shared_bias")]
    with pyadapt.use_backend("triton"):
        y_v, y_t = bank_ops.mma_pair(x_v, x_t, *args, scale_v=0.001, scale_t=0.001)
    with pyadapt.use_backend("reference"):
        e_v, e_t = bank_ops.mma_pair(x_v.double(), x_t.double(), *[a.double() for a in args],
                                     scale_v=0.001, scale_t=0.001)
    tol = 1e-3 if dtype == torch.float32 else REL_TOL[dtype]
    assert rel_err(y_v, e_v) <= tol and rel_err(y_t, e_t) <= tol
