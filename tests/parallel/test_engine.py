"""The generated DeepSpeed config and the LR schedules."""
import math

import pytest

from strata.launcher.config import TrainConfig
from strata.parallel.config import ParallelConfig
from strata.parallel.engine.build import deepspeed_config, lr_multiplier, no_decay, param_groups


def test_deepspeed_config_is_derived_from_ours():
    train = TrainConfig(global_batch_size=64, grad_clip=0.5)
    cfg = deepspeed_config(train.optimizer(), ParallelConfig(micro_batch_size=4, zero_stage=2), dp=8)
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 500_000_000}


def test_reduce_bucket_is_no_larger_than_the_ranks_parameters():
    """ZeRO allocates the bucket whole: DeepSpeed's 5e8 fp32 elements (1.86 GiB) for a 4M-parameter
    rank would be 1.85 GiB allocated and never filled; the memory plan counts the same size."""
    from strata.parallel.plan import reduce_bucket_elements

    par = ParallelConfig(micro_batch_size=4, zero_stage=1)
    cfg = deepspeed_config(TrainConfig(global_batch_size=64).optimizer(), par, dp=8, local_params=3_700_000)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 3_700_000 == reduce_bucket_elements(3_700_000)
    assert reduce_bucket_elements(8_000_000_000) == 500_000_000


def test_batch_that_does_not_divide_names_the_fix():
    with pytest.raises(ValueError, match="train.global_batch_size: 60 is not a multiple of .* = 32; use 32"):
        deepspeed_config(TrainConfig(global_batch_size=60).optimizer(), ParallelConfig(micro_batch_size=4), dp=8)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    t = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine").optimizer()
    lrs = [lr_multiplier(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_wsd_schedule_is_flat_then_decays_linearly():
    t = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2).optimizer()
    lrs = [lr_multiplier(s, t) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70
    assert lrs[89] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    from strata.model.config import ModelConfig
    from strata.model.hybrid import HybridLM
    model = HybridLM(ModelConfig(vocab_size=64, d_model=64, pattern="M*-"))
    decay, other = param_groups(model, 0.1)
    named = dict(model.named_parameters())
    decayed = {n for n, p in named.items() if any(p is q for q in decay["params"])}
    assert "embed.weight" not in decayed
    assert not any(n.endswith(("A_log", "D", "dt_bias", "norm.weight", "bias")) for n in decayed)
    assert "blocks.0.mixer.in_proj.weight" in decayed and "blocks.1.mixer.q_proj.weight" in decayed
    assert len(decay["params"]) + len(other["params"]) == len(named)
    assert no_decay(named["blocks.0.mixer.A_log"])
