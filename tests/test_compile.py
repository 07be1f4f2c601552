"""torch.compile(fullgraph=True) of a small model using each pyadapt module traces without a
single graph break (fullgraph raises on one) and gives the eager outputs and gradients
(CPU inductor). Random draws use inductor's fallback_random so dropout masks match eager."""

import pytest
import torch
from torch import nn

import pyadapt


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)


def _models():
    r = pyadapt.RAdapter(nn.Linear(24, 24), rank=4, drop_prob=0.25)
    mma = pyadapt.MultiModalAdapter(24, 16, bottleneck=8, layers=[1])
    cp = pyadapt.CPAdapter([nn.Linear(16, 16), nn.Linear(16, 32)], rank=4, dropout=0.2)
    return {
        "FusedAdapter": (pyadapt.FusedAdapter(24, 8, activation="gelu", dropout=0.1,
                                              learn_scale=True), (2, 5, 24)),
        "MultiModalAdapter": (mma.vision(1), (2, 5, 24)),
        "RAdapter": (nn.Sequential(nn.Linear(24, 24), r), (2, 5, 24)),
        "LowRankAdapter": (pyadapt.LowRankAdapter(nn.Linear(24, 20), rank=4, dropout=0.1),
                           (2, 5, 24)),
        "CPAdapter": (nn.Sequential(cp[0], nn.GELU(), cp[1]), (2, 5, 16)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_fullgraph_compile_matches_eager(name):
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):
        _check_compiled_equals_eager(name)


def _check_compiled_equals_eager(name):
    torch._dynamo.reset()
    model, shape = _models()[name]
    _randomise(model)
    x = torch.randn(shape)
    compiled = torch.compile(model, fullgraph=True)

    def run(fn):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1234)
        y = fn(xi)
        y.square().sum().backward()
        return y.detach(), [xi.grad] + [p.grad.clone() for p in model.parameters()
                                         if p.requires_grad]

    y_eager, g_eager = run(model)
    y_comp, g_comp = run(compiled)
    assert torch.allclose(y_comp, y_eager, rtol=1e-5, atol=1e-6), f"{name}: outputs differ"
    for i, (a, b) in enumerate(zip(g_comp, g_eager)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"{name}: gradient {i} differs"


def test_fullgraph_compile_of_the_loss():
    torch._dynamo.reset()
    loss = pyadapt.MPMNCELoss(temperature=0.05)
    img, txt = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    compiled = torch.compile(loss, fullgraph=True)
    eager = loss(img, txt, labels)
    got = compiled(img, txt, labels)
    assert torch.allclose(got, eager, rtol=1e-5), "compiled MPM-NCE loss differs from eager"
    g_eager = torch.autograd.grad(eager, [img, txt])
    g_comp = torch.autograd.grad(got, [img, txt])
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), "compiled loss gradient differs"
