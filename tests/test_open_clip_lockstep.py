"""The lockstep forward of an MMA-adapted open_clip CLIP (pa_clip.encode_both / enable_lockstep).

Both towers advance block by block and each MMA index's image and text adapters run in one
pyadapt::mma_pair op. Checked on a tiny open_clip CLIP (2 blocks per tower, width 64): in
float64 the features, logit scale and every adapter gradient equal the sequential model's
(open_clip's own encode_image then encode_text), frozen backbone parameters get no gradient;
one mma_pair_forward / mma_pair_backward per MMA index per step and no single-adapter launch;
the triton backend (interpreter) once; torch.compile(fullgraph=True); checkpoint replay keeps
the option; unsupported models are clear errors that change nothing.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

from conftest import assert_close_rel, require_open_clip

open_clip = require_open_clip()
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402

import pyadapt  # noqa: E402
from pyadapt import _placement  # noqa: E402
from pyadapt.integrations import open_clip as pa_clip  # noqa: E402
from pyadapt.ops import _registry  # noqa: E402

VOCAB = 100


def configs(layers):
    return (CLIPVisionCfg(image_size=32, layers=layers, width=64, patch_size=8, head_width=16),
            CLIPTextCfg(context_length=16, width=64, heads=4, layers=layers, vocab_size=VOCAB))


def tiny_clip(dtype=torch.float64, layers=2) -> CLIP:
    torch.manual_seed(0)
    return CLIP(32, *configs(layers)).to(dtype)


def batch(dtype=torch.float64):
    images = torch.randn(3, 3, 32, 32, dtype=dtype)
    texts = torch.randint(0, VOCAB, (4, 16))
    return images, texts


def randomise_adapters(model: nn.Module) -> None:
    """Fresh non-zero adapter weights (several inits are zero, which would hide mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)


def sequential_and_lockstep(start, end, dtype=torch.float64, layers=2):
    """(sequential model, lockstep model) with the same adapter weights."""
    model = tiny_clip(dtype, layers)
    pa_clip.add_mma(model, start_layer=start, end_layer=end, bottleneck=8, scale=0.01)
    randomise_adapters(model)
    lock = pa_clip.enable_lockstep(copy.deepcopy(model))
    return model, lock


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_of(out, weights):
    """Dense random weights on both features and on the logits (which mix the towers)."""
    img, txt, logit_scale = out
    logits = logit_scale * img @ txt.T
    return (img * weights[0]).sum() + (txt * weights[1]).sum() + (logits * weights[2]).sum()


def random_weights(dtype=torch.float64):
    return [torch.randn(3, 32, dtype=dtype), torch.randn(4, 32, dtype=dtype),
            torch.randn(3, 4, dtype=dtype)]


def assert_backbone_has_no_grad(model):
    adapter_ids = {id(t) for m in model.modules() if isinstance(m, pyadapt._module.AdapterModule)
                   for _, t in m.adapter_tensors()}
    for name, p in model.named_parameters():
        if id(p) not in adapter_ids:
            assert not p.requires_grad, f"backbone parameter {name} is trainable"
            assert p.grad is None, f"backbone parameter {name} received a gradient"


class KernelCalls:
    """Counts calls of the registered kernels of some ops, every backend."""

    def __init__(self, monkeypatch, ops):
        self.calls = collections.Counter()
        for op in ops:
            impls = _registry._kernels[op]
            for name, fn in list(impls.items()):
                def spy(*args, _op=op, _fn=fn, **kwargs):
                    self.calls[_op] += 1
                    return _fn(*args, **kwargs)
                monkeypatch.setitem(impls, name, spy)


SPIED = ("mma_pair_forward", "mma_pair_backward", "bottleneck_forward",
         "bottleneck_forward_saving", "bottleneck_backward")


# ---------------------------------------------------------------------------------------------
# Equality with the sequential model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start,end", [(1, 2), (2, 2), (0, 2)])
def test_lockstep_equals_sequential_in_float64(start, end):
    model, lock = sequential_and_lockstep(start, end)
    assert isinstance(lock, pa_clip.LockstepCLIP) and type(model) is CLIP
    images, texts = batch()
    weights = random_weights()
    out_seq, out_lock = model(images, texts), lock(images, texts)
    loss_of(out_seq, weights).backward()
    loss_of(out_lock, weights).backward()
    for a, b, what in zip(out_lock, out_seq, ("image features", "text features", "logit scale")):
        assert_close_rel(a, b, torch.float64, f"lockstep {what} vs sequential")
    seq, mine = adapter_params(model), adapter_params(lock)
    assert set(seq) == set(mine) and seq
    for name in seq:
        assert mine[name].grad is not None, f"{name}: no gradient in lockstep"
        assert mine[name].grad.abs().sum() > 0, f"{name}: zero gradient (test would be blind)"
        assert_close_rel(mine[name].grad, seq[name].grad, torch.float64,
                         f"gradient of {name}, lockstep vs sequential")
    assert_backbone_has_no_grad(lock)


