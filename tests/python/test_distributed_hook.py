"""int8_compress_hook, the counted allreduce and AdaptiveLocalSGD on Gloo.

Each multi-process test spawns its ranks with a free port and a short Gloo
timeout, and the parent gives up (killing its children) after a deadline, so
a bug shows up as a failure, never as a hang. The workers check and raise;
the parent re-raises the first error with the rank's traceback.

Tolerances come from the quantisation step: with round-to-nearest, an int8
block of absmax ``a`` is off by at most ``a / 127 / 2`` per element, once on
each rank's copy (stage 1, averaged over ranks) and once on the reduced shard
(stage 2).
"""

import datetime
import os
import queue
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deepseek_ext  # noqa: F401  (loads the ops)
from deepseek_ext.distributed import (
    AdaptiveLocalSGD,
    CountingAllreduceState,
    Int8CompressionState,
    adaptive_local_sgd_hook,
    counting_allreduce_hook,
    int8_compress_hook,
)
from deepseek_ext.distributed.int8_hook import _chunk_bounds, _int8_bytes

PG_TIMEOUT_S = 20


# ---------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, results, fn, args, env, pg_timeout_s):
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def launch(fn, world_size, *args, env=None, deadline_s=90, pg_timeout_s=PG_TIMEOUT_S, dies=()):
    """Runs fn(rank, world_size, *args) on world_size Gloo ranks; returns the
    results by rank (or raises the first failure). Ranks in ``dies`` may exit
    without reporting (their result is None)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, results, fn, args, env or {}, pg_timeout_s))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    end = time.monotonic() + deadline_s
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                for r in dies:
                    if r not in out and not procs[r].is_alive():
                        out[r] = None
                if time.monotonic() > end:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise AssertionError(f"{fn.__name__}: ranks {missing} did not finish within {deadline_s} s") from None
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]


class FakeBucket:
    """The part of torch.distributed.GradBucket the hooks use."""

    def __init__(self, buffer, index=0, is_last=True):
        self._buffer, self._index, self._is_last = buffer, index, is_last

    def buffer(self):
        return self._buffer

    def index(self):
        return self._index

    def is_last(self):
        return self._is_last

    def parameters(self):
        return []


# ---------------------------------------------------------------- references


def rank_grad(rank, n, step=0, dtype=torch.float32):
    """Rank r's gradient: normal values with a magnitude that varies by 256-block
    (so that blocks get different scales), reproducible on every rank."""
    g = torch.Generator().manual_seed(1000 * step + 17 * rank + n)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn((n + 255) // 256, generator=g, dtype=torch.float64)).repeat_interleave(256)[:n]
    return x.to(dtype)


def block_absmax(x, bs):
    """absmax of each block of bs elements, spread back to the elements (zero padded)."""
    n = x.numel()
    pad = torch.zeros((n + bs - 1) // bs * bs, dtype=torch.float64)
    pad[:n] = x.double().abs()
    return pad.view(-1, bs).amax(1).repeat_interleave(bs)[:n]


def flat_error_bound(grads, bs):
    """Bound on |hook - mean| for round-to-nearest in both stages (fp32 math)."""
    p = len(grads)
    mean = torch.stack([g.double() for g in grads]).mean(0)
    e1 = sum(block_absmax(g, bs) for g in grads) / p / 127 / 2
    e2 = (block_absmax(mean, bs) + block_absmax(e1, bs)) / 127 / 2
    return mean, e1 + e2


def run_hook(state, buffer, index=0, is_last=True):
    return int8_compress_hook(state, FakeBucket(buffer, index, is_last)).wait()


# ---------------------------------------------------------------- workers


def _accuracy_worker(rank, p, hierarchical):
    bs = 256
    state = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=0,
                                 hierarchical=hierarchical)
    assert state.hierarchical == bool(hierarchical)
    # Uneven sizes: smaller than one block per rank, not a multiple of the block, exact multiple.
    for idx, n in enumerate([100, 70_001, p * bs * 8]):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            grads = [rank_grad(r, n, dtype=dtype) for r in range(p)]
            mean, bound = flat_error_bound(grads, bs)
            if hierarchical:
                # bf16 (or fp16) reduce inside the node: one rounding per rank, and
                # the node sums are the int8-quantised blocks (block absmax of sums
                # is at most the sum of block absmaxes, which flat_error_bound uses).
                eps16 = 2.0 ** -8 if dtype != torch.float16 else 2.0 ** -11
                bound = bound + sum(g.double().abs() for g in grads) / p * eps16 * 2
            out = run_hook(state, grads[rank].clone(), index=10 * idx + len(str(dtype)))
            assert out.dtype == dtype and out.shape == (n,)
            err = (out.double() - mean).abs()
            out_rounding = mean.abs() * (torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6)
            tol = bound * 1.001 + out_rounding + 1e-6
            assert (err <= tol).all(), (n, dtype, (err - tol).max().item())
            # A wrong shard order or a missing average would be far off; a zero
            # result would be off by the mean itself, much more than the bound.
            assert (mean.abs() > tol).float().mean() > 0.5, (n, dtype)
            # Every rank dequantises the same bytes: bitwise identical results.
            everyone = [torch.empty_like(out) for _ in range(p)]
            dist.all_gather(everyone, out)
            assert all(torch.equal(e, out) for e in everyone)
    # Bytes each rank sent, counted: at most 0.27 of an fp32 ring allreduce for
    # buckets past a few blocks per rank (the padding to p * block_size is the rest).
    stats = state.stats()
    assert stats["compressed_calls"] == 9 and stats["allreduce_calls"] == 0
    big = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=0,
                               hierarchical=hierarchical)
    run_hook(big, rank_grad(rank, 1_000_003))
    s = big.stats()
    assert abs(s["compression_ratio"] - s["bytes_fp32_equivalent"] / s["bytes_sent"]) < 1e-12
    if hierarchical:
        # The bf16 reduce inside the node costs more bytes, but they stay in the node.
        assert s["bytes_sent_inter_node"] / s["bytes_fp32_equivalent"] <= 0.27, s
        assert s["bytes_sent_inter_node"] < s["bytes_sent"]
    else:
        assert s["bytes_sent"] / s["bytes_fp32_equivalent"] <= 0.27, s
        assert s["bytes_sent_inter_node"] == s["bytes_sent"]
    if p == 4 and not hierarchical:
        with pytest.raises(ValueError, match="hierarchical=3 needs ranks per node"):
            Int8CompressionState(policy="always", hierarchical=3)
    return stats


def _error_feedback_worker(rank, p):
    bs, n, steps = 256, 5000, 6
    state = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=0, hierarchical=False)
    plain = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=0, hierarchical=False,
                                 error_feedback=False)
    delivered = torch.zeros(n, dtype=torch.float64)
    delivered_plain = torch.zeros(n, dtype=torch.float64)
    truth = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        grads = [rank_grad(r, n, step=t) for r in range(p)]
        truth += torch.stack([g.double() for g in grads]).mean(0)
        delivered += run_hook(state, grads[rank].clone()).double()
        delivered_plain += run_hook(plain, grads[rank].clone()).double()
    res = state.state_dict()["residuals"][0]["tensors"]
    r1 = res["bucket"].double()
    dist.all_reduce(r1)
    shards = [torch.empty_like(res["shard"]) for _ in range(p)]
    dist.all_gather(shards, res["shard"])
    r2 = torch.cat(shards).double()[:n]
    # sum_t delivered + mean_r residual_r + (owner residuals) == sum_t mean_r g_r,
    # up to fp32 roundings; without error feedback the gap is quantisation-sized.
    gap = (delivered + r1 / p + r2 - truth).abs().max().item()
    gap_plain = (delivered_plain - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert gap <= 64 * steps * 2.0**-24 * scale, (gap, scale)
    assert gap_plain > 100 * gap, (gap_plain, gap)
    # Error feedback keeps the accumulated error bounded by one step's error.
    _, bound = flat_error_bound([rank_grad(r, n, step=steps - 1) for r in range(p)], bs)
    assert (delivered - truth).abs().max().item() <= 4 * bound.max().item()

    # is_last counts iterations: start_iter=1 -> the whole first iteration is a
    # plain allreduce (exact mean), the next one compressed.
    st = Int8CompressionState(policy="always", block_size=bs, start_iter=1, min_compress_numel=0, hierarchical=False)
    grads = [rank_grad(r, 3000, step=9) for r in range(p)]
    mean = torch.stack(grads).mean(0)
    for idx, last in ((0, False), (1, True)):
        out = run_hook(st, grads[rank].clone(), index=idx, is_last=last)
        torch.testing.assert_close(out, mean, rtol=1e-6, atol=1e-6)
    assert st.stats()["allreduce_calls"] == 2 and st.stats()["iteration"] == 1
    out = run_hook(st, grads[rank].clone(), index=0, is_last=False)
    assert st.stats()["compressed_calls"] == 1 and not torch.equal(out, mean)
    # min_compress_numel: small buckets go through a full-precision allreduce.
    small = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=4000,
                                 hierarchical=False)
    torch.testing.assert_close(run_hook(small, grads[rank].clone()), mean, rtol=1e-6, atol=1e-6)
    assert small.stats()["compressed_calls"] == 0

    # The counted baseline: exact mean, same keys, fp32 ring accounting.
    cs = CountingAllreduceState()
    out = counting_allreduce_hook(cs, FakeBucket(grads[rank].clone())).wait()
    torch.testing.assert_close(out, mean, rtol=1e-6, atol=1e-6)
    assert cs.stats()["bytes_sent"] == 2 * 3000 * (p - 1) // p * 4
    assert set(state.stats()) <= set(cs.stats()) | {"iteration", "calibration", "decisions"}
    return gap


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128),
                                       torch.nn.Tanh(), torch.nn.Linear(128, 1))

    def forward(self, x):
        return self.net(x)


_TEACHER = torch.linspace(-1, 1, 8).view(8, 1)


def _batch(rank, step, batch=32):
    g = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randn(batch, 32, generator=g)
    y = torch.sin(x[:, :8] @ _TEACHER) + 0.3 * x[:, 8:9] * x[:, 9:10]
    return x, y


@torch.no_grad()
def eval_loss(model) -> float:
    """MSE on a fixed held-out set (the same for every run and rank)."""
    x, y = _batch(rank=-1, step=10**6, batch=2048)
    return torch.nn.functional.mse_loss(model(x), y).item()


def _train(rank, make_hook, steps, start=0, model_state=None, opt_state=None, hook_state=None, lr=0.05,
           rebuild_buckets=True, bucket_cap_mb=None):
    """Trains a fresh TinyNet in a fresh DDP from step `start` to `steps` (as a
    restart would, from the given state dicts); returns per-step global
    losses, the model, optimizer and hook state. DDP's first iteration uses
    one bucket holding every parameter and rebuilds its buckets after it,
    unless find_unused_parameters is set (rebuild_buckets=False)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = TinyNet()
    if model_state is not None:
        model.load_state_dict(model_state)
    ddp = DDP(model, find_unused_parameters=not rebuild_buckets,
              **({} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}))
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    state, hook = make_hook(ddp)
    if hook_state is not None:
        state.load_state_dict(hook_state)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    losses = []
    for step in range(start, steps):
        x, y = _batch(rank, step)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if isinstance(state, AdaptiveLocalSGD):
            state.step()
        losses.append(loss.detach())
    losses = torch.stack(losses)
    dist.all_reduce(losses)
    return losses / dist.get_world_size(), model, opt, state


