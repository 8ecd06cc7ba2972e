"""parallel/plan.py: a rank's parameters, gradients and optimizer states are exact counts (model/counting.py,
the TP model's shards, the pipeline's stages) at every ZeRO stage; the layouts planned are exactly
parallel/layout.py's; recompute lowers activations; the shipped configs fit where their comments say."""
from dataclasses import replace

import pytest
import torch

from strata.launcher.config import CONFIG_DIR, load_config
from strata.launcher.plan import run_spec
from strata.model.config import ModelConfig
from strata.model.counting import count_parameters
from strata.model.hybrid import HybridLM
from strata.parallel.layout import Layout, valid_layouts
from strata.parallel.plan import (GIB, ZERO3_PERSISTENCE_THRESHOLD, RunSpec, layer_of, plan_layout, plan_layouts,
                                  stage_bounds, stage_parameters)
from strata.parallel.tensor.splits import parameter_splits, shard_state_dict


def small() -> ModelConfig:
    cfg = ModelConfig(pattern="M*-M*-", d_model=128, vocab_size=1024, max_seq_len=64, tie_embeddings=False)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups = 32, 16, 2
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    cfg.validate()
    return cfg


def spec(zero: int = 0, **changes) -> RunSpec:
    base = RunSpec(small(), seq_len=64, global_batch=8, micro_batch=2, zero_stage=zero, kernels="reference", act_bytes=4)
    return replace(base, **changes)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_weights_gradients_and_optimizer_are_exact_counts(zero):
    total = count_parameters(small())["total"]
    model = HybridLM(small())
    whole = sum(p.numel() for p in model.parameters() if p.numel() < ZERO3_PERSISTENCE_THRESHOLD)
    plan = plan_layout(spec(zero), Layout(1, 1, 2), cuda=False)
    terms, dp = plan.terms, 2
    assert plan.accumulation == 2
    weights = whole + (total - whole) / dp if zero == 3 else total
    assert terms["weights (fp32)"] == 4 * weights
    assert terms["optimizer: AdamW moments (fp32)"] == 8 * (total if zero == 0 else total / dp)
    assert terms.get("optimizer: fp32 master partition (DeepSpeed ZeRO)", 0) == (0 if zero == 0 else 4 * total / dp)
    grads = {0: 4 * total, 1: 4 * total, 2: 4 * total / dp, 3: 0}[zero]  # ZeRO-3's partition is held apart:
    assert terms.get("gradients (fp32)", 0) == grads
    if zero == 3:
        assert terms["ZeRO-3 gradient partition and the optimizer's copy (fp32)"] == 2 * 4 * total / dp


@pytest.mark.parametrize("zero", [1, 2])
def test_bf16_parameters_halve_weights_gradients_and_the_residual_and_drop_the_autocast_copies(zero):
    """train.param_dtype=bf16: 2 bytes per weight and gradient, no bf16 weight copies, the same fp32
    masters and moments; the residual stream (the saved norm inputs) in bf16 unless residual_in_fp32."""
    total, dp = count_parameters(small())["total"], 2
    fp32 = plan_layout(spec(zero, kernels="triton", act_bytes=2), Layout(1, 1, dp), cuda=True)
    bf16 = plan_layout(spec(zero, kernels="triton", act_bytes=2, param_bytes=2), Layout(1, 1, dp), cuda=True)
    assert bf16.terms["weights (bf16)"] == 2 * total and "weights (fp32)" not in bf16.terms
    assert "bf16 weight copies kept by the matmuls (autocast)" in fp32.terms
    assert not any("autocast" in name for name in bf16.terms)
    for name in ("optimizer: AdamW moments (fp32)", "optimizer: fp32 master partition (DeepSpeed ZeRO)"):
        assert bf16.terms[name] == fp32.terms[name]
    assert bf16.terms.get("gradients (bf16)", 0) == fp32.terms.get("gradients (fp32)", 0) / 2
    assert bf16.peak < fp32.peak
    residual = replace(small(), residual_in_fp32=True)
    kept = plan_layout(spec(zero, model=residual, kernels="triton", act_bytes=2, param_bytes=2), Layout(1, 1, dp),
                       cuda=True)
    residual_bytes = 2 * 64 * small().d_model * 2  # a block's saved norm input: 2 x 64 tokens x d, 2 bytes less each
    for kind, activations in bf16.activations_by_kind.items():
        blocks = small().pattern.count(kind)
        assert kept.activations_by_kind[kind] - activations == blocks * residual_bytes, kind
        assert fp32.activations_by_kind[kind] == kept.activations_by_kind[kind], kind