def test_encode_both_equals_the_encoders_and_eval_mode():
    model, lock = sequential_and_lockstep(0, 2)
    images, texts = batch()
    for normalize in (False, True):
        img, txt = pa_clip.encode_both(model, images, texts, normalize=normalize)
        assert_close_rel(img, model.encode_image(images, normalize), torch.float64,
                         f"encode_both image (normalize={normalize})")
        assert_close_rel(txt, model.encode_text(texts, normalize), torch.float64,
                         f"encode_both text (normalize={normalize})")
    # eval + no_grad: nn.MultiheadAttention may take its fused path; adapter dropout is off in
    # eval, so a non-zero dropout must not change the result either.
    for m in (model, lock):
        m.eval()
        for a in pa_clip.mma_of(m).vision_adapters.values():
            a.dropout = 0.3
    with torch.no_grad():
        for a, b in zip(lock(images, texts), model(images, texts)):
            assert_close_rel(a, b, torch.float64, "lockstep vs sequential in eval, no_grad")


def test_one_tower_calls_and_output_dict_follow_clip():
    model, lock = sequential_and_lockstep(1, 2)
    images, texts = batch()
    img_only, txt_only = lock(images, None), lock(None, texts)
    assert img_only[1] is None and txt_only[0] is None
    assert_close_rel(img_only[0], model(images, None)[0], torch.float64, "image-only call")
    assert_close_rel(txt_only[1], model(None, texts)[1], torch.float64, "text-only call")
    model.output_dict = lock.output_dict = True
    got, want = lock(images, texts), model(images, texts)
    assert set(got) == set(want) == {"image_features", "text_features", "logit_scale"}
    for k in want:
        assert_close_rel(got[k], want[k], torch.float64, f"output_dict {k}")


# ---------------------------------------------------------------------------------------------
# One op per MMA index per step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start,end", [(1, 2), (0, 2)])
def test_one_pair_launch_per_mma_index(monkeypatch, start, end):
    model, lock = sequential_and_lockstep(start, end)
    n = len(pa_clip.mma_of(lock).layers)
    images, texts = batch()
    spies = KernelCalls(monkeypatch, SPIED)
    loss_of(lock(images, texts), random_weights()).backward()
    assert dict(spies.calls) == {"mma_pair_forward": n, "mma_pair_backward": n}, (
        f"lockstep step with {n} MMA indices ran {dict(spies.calls)}")
    spies.calls.clear()
    loss_of(model(images, texts), random_weights()).backward()
    # training forwards: the saving form where the bottleneck op runs on the cpu backend
    forward = ("bottleneck_forward_saving"
               if pyadapt.ops.backend_for("bottleneck_forward", "cpu") == "cpu"
               else "bottleneck_forward")
    assert dict(spies.calls) == {forward: 2 * n, "bottleneck_backward": 2 * n}, (
        f"sequential step ran {dict(spies.calls)}")


def test_triton_backend_under_the_interpreter_once(monkeypatch):
    if "triton" not in pyadapt.ops.available_backends():
        pytest.fail("the triton backend is not available (TRITON_INTERPRET=1 is set by conftest "
                    "without CUDA)")
    model, lock = sequential_and_lockstep(0, 2)
    lock = lock.float()
    images, texts = batch()
    weights = random_weights()
    ran = collections.Counter()
    for op in ("mma_pair_forward", "mma_pair_backward"):
        impl = _registry._kernels[op]["triton"]

        def spy(*args, _op=op, _fn=impl, **kwargs):
            ran[_op] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(_registry._kernels[op], "triton", spy)
    with pyadapt.use_backend("triton"):
        out_lock = lock(images.float(), texts)
        loss_of(out_lock, [w.float() for w in weights]).backward()
    n = len(pa_clip.mma_of(lock).layers)
    assert dict(ran) == {"mma_pair_forward": n, "mma_pair_backward": n}, dict(ran)
    out_seq = model(images, texts)
    loss_of(out_seq, weights).backward()
    for a, b, what in zip(out_lock[:2], out_seq[:2], ("image", "text")):
        assert_close_rel(a, b, torch.float32, f"triton lockstep {what} features vs float64")
    seq, mine = adapter_params(model), adapter_params(lock)
    for name in seq:
        err = ((mine[name].grad.double() - seq[name].grad).norm() / seq[name].grad.norm()).item()
        # float32 through the whole tiny CLIP, as in test_open_clip's float32 MMA check
        assert err <= 1e-4, f"triton lockstep gradient of {name}: relative error {err:.2e}"


