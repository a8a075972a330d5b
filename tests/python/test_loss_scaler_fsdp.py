"""DynamicLossScaler under FSDP2 (fully_shard, Gloo, 2 ranks): gradients are
DTensor shards, found_inf is reduced over the mesh, so an inf on one rank's
shard skips the step on every rank."""

import gc
import os
import tempfile

import pytest
import torch
from torch import nn

import deepseek_ext.nn
from deepseek_ext.amp import DynamicLossScaler

from utils import run_ranks

STEPS = 8
PLANT_ON_RANK0 = (2, 5)  # steps whose gradient gets an inf on rank 0's shard only
LINEARS = {"torch": nn.Linear, "ours": deepseek_ext.nn.Linear}


def make(linear):
    torch.manual_seed(0)
    return nn.Sequential(linear(8, 16), nn.LayerNorm(16), nn.GELU(), linear(16, 4))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(STEPS)]


def train(model, opt, scaler, data, plant):
    """Returns the scale after every step; plant(step) may put an inf into a gradient."""
    scales = []
    for step, (x, y) in enumerate(data):
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        plant(step)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
    return scales


def make_opt(model, fused):
    # fused: GradScaler's protocol (grad_scale and found_inf handed to the optimizer's kernel)
    if fused:
        return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _worker(rank, world, init_file, linear_name, fused, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = make(LINEARS[linear_name])
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(model, fused)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**10, growth_interval=3)
    # A LayerNorm's gradient: the scaler checks it (deepseek_ext.nn.Linear's
    # gradients were checked in their GEMMs, before anything could change them).
    weight = model[1].weight

    def plant(step):
        if step in PLANT_ON_RANK0 and rank == 0:
            weight.grad.to_local()[0] = float("inf")  # rank 1's shard stays finite

    data = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches()]
    scales = train(model, opt, scaler, data, plant)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    torch.save({"scales": scales, "skipped": int(scaler.skipped_steps), "params": full},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("linear_name,fused", [("torch", False), ("ours", False), ("torch", True)])
def test_inf_on_one_rank_skips_the_step_on_every_rank(linear_name, fused):
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_worker, linear_name, fused, tmp, world=2, timeout=180)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    # One process, the whole batch, the same steps skipped.
    model = make(nn.Linear)
    opt = make_opt(model, fused)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**10, growth_interval=3)

    def plant(step):
        if step in PLANT_ON_RANK0:
            model[1].weight.grad[0] = float("inf")

    scales = train(model, opt, scaler, batches(), plant)
    for r in ranks:
        assert r["skipped"] == len(PLANT_ON_RANK0)
        assert r["scales"] == scales
        for name, p in model.named_parameters():
            # deepseek_ext.nn.Linear's weight gradients come unscaled from its
            # GEMM: unscaling them again would leave them 2**-10 too small.
            torch.testing.assert_close(r["params"][name], p.detach(), atol=1e-5, rtol=1e-4, msg=name)


def _int8_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import deepseek_ext.distributed as dd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dd.enable_int8_reduce_scatter(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**10, growth_interval=3)
    gen = torch.Generator().manual_seed(rank)
    finite_after_skip = []
    for step in range(STEPS):
        x = torch.randn(8, 64, generator=gen)
        if step in PLANT_ON_RANK0 and rank == 0:
            x[0, 0] = float("inf")  # only rank 0's gradient is non-finite before the int8 reduce-scatter
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        finite_after_skip.append(all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters()))
    torch.save({"skipped": int(scaler.skipped_steps), "scale": scaler.get_scale(), "finite": finite_after_skip},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)


def test_inf_on_one_rank_through_the_int8_reduce_scatter_skips_everywhere():
    # The int8 reduce-scatter (quantize with error feedback, all-to-all, dequantize)
    # must carry the non-finite value to every shard, and must not keep it in its
    # residual: the steps after the skipped one train normally.
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_int8_worker, tmp, world=2, timeout=180)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for r in ranks:
        assert r["skipped"] == len(PLANT_ON_RANK0) and all(r["finite"])
    assert ranks[0]["scale"] == ranks[1]["scale"]
