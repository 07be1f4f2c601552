"""Data-parallel training of a tiny open_clip model carrying pyadapt adapters, 2 CPU processes
(gloo), each taking half of the global batch (float64):
- DistributedDataParallel with MMA, R-Adapter, bottleneck and LoRA adapters;
- FSDP2 (`fully_shard` of the whole model) with MMA, R-Adapter (fixed scale), bottleneck and
  CP adapters.
The synchronised adapter gradients equal the gradients of one process running the whole global
batch (each rank's loss is scaled by the world size, since both average over ranks); frozen
backbone parameters get no gradient on any rank. Both runs share one spawn (it costs most of
the time: every process imports torch and open_clip)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import require_open_clip

require_open_clip()

WORLD = 2
GLOBAL_BATCH = 4


def _adapted_tiny_clip(fsdp: bool):
    """FSDP2 shards no 0-d parameter: the R-Adapter scale is then a fixed float (RAdapter's
    learnable scale is a 0-d Parameter) and open_clip's own logit_scale is left out of the
    sharding. Parameters shared between blocks (MMA's shared projection, CP's factors) are
    why the whole model, not each block, is one FSDP unit."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from pyadapt.integrations import open_clip as pa_clip

    torch.manual_seed(0)
    model = CLIP(16, CLIPVisionCfg(image_size=16, layers=2, width=32, patch_size=8,
                                   head_width=16),
                 CLIPTextCfg(context_length=8, width=32, heads=2, layers=2, vocab_size=50))
    model = model.double()
    pa_clip.add_mma(model, start_layer=1, bottleneck=8, scale=0.01)
    pa_clip.add_r_adapter(model, rank=4, learn_scale=not fsdp)
    pa_clip.add_bottleneck(model, bottleneck=4)
    if fsdp:
        pa_clip.add_lowrank(model, rank=4, kind="cp", dropout=0.0, sites=["mlp.c_fc"])
    else:
        pa_clip.add_lowrank(model, rank=4, kind="lora", sites=["mlp.c_fc"])
    with torch.no_grad():  # non-zero adapters (some inits are zero)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def _global_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    texts = torch.randint(0, 50, (GLOBAL_BATCH, 8), generator=g)
    weights = torch.randn(2, GLOBAL_BATCH, 16, generator=g, dtype=torch.float64)
    return images, texts, weights


def _loss(model, images, texts, weights):
    """A sum of per-sample terms, so the global loss is the sum of the ranks' local losses.
    Goes through model(...) (CLIP.forward: normalised features) so DDP's reducer sees it."""
    img, txt, _ = model(images, texts)
    return (img * weights[0]).sum() + (txt * weights[1]).sum()


def _local_backward(model, rank):
    images, texts, weights = _global_batch()
    part = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    (WORLD * _loss(model, images[part], texts[part], weights[:, part])).backward()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model = _adapted_tiny_clip(fsdp=False)
        _local_backward(torch.nn.parallel.DistributedDataParallel(model), rank)
        grads = {n: None if p.grad is None else p.grad.clone()
                 for n, p in model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"ddp{rank}.pt"))

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = _adapted_tiny_clip(fsdp=True)
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)),
                    ignored_params={model.logit_scale})
        _local_backward(model, rank)
        # full_tensor() gathers the shards: a collective, so every rank runs it for every grad.
        grads = {n: None if p.grad is None else
                 (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone())
                 for n, p in model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_grads(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _check_against_single_process(out, prefix: str, fsdp: bool) -> None:
    model = _adapted_tiny_clip(fsdp)
    _loss(model, *_global_batch()).backward()
    single = {n: p.grad for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    nonzero = [n for n in trainable if single[n].abs().max() > 0]
    assert len(nonzero) >= 0.9 * len(trainable), "too few non-zero gradients to compare"
    for rank in range(WORLD):
        grads = torch.load(out / f"{prefix}{rank}.pt")
        assert set(grads) == set(single), f"rank {rank}: different parameter names"
        for n, g in grads.items():
            if n not in trainable:
                assert g is None, f"{prefix} rank {rank}: frozen {n} received a gradient"
                continue
            assert g is not None, f"{prefix} rank {rank}: {n} has no gradient"
            assert torch.allclose(g, single[n], rtol=1e-10, atol=1e-13), (
                f"{prefix} rank {rank}: gradient of {n} differs from one process: max abs "
                f"difference {(g - single[n]).abs().max().item():.2e}")


def test_ddp_gradients_equal_single_process_over_the_global_batch(distributed_grads):
    _check_against_single_process(distributed_grads, "ddp", fsdp=False)


def test_fsdp2_gradients_equal_single_process_over_the_global_batch(distributed_grads):
    _check_against_single_process(distributed_grads, "fsdp", fsdp=True)
