"""pyadapt.save_adapters / load_adapters: adapter checkpoints in safetensors.

    file    = every adapter tensor (adapter_state_dict names) + "ema:<name>" EMA shadows
              + JSON header {pyadapt version, placements, adapter configs}
    load    into a model with the same adapters: copy; into a fresh backbone: replay the
            placements, then copy. Any mismatch (name, shape, adapter config, folded model) is a
            ValueError naming the tensor, raised before anything changes.

Round trips are checked bit for bit (values and dtypes) and by the model's outputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pyadapt
from pyadapt import _placement
from pyadapt.checkpoint import load_adapters, read_header, save_adapters
from pyadapt.inject import inject
from test_inject import TinyBert, TinyViT, randomize_adapters

F64 = torch.float64

KINDS = {
    "lora": (r"attn\.qkv$", "lora", {"rank": 3, "alpha": 5.0}),
    "r-adapter full": (r"mlp\.fc2$", "r-adapter", {"rank": None, "eval_scale": 0.6}),
    "r-adapter low rank": (r"attn\.proj$", "r-adapter", {"rank": 2, "learn_scale": False,
                                                         "scale": 0.25}),
    "cp tucker": (r"attn\.proj$", "cp", {"rank": 4}),
    "cp diagonal": (r"mlp\.fc\d$", "cp", {"rank": 3, "core": "cp"}),
    "bottleneck": (r"^blocks\.\d+$", "bottleneck", {"bottleneck": 3, "scale": 0.2}),
    "bottleneck learned scale": (r"^blocks\.1$", "bottleneck", {"bottleneck": 2,
                                                                  "learn_scale": True}),
}


def state_snapshot(model):
    """Everything load_adapters could touch: module tree, parameter values and flags, buffers."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()},
            _placement.placements(model))


def assert_unchanged(model, before):
    after = state_snapshot(model)
    assert after[0] == before[0], "module tree changed"
    assert after[1].keys() == before[1].keys(), "parameter names changed"
    for n, (flag, value) in after[1].items():
        assert flag == before[1][n][0], f"{n}: requires_grad changed"
        assert torch.equal(value, before[1][n][1]), f"{n}: value changed"
    assert after[2].keys() == before[2].keys()
    assert after[3] == before[3], "placement records changed"


def trained_model(kind, dtype=F64):
    """A backbone (kept untouched for loading into) and a copy with random adapters."""
    backbone = TinyViT(dtype=dtype)
    model = copy.deepcopy(backbone)
    pattern, adapter, kwargs = KINDS[kind]
    inject(model, pattern, adapter, **kwargs)
    randomize_adapters(model)
    return backbone, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_into_fresh_backbone(tmp_path, kind, dtype):
    backbone, model = trained_model(kind, dtype)
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    result = load_adapters(backbone, path)
    assert result.rebuilt and result.missing == [] and result.unexpected == []
    want, got = pyadapt.adapter_state_dict(model), pyadapt.adapter_state_dict(backbone)
    assert list(got) == list(want), "same adapter tensors, same names"
    for name in want:
        assert got[name].dtype == want[name].dtype == dtype, f"{name}: dtype preserved"
        assert torch.equal(got[name], want[name]), f"{name}: bit-identical after the round trip"
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == set(want)
    model.eval()
    backbone.eval()
    x = torch.randn(2, 5, 12, dtype=dtype)
    assert torch.equal(backbone(x), model(x)), "the loaded model computes what the saved one did"
    assert _placement.placements(backbone) == _placement.placements(model)