def _params_identical_across_ranks(model):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(e, flat) for e in everyone)


def _int8(**kw):
    kw.setdefault("min_compress_numel", 0)
    kw.setdefault("policy", "always")
    return lambda ddp: (Int8CompressionState(**kw), int8_compress_hook)


def _ddp_convergence_and_resume_worker(rank, p, steps):
    base, base_model, _, _ = _train(rank, lambda ddp: (None, None), steps)
    ours, model, _, state = _train(rank, _int8(), steps)
    assert _params_identical_across_ranks(model)
    assert state.stats()["compressed_calls"] >= steps - 2
    final_base, final_ours = eval_loss(base_model), eval_loss(model)
    assert final_base < 0.5 * base[:10].mean().item()  # it learnt something
    assert abs(final_ours - final_base) <= 0.02 * final_base, (final_ours, final_base)

    # Checkpoint at step 12; resume as a restart does: fresh model, DDP,
    # optimizer and hook state, loaded from the checkpoint. bucket_cap_mb
    # splits TinyNet into 5 rebuilt buckets (129, 128, 16384, 128 and 4096
    # values; the small ones below min_compress_numel go through the fp32
    # allreduce). With
    # DDP's rebuild (the default) the fresh DDP's first iteration is one bucket
    # holding every parameter: the state replays the saved 5-bucket layout
    # inside it, then DDP's rebuilt buckets match the saved ones. Without the
    # rebuild (find_unused_parameters) the layout never changes.
    make = _int8(stochastic_rounding=True, seed=5, min_compress_numel=1000)
    path = f"/tmp/_dsx_ckpt_{os.getpid()}.pt"
    for rebuild in (True, False):
        kw = {"rebuild_buckets": rebuild, "bucket_cap_mb": 0.0002}
        _, m_half, opt_half, st_half = _train(rank, make, 12, **kw)
        torch.save((m_half.state_dict(), opt_half.state_dict(), st_half.state_dict()), path)  # like a real checkpoint
        ckpt = torch.load(path, weights_only=False)
        os.remove(path)
        full_losses, m_full, _, st_full = _train(rank, make, 24, **kw)
        res_losses, m_res, _, st_res = _train(rank, make, 24, start=12, model_state=ckpt[0], opt_state=ckpt[1],
                                              hook_state=ckpt[2], **kw)
        assert torch.equal(full_losses[12:], res_losses), rebuild
        assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_res.parameters())), rebuild
        assert _params_identical_across_ranks(m_res)
        layout = ckpt[2]["layout"]
        # Rebuilt in backward order: [4.bias, 4.weight], [2.bias], ...; DDP's initial
        # assignment (no rebuild) has one parameter per bucket here.
        assert [len(b) for b in layout] == ([2, 1, 1, 1, 1] if rebuild else [1] * 6), layout
        assert len(ckpt[2]["residuals"]) == 2
        assert st_res.layout_resets == 0 and st_res.replayed_buckets == (len(layout) if rebuild else 0)
        full, res = st_full.stats(), st_res.stats()
        # Same bytes and averages; a replayed DDP bucket is one hook call for 5 averages.
        for key in ("compressed_calls", "allreduce_calls", "bytes_sent", "bytes_fp32_equivalent", "iteration"):
            assert full[key] == res[key], (key, full[key], res[key])
        assert full["hook_calls"] - res["hook_calls"] == (len(layout) - 1 if rebuild else 0)
        assert st_full.rng_offset == st_res.rng_offset
        assert st_res.state_dict()["layout"] == st_full.state_dict()["layout"]
    return final_base, final_ours


