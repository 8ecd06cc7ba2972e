"""Activation recompute (train.recompute) is exact and lowers activation memory.

For each block kind (Mamba2, attention with GQA and restarting positions, SwiGLU, relu2,
self-guided structured MLPs) and each mode, the loss and every gradient equal those without
recompute (bitwise, or 1e-7 relative); and the bytes autograd keeps for the backward
(bench/recompute_memory.py: saved_tensors_hooks, parameters excluded) drop from none to
selective to full, selective keeping exactly the tensors at the cores' edges and full only the
block input.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench.recompute_memory import block_bytes_per_token
from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.model.memory import saved_bytes
from strata.model.structured import structured_linears
from strata.parallel.engine.parallelize import apply_recompute

BATCH, SEQ, VOCAB, D = 2, 32, 128, 64


def small_config(pattern: str, **mlp) -> ModelConfig:
    cfg = ModelConfig(pattern=pattern, d_model=D, vocab_size=VOCAB, max_seq_len=SEQ)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 16, 16, 2, 8
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    cfg.mlp.d_ff = 128
    for k, v in mlp.items():
        setattr(cfg.mlp, k, v)
    cfg.validate()
    return cfg


CASES = {
    "mamba": small_config("MM"),
    "attention": small_config("**"),
    "mlp_swiglu": small_config("--"),
    "mlp_relu2": small_config("--", activation="relu2"),
    "mlp_lowrank_guided": small_config("--", structure="lowrank", rank=24, self_guided=True, dense_first_layer=False),
    "mlp_blockshuffle_guided": small_config("--", structure="blockshuffle", nblocks=4, self_guided=True,
                                            activation="relu2"),
    "hybrid": small_config("M*-M*-"),
}
PLANS = {  # block i's mode, for a pattern of n blocks
    "selective": lambda n: ["selective"] * n,
    "full": lambda n: ["full"] * n,
    "mixed": lambda n: (["full", "selective", "none"] * n)[:n],
}


def build(cfg: ModelConfig, plan: list[str]) -> HybridLM:
    torch.manual_seed(0)
    model = apply_recompute(HybridLM(cfg), plan)
    for i, m in enumerate(structured_linears(model)):  # mid guided phase: both paths, one layer skipping
        m.guide_alpha, m.guide_active = 0.3, i != 1
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).repeat(BATCH, 1)
    positions[:, SEQ // 3:] -= SEQ // 3  # a document boundary
    return ids, labels, positions


@functools.cache
def loss_and_grads(case: str, plan: tuple[str, ...] = ()):
    ids, labels, positions = batch()
    model = build(CASES[case], list(plan))
    loss = model(ids, labels=labels, position_ids=positions)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bitwise, or within 1e-7 of the largest value."""
    return torch.equal(got, want) or (got - want).abs().max() <= 1e-7 * want.abs().max()


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_gives_the_loss_and_gradients_of_none(case, plan):
    want_loss, want = loss_and_grads(case)
    loss, grads = loss_and_grads(case, tuple(PLANS[plan](len(CASES[case].pattern))))
    assert same(loss, want_loss), f"loss {loss.item()} != {want_loss.item()}"
    assert sorted(grads) == sorted(want)
    bad = [n for n in want if not same(grads[n], want[n])]
    assert not bad, f"gradients differ: {bad}"


@pytest.mark.parametrize("plan", ["selective", "full"])
def test_recompute_under_bf16_autocast_recomputes_in_bf16(plan):
    """The backward runs outside the forward's autocast; a region recomputes under the autocast its
    forward ran in, so the activations it brings back, and every gradient, are those of none."""
    def run(recompute: list[str]):
        ids, labels, positions = batch()
        model = build(CASES["hybrid"], recompute)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels, position_ids=positions)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_loss, want = run([])
    loss, grads = run(PLANS[plan](len(CASES["hybrid"].pattern)))
    assert torch.equal(loss, want_loss)
    bad = [n for n in want if not torch.equal(grads[n], want[n])]
    assert not bad, f"gradients differ: {bad}"


def test_a_region_whose_input_needs_no_gradient_still_trains_its_parameters():
    """A block fed a tensor that needs no gradient (its parameters do): the region cannot record its
    backward without an input that needs one, so it runs as plain code, and its parameters get the
    gradients of none."""
    def grads(plan: list[str]):
        block = build(CASES["hybrid"], plan).blocks[0]
        x = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(2))
        block(x).pow(2).sum().backward()
        return {n: p.grad for n, p in block.named_parameters()}

    want = grads([])
    for plan in ("full", "selective"):
        got = grads(PLANS[plan](len(CASES["hybrid"].pattern)))
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want), plan