def test_a_tensor_parallel_rank_holds_exactly_its_shards():
    model = HybridLM(small())
    shard = shard_state_dict(model.state_dict(), parameter_splits(model, 2), 0, 2)
    local = sum(t.numel() for t in shard.values())
    assert local < count_parameters(small())["total"]
    plan = plan_layout(spec(1), Layout(2, 1, 2), cuda=False)
    assert plan.terms["weights (fp32)"] == 4 * local
    assert plan.terms["optimizer: AdamW moments (fp32)"] == 8 * local / 2


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stages_hold_their_layers_and_match_the_pipeline(tied):
    from strata.parallel.pipeline.stages import stage_bounds as pipeline_bounds

    cfg = replace(small(), tie_embeddings=tied)
    model = HybridLM(cfg)
    n = len(cfg.pattern)
    for pp in (2, 3):
        bounds = stage_bounds(cfg, 64, pp)
        assert bounds == list(pipeline_bounds(cfg, 64, pp))
        stages = stage_parameters(cfg, 1, pp, 64)
        for s, stage in enumerate(stages):
            mine = [p for name, p in model.named_parameters() if bounds[s] <= layer_of(name, n) < bounds[s + 1]]
            expected = sum(p.numel() for p in mine)
            if tied and s == pp - 1:  # DeepSpeed's tied head: the last stage holds the embedding too
                expected += model.embed.weight.numel()
            assert stage["params"] == expected
        extra = model.embed.weight.numel() if tied else 0
        assert sum(st["params"] for st in stages) == count_parameters(cfg)["total"] + extra


@pytest.mark.parametrize("world", [1, 4, 8, 12])
def test_the_layouts_planned_are_exactly_the_valid_layouts(world):
    for zero in (1, 3):
        s = spec(zero)
        expected = valid_layouts(s.model, world, zero_stage=zero, seq_len=s.seq_len, vocab_size=s.vocab)
        assert [(p.layout.tp, p.layout.pp, p.layout.dp) for p in plan_layouts(s, world)] == \
            [(x.tp, x.pp, x.dp) for x in expected]


def activations(plan) -> float:
    return sum(v for k, v in plan.terms.items() if k.startswith(("activations", "a recomputed")))


def test_recompute_lowers_activations_and_costs_flops():
    cfg = load_config(CONFIG_DIR / "hybrid-1b3.yaml")
    base = run_spec(cfg)
    n = len(cfg.model.pattern)
    plans = [plan_layout(replace(base, recompute=(mode,) * n), Layout(1, 1, 8)) for mode in ("none", "selective", "full")]
    acts = [activations(p) for p in plans]
    assert acts[0] > 1.5 * acts[1] > 1.5 * acts[2]
    assert plans[0].flops_per_token < plans[1].flops_per_token < plans[2].flops_per_token


@pytest.mark.parametrize("name, gpus", [("hybrid-1b3", 8), ("hybrid-8b", 64), ("hybrid-30b", 64)])
def test_the_configs_fit_where_their_comments_say(name, gpus):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    par = cfg.parallel
    plan = plan_layout(run_spec(cfg), Layout(par.tp, par.pp, gpus // (par.tp * par.pp)))
    assert not plan.problems
    assert plan.peak < 80 * GIB * 0.9  # headroom: the plan is not yet measured on a GPU at this size


def test_planning_needs_no_gpu_and_no_process_group():
    assert not torch.distributed.is_initialized()
    plan_layouts(run_spec(load_config(CONFIG_DIR / "hybrid-8b.yaml")), 512)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_checkpoint_async_adds_the_host_snapshot_of_the_ranks_weights_and_optimizer_states(zero):
    """checkpoint.async copies what the rank's files hold (weights, moments, ZeRO's masters) into host
    memory: a term of the peak on CPU, beside the GPU's memory on GPU."""
    layout = Layout(1, 1, 2)
    for cuda in (False, True):
        sync, snap = (plan_layout(spec(zero, async_snapshot=a), layout, cuda=cuda) for a in (False, True))
        held = sum(v for name, v in sync.terms.items() if name.startswith(("weights", "optimizer:")))
        assert snap.host_snapshot == held > 0 and sync.host_snapshot == 0
        assert snap.peak == sync.peak + (0 if cuda else held)
        assert ("checkpoint.async host snapshot (weights + optimizer states)" in snap.terms) == (not cuda)
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["model.vocab_size=512", "checkpoint.async=true"])
    assert run_spec(cfg).async_snapshot