def _ddp_hierarchical_worker(rank, p, steps):
    make = lambda ddp: (Int8CompressionState(policy="always", min_compress_numel=0), int8_compress_hook)  # noqa: E731
    base, base_model, _, _ = _train(rank, lambda ddp: (None, None), steps)
    ours, model, _, state = _train(rank, make, steps)
    assert state.hierarchical and state.local_world_size == 2 and state.num_nodes == 2  # from LOCAL_WORLD_SIZE
    assert _params_identical_across_ranks(model)
    final_base, final_ours = eval_loss(base_model), eval_loss(model)
    assert final_ours < 0.95 * ours[:5].mean().item()
    assert abs(final_ours - final_base) <= 0.05 * final_base, (final_ours, final_base)
    assert state.stats()["bytes_sent_inter_node"] < state.stats()["bytes_sent"]
    return final_base, final_ours


def _local_sgd_worker(rank, p, steps):
    base, base_model, _, _ = _train(rank, lambda ddp: (None, None), steps)

    def make(ddp):
        inner = Int8CompressionState(policy="always", min_compress_numel=0)
        ls = AdaptiveLocalSGD(ddp.module, warmup_steps=40, min_period=2, max_period=16,
                              inner_state=inner, inner_hook=int8_compress_hook)
        return ls, adaptive_local_sgd_hook

    ours, model, _, ls = _train(rank, make, steps)
    assert ls.history, "never averaged"
    history = torch.tensor([[s, pd] for s, _, pd in ls.history], dtype=torch.float64)
    everyone = [torch.empty_like(history) for _ in range(p)]
    dist.all_gather(everyone, history)
    assert all(torch.equal(e, history) for e in everyone)  # same decisions on every rank
    periods = {pd for _, _, pd in ls.history}
    assert all(2 <= pd <= 16 for pd in periods)
    if ls.step_count == ls.last_average:
        assert _params_identical_across_ranks(model)
    final_base, final_ours = eval_loss(base_model), eval_loss(model)
    assert final_ours < 0.5 * ours[:10].mean().item()
    s = ls.stats()
    return final_base, final_ours, s["bytes_sent"], sorted(periods), len(ls.history)


