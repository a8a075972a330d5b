"""GatedSparseFFN's balancing state under the features users turn on: activation
checkpointing (torch's and Hugging Face's), gradient accumulation, DDP without
buffer broadcast and FSDP2. The bias must move once per optimizer step, never
inside forward, and agree bit for bit on every rank."""

import copy
import gc
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek_ext.nn import GatedSparseFFN, update_balance

from utils import run_ranks

# Large enough that one update flips the routes of many tokens (the gate scores
# of these small models are of order 0.1-1).
RATE = 0.05


def ffn(d_model=32, **kw):
    kw = {"block_size": 16, "density": 0.25, "balance_rate": RATE, **kw}
    return GatedSparseFFN(d_model, 128, **kw)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.ffn = ffn(d)

    def forward(self, h):
        return h + self.ffn(self.ln(h))


class TinyLM(nn.Module):
    """Embeddings, pre-norm sparse-FFN blocks (each optionally checkpointed), a head."""

    def __init__(self, vocab=64, d=32, n_layers=2, seq=12):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.checkpointing = None  # None, "reentrant" or "non_reentrant"

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            if self.checkpointing is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
        return self.head(self.ln(h))

    def loss(self, tokens):
        logits = self(tokens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def sparse_ffns(model):
    return [m for m in model.modules() if isinstance(m, GatedSparseFFN)]


def train_pair(plain, ckpt, loss_fn, batches, micro_batches=1):
    """SGD steps on both models with the same batches; after each backward the
    gradients, after each step the balancing biases, must agree."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (plain, ckpt)]
    moved = 0
    for step, batch in enumerate(batches):
        before = [f.balance_bias.clone() for f in sparse_ffns(plain)]
        for model in (plain, ckpt):
            for micro in batch.chunk(micro_batches):
                loss_fn(model, micro).backward()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step}, {name}.grad: {m}")
        # Every training forward counted once, a recomputation not again.
        tokens = batch.numel()
        for f in sparse_ffns(ckpt):
            assert int(f.load_counts().sum()) == tokens * f.k
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for f, g, b in zip(sparse_ffns(plain), sparse_ffns(ckpt), before):
            assert torch.equal(f.balance_bias, g.balance_bias), f"step {step}: balance_bias differs"
            # Once per optimizer step: each entry moved by exactly 0 or +-RATE.
            delta = (f.balance_bias - b).abs()
            assert torch.all((delta == 0) | ((delta - RATE).abs() < 1e-6)), delta
            moved += int((delta > 0).sum())
            assert int(f.load_counts().abs().sum()) == 0  # the step consumed the counts
    assert moved > 0  # the biases did move, so routes changed between steps


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_torch_checkpoint_gives_the_same_gradients_and_bias(mode, micro_batches):
    torch.manual_seed(0)
    plain = TinyLM()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = mode
    batches = [torch.randint(0, 64, (4, 12)) for _ in range(4)]
    train_pair(plain, ckpt, lambda m, b: m.loss(b), batches, micro_batches)


def test_forward_never_changes_the_bias_and_update_needs_counts():
    torch.manual_seed(0)
    f = ffn(16, auto_balance=False)
    x = torch.randn(64, 16)
    f(x)
    f(x)
    assert torch.equal(f.balance_bias, torch.zeros_like(f.balance_bias))
    assert int(f.load_counts().sum()) == 2 * 64 * f.k
    f.update_balance()
    assert f.balance_bias.abs().sum() > 0 and int(f.load_counts().sum()) == 0
    before = f.balance_bias.clone()
    f.update_balance()  # no forward since: nothing to move
    assert torch.equal(f.balance_bias, before)
    f.eval()
    f(x)  # evaluation counts nothing
    assert int(f.load_counts().sum()) == 0


def test_auto_balance_follows_the_optimizer_that_holds_the_module():
    torch.manual_seed(0)
    f, other = ffn(16), ffn(16)
    manual = ffn(16, auto_balance=False)
    opt = torch.optim.AdamW(f.parameters())
    opt_other = torch.optim.SGD(nn.Linear(2, 2).parameters())
    x = torch.randn(64, 16)
    for m in (f, other, manual):
        m(x).sum().backward()
    opt_other.step()  # holds none of them
    assert all(int(m.load_counts().sum()) > 0 for m in (f, other, manual))
    opt.step()
    assert int(f.load_counts().sum()) == 0 and f.balance_bias.abs().sum() > 0
    assert int(other.load_counts().sum()) > 0 and int(manual.load_counts().sum()) > 0
    update_balance(nn.ModuleList([other, manual]))
    assert int(manual.load_counts().sum()) == 0 and manual.balance_bias.abs().sum() > 0


def test_deepcopy_keeps_auto_balance():
    f = ffn(16)
    g = copy.deepcopy(f)
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    g(torch.randn(32, 16)).sum().backward()
    opt.step()
    assert int(g.load_counts().sum()) == 0 and g.balance_bias.abs().sum() > 0


def test_torchscript_refuses_with_a_clear_message():
    with pytest.raises(RuntimeError, match="GatedSparseFFN cannot be compiled by torch.jit.script"):
        torch.jit.script(ffn(16))


def test_update_balance_rejects_other_modules():
    with pytest.raises(TypeError, match="modules must hold GatedSparseFFN modules"):
        update_balance([nn.Linear(2, 2)])


@pytest.mark.parametrize("reentrant", [False, True])
def test_hugging_face_gradient_checkpointing(reentrant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=12, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    plain = transformers.GPT2LMHeadModel(cfg)
    for block in plain.transformer.h:
        block.mlp = ffn(32)  # [B, T, d] -> [B, T, d], as GPT2MLP
    plain.train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ckpt.is_gradient_checkpointing
    batches = [torch.randint(0, 64, (4, 12)) for _ in range(3)]
    train_pair(plain, ckpt, lambda m, b: m(input_ids=b, labels=b, use_cache=False).loss, batches)


# ---- several ranks ----

def _rank_worker(rank, world, init_file, mode, steps, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyLM()  # the same initial weights on every rank
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, broadcast_buffers=False)

        def loss_fn(b):
            return F.cross_entropy(wrapped(b)[:, :-1].flatten(0, 1), b[:, 1:].flatten())
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss_fn = model.loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # different data on every rank
    for _ in range(steps):
        loss_fn(torch.randint(0, 64, (4, 12))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    biases = [f.balance_bias.clone() for f in sparse_ffns(model)]
    torch.save(biases, os.path.join(out_dir, f"bias{rank}.pt"))
    # An orderly teardown (as in test_shared_attention's FSDP worker): every collective
    # done, the wrappers released while the group is alive, then the group; the process
    # then skips interpreter teardown, where Gloo's threads have aborted a finished rank
    # ("terminate called without an active exception").
    dist.barrier()
    del model, opt, loss_fn
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_balancing_state_is_identical_on_every_rank(mode):
    """2 Gloo ranks with different batches, DDP without buffer broadcast or FSDP2
    sharded per block: after 8 steps every rank's balancing bias is bit-identical
    (the step's counts are summed over the ranks before each update)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_rank_worker, mode, 8, tmp)
        biases = [torch.load(os.path.join(tmp, f"bias{r}.pt")) for r in range(2)]
    assert len(biases[0]) == 2
    for b0, b1 in zip(*biases):
        assert b0.abs().sum() > 0  # it moved
        assert torch.equal(b0, b1), (b0, b1)


@pytest.mark.parametrize("shared_blocks", [0, 1])
def test_autocast_computes_in_the_autocast_dtype(shared_blocks):
    """Under torch.autocast the module computes in the autocast dtype, as nn.Linear
    does, from a float32 or a bfloat16 input; gradients reach the float32 weights."""
    torch.manual_seed(0)
    f = ffn(32, shared_blocks=shared_blocks, balance_rate=0.0)
    x = torch.randn(40, 32)
    ref = f(x)
    for inp in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(inp)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
        y.float().sum().backward()
        assert f.w1.grad.dtype == torch.float32 and f.w1.grad.abs().sum() > 0
        f.zero_grad()
    with pytest.raises(RuntimeError, match="dtype"):
        f(x.bfloat16())  # outside autocast the dtypes must agree