def test_round_trip_into_model_with_adapters_and_header(tmp_path):
    backbone, model = trained_model("lora")
    inject(model, r"^blocks\.0$", "bottleneck", bottleneck=2)
    randomize_adapters(model)
    path = tmp_path / "a.safetensors"
    header = save_adapters(model, path, metadata={"run": "test", "step": 7})
    assert read_header(path) == json.loads(json.dumps(header))
    assert header["pyadapt_version"] == pyadapt.__version__
    assert [p["config"]["adapter"] for p in header["placements"]] == ["lora", "bottleneck"]
    assert header["adapters"]["blocks.0.attn.qkv"]["function"] == {
        "class": "LowRankAdapter", "rank": 3, "alpha": 5.0}
    assert header["user"] == {"run": "test", "step": 7} and header["replayable"]
    from safetensors.torch import load_file
    stored = load_file(str(path))
    assert set(stored) == set(pyadapt.adapter_state_dict(model)), "adapter tensors only"

    target = copy.deepcopy(backbone)
    inject(target, r"attn\.qkv$", "lora", rank=3, alpha=5.0)
    inject(target, r"^blocks\.0$", "bottleneck", bottleneck=2)
    result = load_adapters(target, path)
    assert not result.rebuilt
    for k, v in pyadapt.adapter_state_dict(model).items():
        assert torch.equal(pyadapt.adapter_state_dict(target)[k], v), k


def test_cp_shared_tensors_stay_shared_after_rebuild(tmp_path):
    backbone, model = trained_model("cp tucker")
    save_adapters(model, tmp_path / "cp.safetensors")
    load_adapters(backbone, tmp_path / "cp.safetensors")
    a, b = backbone.blocks[0].attn.proj, backbone.blocks[1].attn.proj
    assert a.U is b.U and a.V is b.V and a.C is b.C
    assert torch.equal(a.U, model.blocks[0].attn.proj.U)


def test_ema_shadows_round_trip(tmp_path):
    backbone, model = trained_model("r-adapter full")
    ema = pyadapt.AdapterEMA(model, momentum=0.5)
    randomize_adapters(model)
    ema.update()     # shadows now differ from the live tensors
    path = tmp_path / "ema.safetensors"
    save_adapters(model, path)
    result = load_adapters(backbone, path)
    assert result.ema_loaded == [] and result.ema_skipped == sorted(ema.state_dict())
    fresh_ema = pyadapt.AdapterEMA(backbone, momentum=0.5)
    fresh_ema.load_state_dict(result.ema_state)
    for k, v in ema.state_dict().items():
        assert torch.equal(fresh_ema.state_dict()[k], v), f"EMA {k}"
        assert not torch.equal(v, pyadapt.adapter_state_dict(model)[k]), "test needs distinct EMA"

    # A model that already has an AdapterEMA gets the shadows directly.
    with torch.no_grad():
        for t in fresh_ema.state_dict().values():
            t.zero_()
    result = load_adapters(backbone, path)
    assert result.ema_loaded == sorted(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(fresh_ema.state_dict()[k], v), f"EMA {k} loaded in place"

    save_adapters(model, tmp_path / "no_ema.safetensors", ema=False)
    from safetensors.torch import load_file
    assert not any(k.startswith("ema:") for k in load_file(str(tmp_path / "no_ema.safetensors")))


def test_wrong_shape_names_the_tensor_and_changes_nothing(tmp_path):
    _, model = trained_model("lora")
    path = tmp_path / "r3.safetensors"
    save_adapters(model, path)
    # Same kind, other rank: the config check would catch it first, so compare shapes by
    # loading into a model whose rank matches but width does not.
    other = TinyViT(d=24)
    inject(other, r"attn\.qkv$", "lora", rank=3, alpha=5.0)
    before = state_snapshot(other)
    with pytest.raises(ValueError) as err:
        load_adapters(other, path)
    msg = str(err.value)
    assert "blocks.0.attn.qkv.down_weight" in msg and "(3, 16)" in msg and "(3, 24)" in msg
    assert_unchanged(other, before)

    # Rebuild path: the adapters re-attached for the load are removed again.
    fresh = TinyViT(d=24)
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=r"shape"):
        load_adapters(fresh, path)
    assert_unchanged(fresh, before)
    assert not any(isinstance(m, pyadapt.LowRankAdapter) for m in fresh.modules())
    fresh(torch.randn(1, 2, 12, dtype=F64))  # still a working plain backbone