def _layout_mismatch_worker(rank, p):
    """A state saved with TinyNet's layout, loaded for another model: one
    warning naming the reason, the loaded residuals dropped, training goes on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, _, _, saved = _train(rank, _int8(), 4, bucket_cap_mb=0.0002)
    sd = saved.state_dict()
    assert len(sd["layout"]) == 5 and len(sd["residuals"]) == 5
    torch.manual_seed(0)
    other = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)))
    state = Int8CompressionState(policy="always", min_compress_numel=0)
    state.load_state_dict(sd)
    other.register_comm_hook(state, int8_compress_hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = _batch(rank, step)
            torch.nn.functional.mse_loss(other(x), y).backward()
    ours = [str(w.message) for w in caught if "Int8CompressionState" in str(w.message)]
    assert len(ours) == 1, ours
    assert "bucket 0 (4 parameters) is neither saved bucket 0 nor made of whole saved buckets" in ours[0], ours
    assert "residuals are reset" in ours[0]
    # The 5 loaded residuals, then the one of the first iteration's bucket when
    # DDP rebuilds it (same parameters, backward order) after that iteration.
    assert state.layout_resets == 5 + 1 and state.replayed_buckets == 0, (state.layout_resets, state.replayed_buckets)
    # The loaded iteration (4) is past start_iter: compressed from the first step.
    assert state.stats()["compressed_calls"] - sd["counters"]["compressed_calls"] == 3
    assert _params_identical_across_ranks(other)
    return ours[0]


def _dead_peer_worker(rank, p):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ddp = DDP(TinyNet())
    ddp.register_comm_hook(Int8CompressionState(policy="always", min_compress_numel=0, start_iter=0),
                           int8_compress_hook)
    for step in range(3):
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    if rank == p - 1:
        os._exit(0)  # dies without a word, mid-training
    x, y = _batch(rank, 3)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="int8_compress_hook: bucket 0 .* a peer may have died") as info:
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    return time.monotonic() - t0, str(info.value)[:300]


def _chunks_equal_whole_worker(rank, p, hierarchical):
    bs, n = 256, 300_001
    # Chunks are aligned to p * block_size, so with round-to-nearest every block
    # holds the same elements as without chunking: the same bits, step after step
    # (error feedback included).
    whole = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=0,
                                 hierarchical=hierarchical, chunk_numel=1 << 22)
    chunked = Int8CompressionState(policy="always", block_size=bs, start_iter=0, min_compress_numel=0,
                                   hierarchical=hierarchical, chunk_numel=40_000)
    assert len(_chunk_bounds(chunked, n)) == 8
    for step in range(3):
        g = rank_grad(rank, n, step=step)
        a, b = run_hook(whole, g.clone()), run_hook(chunked, g.clone())
        assert torch.equal(a, b), (hierarchical, step)
    # Only the last chunk is padded; the counted bytes are the policy's model of them.
    assert whole.stats()["bytes_sent"] == chunked.stats()["bytes_sent"] == 3 * _int8_bytes(chunked, n)
    assert whole.stats()["bytes_sent_inter_node"] == chunked.stats()["bytes_sent_inter_node"]
    key = "cast" if hierarchical else "bucket"
    torch.testing.assert_close(whole.state_dict()["residuals"][0]["tensors"][key],
                               chunked.state_dict()["residuals"][0]["tensors"][key], rtol=0, atol=0)


def _policy_and_chunks_worker(rank, p):
    bs, n = 256, 300_001
    _chunks_equal_whole_worker(rank, p, False)

    # The "auto" policy: a link hint so fast that nothing pays for compression ->
    # exact allreduce; so slow that everything does -> int8. Calibrated once, the
    # same numbers on every rank, decisions in stats() and kept by state_dict().
    grads = [rank_grad(r, n, step=7) for r in range(p)]
    mean = torch.stack(grads).mean(0)
    fast = Int8CompressionState(block_size=bs, start_iter=1, min_compress_numel=0, hierarchical=False,
                                link_bandwidth=1e15)
    out = run_hook(fast, grads[rank].clone(), index=0, is_last=True)  # iteration 0: before start_iter
    assert fast.stats()["calibration"] is None
    out = run_hook(fast, grads[rank].clone(), index=0, is_last=True)
    torch.testing.assert_close(out, mean, rtol=1e-6, atol=1e-6)
    s = fast.stats()
    assert s["decisions"] == {0: "allreduce"} and s["policy_allreduce_calls"] == 1 and s["compressed_calls"] == 0
    cal = torch.tensor([s["calibration"][k] for k in ("latency_s", "s_per_byte", "s_per_element")],
                       dtype=torch.float64)
    everyone = [torch.empty_like(cal) for _ in range(p)]
    dist.all_gather(everyone, cal)
    assert all(torch.equal(e, cal) for e in everyone) and (cal > 0).all(), everyone
    assert s["calibration"]["s_per_byte"] == 8 / 1e15
    slow = Int8CompressionState(block_size=bs, start_iter=0, min_compress_numel=0, hierarchical=False,
                                link_bandwidth=1e3)
    out = run_hook(slow, grads[rank].clone())
    assert slow.stats()["decisions"] == {0: "int8"} and slow.stats()["compressed_calls"] == 1
    assert not torch.equal(out, mean)
    # Measured (no hint): whatever it decides, every rank decides the same.
    measured = Int8CompressionState(block_size=bs, start_iter=0, min_compress_numel=0, hierarchical=False)
    for idx, size in enumerate((70_001, 2_000_000)):
        run_hook(measured, rank_grad(rank, size), index=idx, is_last=idx == 1)
    mine = [measured.stats()["decisions"]]
    everyone = [None] * p
    dist.all_gather_object(everyone, mine[0])
    assert all(e == mine[0] for e in everyone) and set(mine[0]) == {0, 1}, everyone
    restored = Int8CompressionState(block_size=bs, start_iter=0, min_compress_numel=0, hierarchical=False)
    restored.load_state_dict(measured.state_dict())
    assert restored.calibration == measured.calibration
    return measured.stats()["calibration"], mine[0]


# ---------------------------------------------------------------- tests


def _world2_worker(rank, p):
    _accuracy_worker(rank, p, False)
    _error_feedback_worker(rank, p)


def _world4_worker(rank, p):
    _accuracy_worker(rank, p, False)
    _accuracy_worker(rank, p, 2)
    _chunks_equal_whole_worker(rank, p, 2)
    return _ddp_hierarchical_worker(rank, p, 40)


def test_world2_mean_within_quantisation_step_error_feedback_is_last_small_buckets():
    launch(_world2_worker, 2)


def _world1_worker(rank, p):
    """One rank: "auto" sends nothing compressed (nothing to send); "always"
    runs the int8 path, and the result is the gradient within one quantisation
    step, with the residual holding exactly what was dropped."""
    n = 1 << 16
    out = {}
    for policy in ("auto", "always"):
        state = Int8CompressionState(policy=policy, start_iter=0, min_compress_numel=1)
        g = rank_grad(0, n)
        avg = int8_compress_hook(state, FakeBucket(g.clone())).wait()
        out[policy] = (state.stats()["compressed_calls"], (avg - g).abs().max().item(),
                       g.view(-1, 256).abs().amax(1).max().item() / 127)
    return out


def test_world1_always_still_runs_the_int8_path():
    (out,) = launch(_world1_worker, 1)
    assert out["auto"][0] == 0 and out["auto"][1] == 0.0
    calls, err, step = out["always"]
    assert calls == 1 and 0 < err <= step


def test_chunks_equal_the_whole_bucket_and_the_policy_decides_alike_on_every_rank():
    (calibration, decisions), _ = launch(_policy_and_chunks_worker, 2, deadline_s=90)
    print(f"loopback calibration {calibration}; decisions {decisions}")


def test_world4_flat_and_hierarchical_and_ddp_from_torchrun_environment():
    # LOCAL_WORLD_SIZE=2 (as torchrun sets it) makes hierarchical="auto" pick 2 nodes x 2 ranks in the DDP run.
    launch(_world4_worker, 4, env={"LOCAL_WORLD_SIZE": "2"}, deadline_s=150)


def test_ddp_reaches_allreduce_loss_and_resumes_bit_identically():
    (final_base, final_ours), _ = launch(_ddp_convergence_and_resume_worker, 2, 240, deadline_s=120)
    print(f"held-out loss after 240 steps: allreduce {final_base:.5f}, int8 {final_ours:.5f}")


def test_adaptive_local_sgd_agrees_across_ranks_and_converges():
    (final_base, final_ours, sent, periods, n_avg), _ = launch(_local_sgd_worker, 2, 240, deadline_s=120)
    print(f"local SGD: final loss {final_ours:.5f} vs allreduce {final_base:.5f}; {n_avg} averages, "
          f"periods {periods}, {sent} bytes sent")


def test_resume_with_another_model_warns_and_resets_residuals():
    message, _ = launch(_layout_mismatch_worker, 2, deadline_s=60)
    print(message)


def test_future_join_completes_after_every_part_and_fails_with_the_first_error():
    from deepseek_ext.distributed._pipeline import FutureJoin

    value = torch.zeros(3)
    join = FutureJoin(2, value)
    join.done()
    assert not join.result.done()
    join.done()
    assert join.result.wait() is value
    join = FutureJoin(3, value)
    join.done()
    join.fail(RuntimeError("part 1 failed"))
    join.fail(RuntimeError("part 2 failed"))
    join.done()
    with pytest.raises(RuntimeError, match="part 1 failed"):
        join.result.wait()


def test_dead_peer_raises_within_the_timeout():
    results = launch(_dead_peer_worker, 2, deadline_s=60, pg_timeout_s=10, dies=(1,))
    elapsed, message = results[0]
    assert "rank 0 of 2" in message
    print(f"survivor raised after {elapsed:.2f} s: {message}")


def test_bad_configuration_is_rejected():
    for bad in (0, 100, 8192, 256.0):
        with pytest.raises(ValueError, match="block_size must be a positive multiple of 32"):
            Int8CompressionState(block_size=bad)
    with pytest.raises(ValueError, match="start_iter must be an int >= 0"):
        Int8CompressionState(start_iter=-1)
    with pytest.raises(ValueError, match="min_compress_numel"):
        Int8CompressionState(min_compress_numel=-5)
    with pytest.raises(ValueError, match="hierarchical must be"):
        Int8CompressionState(hierarchical="yes")
    with pytest.raises(ValueError, match="max_period must be an int >= min_period"):
        AdaptiveLocalSGD(TinyNet(), min_period=4, max_period=2)
    with pytest.raises(ValueError, match="inner_state and inner_hook go together"):
        AdaptiveLocalSGD(TinyNet(), inner_hook=int8_compress_hook)
    if not dist.is_initialized():
        # Built before init_process_group (as Lightning does), bound on first use.
        for state, hook in ((Int8CompressionState(), int8_compress_hook),
                            (CountingAllreduceState(), counting_allreduce_hook)):
            assert state.process_group is None
            with pytest.raises(RuntimeError, match="needs an initialised default process group"):
                hook(state, FakeBucket(torch.zeros(4)))


def test_unsupported_backend_is_rejected():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        for make in (Int8CompressionState, CountingAllreduceState):
            with pytest.raises(ValueError, match="process_group backend must be one of .* got 'fake'"):
                make()
    finally:
        dist.destroy_process_group()
