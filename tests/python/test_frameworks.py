"""The hook states fit the frameworks: built before the process group exists,
bound on first use (Lightning builds its strategy, and our state with it,
before it initialises torch.distributed). The full Lightning and Accelerate
recipes are docs/frameworks.md, run by test_docs.py."""

import gc
import os

import pytest
import torch
import torch.distributed as dist

from deepseek_ext.distributed import (
    AdaptiveLocalSGD,
    CountingAllreduceState,
    Int8CompressionState,
    adaptive_local_sgd_hook,
    int8_compress_hook,
)

from utils import HAS_CUDA, NO_CUDA_REASON, run_ranks


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))


def _steps(ddp, rank, steps, after=None):
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen)
        torch.nn.functional.mse_loss(ddp(x), x[:, :1]).backward()
        opt.step()
        opt.zero_grad()
        if after is not None:
            after()


def _late_binding_worker(rank, world, init_file, saved_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    # Everything built before init_process_group, as a framework does.
    int8 = Int8CompressionState(policy="always", min_compress_numel=0)
    restored = Int8CompressionState(policy="always", min_compress_numel=0)
    counting = CountingAllreduceState()
    model = _model()
    local = AdaptiveLocalSGD(model, warmup_steps=2, min_period=2, max_period=4)
    assert int8.process_group is None and counting.process_group is None and local.process_group is None
    saved = torch.load(saved_path, weights_only=False)
    restored.load_state_dict(saved[rank])  # kept until the state binds its group
    assert restored.iteration == 0 and restored.process_group is None

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ddp = DDP(_model())
    ddp.register_comm_hook(int8, int8_compress_hook)
    _steps(ddp, rank, 4)
    assert int8.process_group is dist.group.WORLD and int8.world_size == world
    assert int8.stats()["compressed_calls"] == 2  # start_iter=2, then int8

    ddp = DDP(_model())
    ddp.register_comm_hook(restored, int8_compress_hook)
    _steps(ddp, rank, 1)
    assert restored.iteration == saved[rank]["iteration"] + 1  # the saved state was applied at binding
    assert restored.stats()["compressed_calls"] == saved[rank]["counters"]["compressed_calls"] + 1

    ddp = DDP(model)
    ddp.register_comm_hook(local, adaptive_local_sgd_hook)
    _steps(ddp, rank, 6, after=local.step)
    assert local.process_group is dist.group.WORLD and local.history  # averaged after warm-up
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)


def _save_worker(rank, world, init_file, saved_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    state = Int8CompressionState(policy="always", min_compress_numel=0)
    ddp = DDP(_model())
    ddp.register_comm_hook(state, int8_compress_hook)
    _steps(ddp, rank, 3)
    everyone = [None] * world
    dist.all_gather_object(everyone, state.state_dict())
    if rank == 0:
        torch.save(everyone, saved_path)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_states_built_before_the_process_group_bind_on_first_use(tmp_path):
    saved = str(tmp_path / "int8_state.pt")
    run_ranks(_save_worker, saved, world=2, timeout=120)
    run_ranks(_late_binding_worker, saved, world=2, timeout=120)


def test_lightning_strategy_takes_the_state_before_distributed_starts():
    from lightning.pytorch.strategies import DDPStrategy

    assert not dist.is_initialized()
    state = Int8CompressionState()
    strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=int8_compress_hook)
    assert strategy._ddp_comm_state is state and strategy._ddp_comm_hook is int8_compress_hook


def _lightning_cuda_worker(rank, world, init_file, out):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      LOCAL_RANK="0", GROUP_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      TORCHELASTIC_RUN_ID="test")

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, _):
            x, = batch
            return torch.nn.functional.mse_loss(self.net(x), x[:, :1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    state = Int8CompressionState(min_compress_numel=0)
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy=DDPStrategy(ddp_comm_state=state,
                                                                            ddp_comm_hook=int8_compress_hook),
                        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(96, 64)), batch_size=32)
    trainer.fit(Net(), data)
    assert state.stats()["hook_calls"] == 3 and state.world_size == 1  # one GPU: NCCL world 1
    os._exit(0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_lightning_registers_the_int8_hook_on_cuda(tmp_path):
    run_ranks(_lightning_cuda_worker, str(tmp_path), world=1, timeout=180)