def test_failed_rebuild_removes_appended_adapters_and_hooks(tmp_path):
    _, model = trained_model("bottleneck")
    save_adapters(model, tmp_path / "b.safetensors")
    fresh = TinyViT(d=24)
    x = torch.randn(2, 3, 12, dtype=F64)
    want = fresh(x)
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="in_features=24 in the model but in_features=16"):
        load_adapters(fresh, tmp_path / "b.safetensors")
    assert_unchanged(fresh, before)
    assert all(len(b._forward_hooks) == 0 for b in fresh.blocks), "replayed hooks removed"
    assert torch.equal(fresh(x), want)


def test_config_mismatch_is_refused(tmp_path):
    _, model = trained_model("lora")
    save_adapters(model, tmp_path / "a.safetensors")
    other = TinyViT()
    inject(other, r"attn\.qkv$", "lora", rank=3, alpha=7.0)
    before = state_snapshot(other)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.*alpha=7.0.*alpha=5.0"):
        load_adapters(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)


def test_strict_missing_and_unexpected(tmp_path):
    _, model = trained_model("lora")
    save_adapters(model, tmp_path / "a.safetensors")
    other = TinyViT()
    inject(other, r"attn\.qkv$", "lora", rank=3, alpha=5.0)
    inject(other, r"mlp\.fc1$", "lora", rank=2)
    before = state_snapshot(other)
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.0.mlp.fc1.down_weight'"):
        load_adapters(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)
    result = load_adapters(other, tmp_path / "a.safetensors", strict=False)
    assert len(result.missing) == 4 and result.unexpected == []
    assert torch.equal(other.blocks[1].attn.qkv.up_weight, model.blocks[1].attn.qkv.up_weight)


def test_folded_models(tmp_path):
    _, model = trained_model("r-adapter full")
    unfolded = pyadapt.adapter_state_dict(model)
    unfolded = {k: v.clone() for k, v in unfolded.items()}
    pyadapt.fold_(model)
    # Saving a folded model is allowed: folding never changes adapter tensors.
    save_adapters(model, tmp_path / "folded.safetensors")
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "folded.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in unfolded.items())
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="folded"):
        load_adapters(model, tmp_path / "folded.safetensors")
    assert_unchanged(model, before)
    pyadapt.unfold_(model)
    load_adapters(model, tmp_path / "folded.safetensors")


def test_unreplayable_injection(tmp_path):
    backbone = TinyBert()
    model = copy.deepcopy(backbone)
    inject(model, lambda name, m: name.endswith("intermediate.dense"), "lora", rank=2)
    randomize_adapters(model)
    path = tmp_path / "opaque.safetensors"
    with pytest.warns(UserWarning, match="tensors only"):
        header = save_adapters(model, path)
    assert header["replayable"] is False
    before = state_snapshot(backbone)
    with pytest.raises(ValueError, match="cannot rebuild"):
        load_adapters(backbone, path)
    assert_unchanged(backbone, before)
    inject(backbone, r"intermediate\.dense$", "lora", rank=2)
    load_adapters(backbone, path)
    for k, v in pyadapt.adapter_state_dict(model).items():
        assert torch.equal(pyadapt.adapter_state_dict(backbone)[k], v)


def test_bad_inputs(tmp_path):
    _, model = trained_model("lora")
    with pytest.raises(TypeError, match="model"):
        save_adapters("model", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no pyadapt adapter"):
        save_adapters(TinyViT(), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="metadata"):
        save_adapters(model, tmp_path / "x.safetensors", metadata={"f": object()})
    with pytest.raises(TypeError, match="model"):
        load_adapters(None, tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a pyadapt adapter checkpoint"):
        load_adapters(model, tmp_path / "plain.safetensors")
    save_adapters(model, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="rebuild=False"):
        load_adapters(TinyViT(), tmp_path / "ok.safetensors", rebuild=False)
