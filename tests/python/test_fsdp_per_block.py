"""FSDP2 sharded per block on models whose blocks share modules: every sharing
plan of SharedAttentionTransformer trains as one process does."""

import copy
import os
import tempfile

import pytest
import torch
from torch import nn

from deepseek_ext.distributed import fully_shard_per_block, modules_shared_by_blocks
from deepseek_ext.nn import SharedAttentionTransformer

from utils import finish_rank, run_ranks, sgd_logsumexp_steps

# (sharing, n_unique, share_ffn, embed_dim): every plan, shared FFNs, a factorised embedding.
PLANS = [("none", None, False, None), ("all", None, False, None), ("sequence", 2, False, None),
         ("cycle", 2, False, 8), ("cycle_reverse", 2, True, None)]


def make(plan):
    sharing, n_unique, share_ffn, embed_dim = plan
    return SharedAttentionTransformer(50, 16, 4, 2, 32, 8, sharing=sharing, n_unique=n_unique,
                                      share_ffn=share_ffn, embed_dim=embed_dim)


def _worker(rank, world, init_file, states, batches, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = []
    for plan, state in zip(PLANS, states):
        model = make(plan)
        model.load_state_dict(state)
        fully_shard_per_block(model, mesh=mesh)
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        sgd_logsumexp_steps(model, [b.chunk(world)[rank] for b in batches])
        results.append((units, {n: p.full_tensor() for n, p in model.named_parameters()}))
        del model
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "fsdp.pt"))
    finish_rank()


def test_every_sharing_plan_sharded_per_block_matches_one_process():
    torch.manual_seed(0)
    models = [make(plan) for plan in PLANS]
    states = [copy.deepcopy(m.state_dict()) for m in models]
    batches = [torch.randint(0, 50, (4, 6)) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_worker, states, batches, tmp, timeout=180)
        results = torch.load(os.path.join(tmp, "fsdp.pt"))
    for plan, model, (units, params) in zip(PLANS, models, results):
        shared = modules_shared_by_blocks(model.layers)
        # A unit per shared module, per block, and the root.
        assert units == len(shared) + len(model.layers) + 1, plan
        sgd_logsumexp_steps(model, batches)
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name], p.detach(), atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{plan} {name}: {m}")


def test_modules_shared_by_blocks():
    model = make(("cycle_reverse", 2, True, None))  # layers use attention 0 1 1 0, FFNs alike
    shared = modules_shared_by_blocks(model.layers)
    assert [id(m) for m in shared] == [id(model.layers[0].attn), id(model.layers[0].ffn),
                                       id(model.layers[1].attn), id(model.layers[1].ffn)]
    assert modules_shared_by_blocks(make(("none", None, False, None)).layers) == []


def test_tied_parameters_in_different_modules_are_refused():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"parameter blocks\[0\].weight is tied across blocks \[0, 1\]"):
        modules_shared_by_blocks([a, b])
    with pytest.raises(ValueError, match="blocks must be given"):
        fully_shard_per_block(nn.Sequential(a, b))