def test_fullgraph_compile_of_the_lockstep_forward_and_backward():
    """torch.compile(fullgraph=True) raises on any graph break; compiled equals eager.
    aot_eager traces forward and backward as inductor does but skips its C++ code generation
    (about a minute on the CI's 2 cores; test_open_clip covers inductor on these ops)."""
    torch._dynamo.reset()
    _, lock = sequential_and_lockstep(0, 1, torch.float32, layers=1)
    images, texts = batch(torch.float32)
    weights = random_weights(torch.float32)

    def step(fn):
        lock.zero_grad(set_to_none=True)
        out = fn(images, texts)
        loss_of(out, weights).backward()
        return [o.detach() for o in out] + [p.grad.clone() for p in lock.parameters()
                                            if p.requires_grad]

    eager = step(lambda i, t: lock(i, t))
    got = step(torch.compile(lambda i, t: lock(i, t), fullgraph=True, backend="aot_eager"))
    assert len(got) == len(eager)
    for i, (a, b) in enumerate(zip(got, eager)):
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"compiled output/gradient {i}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Placement replay, switching, errors
# ---------------------------------------------------------------------------------------------

def test_checkpoint_replay_keeps_lockstep(tmp_path):
    from pyadapt.checkpoint import load_adapters, save_adapters

    model = tiny_clip()
    pa_clip.add_mma(model, start_layer=1, bottleneck=8, scale=0.01, lockstep=True)
    randomise_adapters(model)
    assert isinstance(model, pa_clip.LockstepCLIP)
    save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = tiny_clip()
    load_adapters(fresh, tmp_path / "adapters.safetensors")
    assert isinstance(fresh, pa_clip.LockstepCLIP), "the lockstep option was not replayed"
    images, texts = batch()
    for a, b in zip(fresh(images, texts), model(images, texts)):
        assert torch.equal(a, b), "model rebuilt from the checkpoint computes differently"


def test_enable_and_disable_are_recorded_in_the_placement():
    model = tiny_clip()
    pa_clip.add_mma(model, start_layer=1, bottleneck=4)
    (entry,) = _placement.placements(model)
    assert entry["config"]["lockstep"] is False
    pa_clip.enable_lockstep(model)
    assert _placement.placements(model)[0]["config"]["lockstep"] is True
    fresh = tiny_clip()
    _placement.replay(fresh, _placement.placements(model))
    assert isinstance(fresh, pa_clip.LockstepCLIP)
    pa_clip.disable_lockstep(model)
    assert type(model) is CLIP
    assert _placement.placements(model)[0]["config"]["lockstep"] is False


def test_unsupported_models_are_clear_errors_and_change_nothing():
    torch.manual_seed(0)
    custom = CustomTextCLIP(32, *configs(1)).double()
    with pytest.raises(TypeError, match="model: the lockstep forward needs an open_clip"):
        pa_clip.add_mma(custom, start_layer=1, lockstep=True)
    assert not _placement.placements(custom), "a failed call recorded a placement"
    assert all(p.requires_grad for p in custom.parameters()), "a failed call froze parameters"
    pa_clip.add_mma(custom, start_layer=1)
    with pytest.raises(TypeError, match="CustomTextCLIP"):
        pa_clip.enable_lockstep(custom)
    with pytest.raises(TypeError, match="CustomTextCLIP"):
        pa_clip.encode_both(custom, *batch())

    plain = tiny_clip()
    with pytest.raises(ValueError, match="add_mma"):
        pa_clip.enable_lockstep(plain)
    assert type(plain) is CLIP
    with pytest.raises(TypeError, match="lockstep"):
        pa_clip.add_mma(plain, start_layer=1, lockstep="yes")
    assert not _placement.placements(plain)

    model, lock = sequential_and_lockstep(1, 2)
    lock.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="grad_checkpointing"):
        lock(*batch())
    with pytest.raises(TypeError, match="text"):
        pa_clip.encode_both(model, batch()[0], [1, 2, 3])