def allocated_peak(run) -> int:
    """Bytes allocated at the highest point of run(), beyond what was held when it began (c10's CPU
    allocator, as the profiler records it: bench/memory.py's measure)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.memory import allocations

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    total = peak = 0
    for size in allocations(prof):
        total += size
        peak = max(peak, total)
    return peak


def test_a_region_frees_its_recomputed_output_while_backpropagating_from_it():
    """No op of `x + 1` keeps its output, so the region's backward holds only the gradient it makes
    (one tensor of x's size), not the recomputed output beside it as well."""
    from strata.model.recompute import checkpoint_if

    x = torch.randn(512, 1024, requires_grad=True)  # 2 MiB
    loss = checkpoint_if(True, lambda t: t + 1.0, x).sum()
    peak = allocated_peak(loss.backward)
    assert peak < 1.5 * x.nbytes, f"{peak / x.nbytes:.2f} x the input's bytes at the backward's peak"
    assert torch.equal(x.grad, torch.ones_like(x))


def test_recompute_is_off_without_autograd_and_with_caches():
    """Evaluation and decoding never checkpoint: the same logits with the flags set."""
    cfg = CASES["hybrid"]
    ids, _, _ = batch()
    plain, recomputed = build(cfg, []), build(cfg, PLANS["mixed"](len(cfg.pattern)))
    with torch.no_grad():
        assert torch.equal(recomputed(ids), plain(ids))
        caches = [recomputed.allocate_caches(BATCH, SEQ), plain.allocate_caches(BATCH, SEQ)]
        assert torch.equal(recomputed(ids[:, :5], caches=caches[0]), plain(ids[:, :5], caches=caches[1]))


def block_memory(cfg: ModelConfig, index: int) -> dict[str, float]:
    """Bytes per token kept by block `index` in each mode (bench/recompute_memory.py), and by its
    pre-norm alone."""
    block = build(cfg, []).blocks[index]
    per_token = block_bytes_per_token(block, D, SEQ, BATCH)
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)
    return {"norm": saved_bytes(block.norm, x, exclude=block.norm.parameters()) / (BATCH * SEQ), **per_token}


def kept_by_selective(cfg: ModelConfig, kind: str) -> int:
    """Floats per token that selective recompute keeps besides the pre-norm's own: the norm's
    output (the input projections' input), the core's inputs (the input projections' outputs)
    and, but for the MLP's activation, the core's output (the output projection's input)."""
    if kind == "M":
        m = cfg.mamba
        d_inner = m.expand * cfg.d_model
        nheads, bc = d_inner // m.headdim, m.ngroups * m.d_state
        return cfg.d_model + (2 * d_inner + 2 * bc + nheads) + d_inner
    if kind == "*":
        a = cfg.attention
        hd = a.resolved_head_dim(cfg.d_model)
        return cfg.d_model + (a.n_heads + 2 * a.resolved_kv_heads()) * hd + a.n_heads * hd
    d_ff = cfg.mlp.resolved_d_ff(cfg.d_model)
    return cfg.d_model + (2 if cfg.mlp.activation == "swiglu" else 1) * d_ff


@pytest.mark.parametrize("case,kind", [("mamba", "M"), ("attention", "*"), ("mlp_swiglu", "-"), ("mlp_relu2", "-")])
def test_recompute_lowers_the_saved_activations(case, kind):
    cfg = CASES[case]
    mem = block_memory(cfg, 0)
    assert mem["none"] > mem["selective"] > mem["full"], mem
    assert mem["full"] == 4 * D, f"full recompute keeps only the block input: {mem}"
    assert mem["selective"] == mem["norm"] + 4 * kept_by_selective(cfg, kind), mem
    if kind == "M":  # conv, SSD and gated norm hold most of a Mamba2 block's activations
        assert mem["selective"] < mem["none"] / 3, mem


def test_the_recompute_speed_bench_times_both_regions():
    """bench/recompute_speed.py (docs/BENCHMARKS.md) times torch.utils.checkpoint in the region's
    place: its table has every row (a process of its own: the bench sets threads and kernels)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "recompute_speed.py"
    proc = subprocess.run([sys.executable, str(bench), "--steps", "1", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| none", "-"], ["| selective", "Strata region"], ["| selective", "torch.utils.checkpoint"],
        ["| full", "Strata region"], ["| full", "torch.utils.checkpoint"]]
