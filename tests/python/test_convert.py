"""The converters on models nobody here wrote: tiny random Hugging Face GPT-2 and
Llama models (built in code), a torchtitan-style FeedForward, nn.Sequential."""

import copy
import os
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from deepseek_ext import convert  # noqa: E402
from deepseek_ext.nn import GatedSparseFFN, ffn_flops  # noqa: E402
from deepseek_ext.nn.shared_attention_transformer import DenseFFN  # noqa: E402

from utils import finish_rank, run_ranks  # noqa: E402

VOCAB = 256


def gpt2(n_layer=3, dropout=0.0):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=n_layer, n_head=4, n_positions=128, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


def llama(n_layer=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


class FeedForward(nn.Module):
    """torchtitan's Llama FeedForward (models/llama3/model.py): w2(silu(w1(x)) * w3(x))."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Wrapper(nn.Module):
    def __init__(self, *ffns):
        super().__init__()
        self.layers = nn.ModuleList(ffns)

    def forward(self, x):
        for f in self.layers:
            x = x + f(x)
        return x


MODELS = {"gpt2": gpt2, "llama": llama}


def tokens(batch=2, seq=24, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- sparsify_ffn_ --------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_density_one_equals_dense(name):
    model = MODELS[name]().eval()
    x = tokens()
    ref = model(x).logits
    report = convert.sparsify_ffn_(model, density=1.0, n_blocks=8)
    assert len(report["converted"]) == model.config.num_hidden_layers
    assert all(isinstance(m, convert.SparseMLP) for m in (model.get_submodule(f) for f in report["converted"]))
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make, activation", [
    (lambda: FeedForward(32, 96), "swiglu"),
    (lambda: nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), "gelu"),
    (lambda: nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32), nn.Dropout(0.1)),
     "gelu_tanh"),
    (lambda: nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32)), "silu"),
    (lambda: DenseFFN(32, 64, "gelu"), "gelu"),
])
def test_recognised_mlps_convert_exactly(make, activation):
    torch.manual_seed(0)
    model = Wrapper(make(), make()).double().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    convert.sparsify_ffn_(model, density=1.0, n_blocks=4)
    ffns = [m for m in model.modules() if isinstance(m, GatedSparseFFN)]
    assert len(ffns) == 2 and {f.activation for f in ffns} == {activation}
    y, ref = model(x), dense(x)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    # Backward too: the input gradient equals the dense model's.
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_flops_ratio_equals_formula(name):
    model = MODELS[name]()
    report = convert.sparsify_ffn_(model, density=0.3, n_blocks=8)
    act = "gelu_tanh" if name == "gpt2" else "swiglu"
    d_ff = 4 * 64 if name == "gpt2" else model.config.intermediate_size
    f = ffn_flops(64, d_ff, n_blocks=8, density=0.3, activation=act)
    n = model.config.num_hidden_layers
    assert report["ffn_flops"] == {"dense": n * f["dense"], "sparse": n * f["sparse"]}
    ffn = next(m for m in model.modules() if isinstance(m, GatedSparseFFN))
    assert ffn.k == round(0.3 * 8) and ffn.activation == act


def _corpus_tokens(n_bytes=200_000):
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b""
    for p in sorted(root.glob("*.py")):
        data += p.read_bytes()
        if len(data) >= n_bytes:
            break
    return torch.tensor(list(data[:n_bytes]), dtype=torch.long)


@pytest.mark.parametrize("name", MODELS)
def test_training_reduces_loss(name):
    model = MODELS[name]()
    convert.sparsify_ffn_(model, density=0.3, n_blocks=8)
    data = _corpus_tokens()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)


def test_no_mlp_filter_none_and_twice():
    with pytest.raises(ValueError, match="no dense MLP found in Embedding"):
        convert.sparsify_ffn_(nn.Embedding(4, 4))
    model = llama(2)
    with pytest.raises(ValueError, match="filter_fn selected none of the 2 dense MLPs"):
        convert.sparsify_ffn_(model, n_blocks=8, filter_fn=lambda m, fqn: False)
    first = convert.sparsify_ffn_(model, n_blocks=8, filter_fn=lambda m, fqn: fqn.endswith("0.mlp"))
    assert first["converted"] == ["model.layers.0.mlp"]
    second = convert.sparsify_ffn_(model, n_blocks=8)
    assert second["converted"] == ["model.layers.1.mlp"]  # the converted one is not wrapped again
    third = convert.sparsify_ffn_(model, n_blocks=8)
    assert third["converted"] == [] and third["already_sparse"] == 2
    assert sum(isinstance(m, GatedSparseFFN) for m in model.modules()) == 2


def test_refusals_name_the_problem():
    relu = Wrapper(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="activation relu"):
        convert.sparsify_ffn_(relu, n_blocks=4)
    hidden_dropout = Wrapper(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="dropout .* hidden layer"):
        convert.sparsify_ffn_(hidden_dropout, n_blocks=4)
    with pytest.raises(ValueError, match="n_blocks = 5 does not divide d_ff = 16"):
        convert.sparsify_ffn_(Wrapper(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))), n_blocks=5)
    with pytest.raises(ValueError, match="density must be in"):
        convert.sparsify_ffn_(llama(1), density=0.0)


def test_output_dropout_is_kept():
    model = gpt2(2, dropout=0.1)
    convert.sparsify_ffn_(model, density=0.5, n_blocks=8)
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp.dropout, nn.Dropout) and mlp.dropout.p == 0.1


# -- share_attention_ -----------------------------------------------------------
def _attn_params(model, fqn):
    return sum(p.numel() for p in model.get_submodule(fqn).parameters())


@pytest.mark.parametrize("name", MODELS)
def test_share_all_removes_exactly_the_followers(name):
    model = MODELS[name]()
    n = model.config.num_hidden_layers
    before = sum(p.numel() for p in model.parameters())
    per_layer = _attn_params(model, convert.attention_modules(model)[0][0])
    report = convert.share_attention_(model, "all")
    assert report["parameters_removed"] == (n - 1) * per_layer
    assert before - sum(p.numel() for p in model.parameters()) == (n - 1) * per_layer
    # Each layer keeps its own attention module (its own KV-cache slot).
    attns = [m for _, m in convert.attention_modules(model)]
    assert len({id(m) for m in attns}) == n and [m.layer_idx for m in attns] == list(range(n))
    # Saved once by save_pretrained, and loaded back exactly by from_pretrained.
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        from safetensors import safe_open

        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        attn_keys = [k for k in keys if ".attn." in k or ".self_attn." in k]
        assert len(attn_keys) == len(list(attns[0].named_parameters()))
        loaded = convert.from_pretrained(type(model), d).eval()
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("plan, n_unique, sets", [("sequence", 2, [0, 0, 1, 1]), ("cycle", 2, [0, 1, 0, 1]),
                                                   ("cycle_reverse", 2, [0, 1, 1, 0]), ("all", None, [0] * 4)])
def test_plans_group_layers(plan, n_unique, sets):
    model = llama(4)
    convert.share_attention_(model, plan, n_unique=n_unique)
    q = [layer.self_attn.q_proj for layer in model.model.layers]
    for i in range(4):
        for j in range(4):
            assert (q[i] is q[j]) == (sets[i] == sets[j])


def test_shared_gradient_is_the_sum_over_uses():
    dense = llama(3).double()
    for layer in dense.model.layers[1:]:  # equal weights, so both models compute the same function
        layer.self_attn.load_state_dict(dense.model.layers[0].self_attn.state_dict())
    shared = copy.deepcopy(dense)
    convert.share_attention_(shared, "all")
    x = tokens()
    for m in (dense, shared):
        m(x, labels=x).loss.backward()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        total = sum(getattr(layer.self_attn, name).weight.grad for layer in dense.model.layers)
        torch.testing.assert_close(getattr(shared.model.layers[0].self_attn, name).weight.grad, total,
                                   atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_generate_with_kv_cache_unchanged_when_weights_already_equal(name):
    model = MODELS[name]().eval()
    attns = [m for _, m in convert.attention_modules(model)]
    for a in attns[1:]:
        a.load_state_dict(attns[0].state_dict())
    prompt = tokens(1, 6)
    before = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    convert.share_attention_(model, "all")
    after = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(before, after)


def test_share_mean_init_and_errors():
    model = llama(2)
    w = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    convert.share_attention_(model, "all", init="mean")
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, (w[0] + w[1]) / 2)
    with pytest.raises(ValueError, match="no attention module found in Sequential"):
        convert.share_attention_(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="filter_fn selected none"):
        convert.share_attention_(llama(2), filter_fn=lambda m, fqn: False)
    with pytest.raises(ValueError, match="plan must be one of"):
        convert.share_attention_(llama(2), "some")
    again = convert.share_attention_(model, "all")  # already shared: nothing left to remove
    assert again["parameters_removed"] == 0


# -- use_fused_linear_ ----------------------------------------------------------
def test_fused_linear_refuses_tied_head_and_keeps_parameters():
    model = llama(2)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="lm_head.weight is tied to"):
        convert.use_fused_linear_(model)
    before = {n: p for n, p in model.named_parameters()}
    x = tokens()
    ref = model(x).logits
    report = convert.use_fused_linear_(model, filter_fn=lambda m, fqn: fqn != "lm_head")
    from deepseek_ext.nn import Linear

    assert len(report["converted"]) == 2 * 7 and type(model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(f), Linear) for f in report["converted"])
    assert all(p is before[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)


# -- the converted model with everything around it ------------------------------
def test_save_and_load_refuse_the_wrong_model():
    model = llama(2)
    convert.sparsify_ffn_(model, density=0.5, n_blocks=8)
    with pytest.raises(RuntimeError, match="Missing key"):
        llama(2).load_state_dict(model.state_dict())  # converted weights into the dense model
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = convert.from_pretrained(LlamaForCausalLM, d)
        assert convert.conversions(loaded) == convert.conversions(model)
        dense_dir = os.path.join(d, "dense")
        llama(2).save_pretrained(dense_dir)
        # A dense checkpoint whose config claims the conversion: refused, not half-loaded.
        import json

        cfg = json.load(open(os.path.join(d, "config.json")))
        dense_cfg = json.load(open(os.path.join(dense_dir, "config.json")))
        dense_cfg[convert.CONFIG_KEY] = cfg[convert.CONFIG_KEY]
        json.dump(dense_cfg, open(os.path.join(dense_dir, "config.json"), "w"))
        with pytest.raises(ValueError, match="does not fit LlamaForCausalLM"):
            convert.from_pretrained(LlamaForCausalLM, dense_dir)
    x = tokens()
    torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits, atol=0, rtol=0)


def test_compiled_converted_model_matches_eager():
    model = llama(2).eval()
    convert.sparsify_ffn_(model, density=0.5, n_blocks=8)
    convert.share_attention_(model, "all")
    x = tokens()
    ref = model(x).logits
    mlp = model.model.layers[0].mlp
    h = torch.randn(2, 24, 64)
    torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(h), mlp(h))
    torch.testing.assert_close(torch.compile(model)(x).logits, ref, atol=1e-5, rtol=1e-5)


def _train_worker(rank, world, init_file, mode, state, batches, out_dir):
    """Trains the converted Llama on this rank's half of each batch: DDP with the
    int8 hook, or per-block FSDP2; rank 0 saves the full parameters."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _converted_llama()
    model.load_state_dict(state)
    if mode == "ddp_int8":
        from torch.nn.parallel import DistributedDataParallel as DDP

        from deepseek_ext.distributed import Int8CompressionState, int8_compress_hook

        wrapped = DDP(model, broadcast_buffers=False)
        # "always": the default policy may send a loopback's buckets plain.
        wrapped.register_comm_hook(Int8CompressionState(policy="always", min_compress_numel=1024),
                                   int8_compress_hook)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from deepseek_ext.distributed import fully_shard_per_block

        wrapped = fully_shard_per_block(model, model.model.layers, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in batches:
        x = b.chunk(world)[rank]
        wrapped(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    full = {n: p.full_tensor() if mode == "fsdp2" else p.detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "params.pt"))
    finish_rank()


def _converted_llama():
    model = llama(4)
    convert.sparsify_ffn_(model, density=0.5, n_blocks=8, balance_rate=0.0)
    convert.share_attention_(model, "cycle", n_unique=2)
    return model


@pytest.mark.parametrize("mode", ["ddp_int8", "fsdp2"])
def test_distributed_training_of_the_converted_model(mode):
    """Per-block FSDP2 on 2 Gloo ranks trains the converted model as one process
    does (each parameter to 1e-5 of its own movement); DDP with our int8 hook
    too, within a few percent of the largest movement (int8 rounds each block
    to its absmax / 127, so a parameter with tiny gradients beside large ones,
    like a key projection's, carries that error relative to its own step)."""
    model = _converted_llama()
    state = copy.deepcopy(model.state_dict())
    batches = [tokens(4, 16, seed=s) for s in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_train_worker, mode, state, batches, tmp, timeout=240)
        params = torch.load(os.path.join(tmp, "params.pt"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in batches:
        # Each rank's loss is the mean over its half: the average of the two halves.
        sum(model(h, labels=h).loss for h in b.chunk(2)).div(2).backward()
        opt.step()
        opt.zero_grad()
    moved = {n: float((p.detach() - state[n]).abs().max()) for n, p in model.named_parameters()}
    largest = max(moved.values())
    for name, p in model.named_parameters():
        err = float((params[name] - p.detach()).abs().max())
        bound = 1e-5 * moved[name] + 1e-7 if mode == "fsdp2" else 0.05 * largest
        assert err <= bound, (name, err, moved[name], largest)


# -- Recipe.apply ---------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_recipe_apply_summary(name):
    from deepseek_ext.nn import Linear
    from deepseek_ext.recipe import Recipe

    model = MODELS[name]()
    n = model.config.num_hidden_layers
    before = sum(p.numel() for p in model.parameters())
    summary = Recipe.low_cost(ffn_n_blocks=8).apply(model)
    assert len(summary.converted["sparsify_ffn_"]) == n
    assert len(summary.converted["share_attention_"]) == n - 1
    assert summary.parameters_before == before
    assert summary.parameters_after == sum(p.numel() for p in model.parameters()) < before
    assert 0 < summary.ffn_flops_after < 0.5 * summary.ffn_flops_before
    # GPT-2's LM head is tied to the embedding: it stays a torch.nn.Linear (its other
    # projections are Conv1D). Llama's (untied here) and its 4 shared attention
    # projections are swapped.
    assert (type(model.lm_head) is nn.Linear) == (name == "gpt2")
    assert len(summary.converted["use_fused_linear_"]) == (0 if name == "gpt2" else 4 + 1)
    assert all(isinstance(model.get_submodule(f), Linear) for f in summary.converted["use_fused_linear_"])
    assert "parameters:" in str(summary)
    x = tokens()
    assert torch.isfinite(model(x, labels=x).loss)
