"""The DeepSpeed engine: its JSON config generated from ours (never hand-written),
AdamW with decoupled weight decay on matrices, and the LR schedule."""
from __future__ import annotations

import math

import deepspeed
import torch
from deepspeed.runtime.utils import clip_grad_norm_

from strata.parallel.config import OptimizerConfig, ParallelConfig
from strata.parallel.engine.parallelize import deepspeed_pipeline_section
from strata.parallel.guard import GuardedAdamW
from strata.parallel.plan import REDUCE_BUCKET_ELEMENTS, reduce_bucket_elements


def data_parallel_size(world_size: int, par: ParallelConfig) -> int:
    """The ranks that draw different samples (context-parallel ranks share theirs)."""
    return world_size // (par.tp * par.cp * par.pp)


def grad_accumulation_steps(global_batch: int, par: ParallelConfig, dp: int) -> int:
    per_step = par.micro_batch_size * dp
    if global_batch % per_step:
        raise ValueError(f"train.global_batch_size: {global_batch} is not a multiple of "
                         f"parallel.micro_batch_size x data-parallel size = {per_step}; "
                         f"use {max(per_step, global_batch // per_step * per_step)}")
    return global_batch // per_step


def autocast_section(dtype: torch.dtype | None) -> dict:
    """DeepSpeed's engine turns off an autocast entered outside its forward on GPU (it warns once and
    runs the model in fp32), so the engine enters it itself. No module's gradients are marked for
    low-precision communication: they are reduced in fp32, as without autocast."""
    if dtype is None:
        return {}
    return {"torch_autocast": {"enabled": True, "dtype": str(dtype).removeprefix("torch."),
                               "lower_precision_safe_modules": []}}


def bf16_params_section() -> dict:
    """DeepSpeed's bf16 mode (train.param_dtype=bf16): the module in bf16, fp32 master weights and
    AdamW state in ZeRO's partitions. A step with a non-finite gradient is skipped (check_grad_overflow,
    ZeRO 1-3), and gradients are reduced in fp32 as in the fp32-parameter mode."""
    return {"bf16": {"enabled": True, "check_grad_overflow": True}, "communication_data_type": "fp32"}


def deepspeed_config(optim: OptimizerConfig, par: ParallelConfig, dp: int,
                     autocast: torch.dtype | None = None, local_params: int = REDUCE_BUCKET_ELEMENTS) -> dict:
    """`local_params`: the rank's parameters (its TP shard, its pipeline stage), which cap ZeRO's
    reduce bucket (plan.reduce_bucket_elements, what the memory plan counts)."""
    gas = grad_accumulation_steps(optim.global_batch_size, par, dp)
    pipeline = {"pipeline": deepspeed_pipeline_section(par.sequence_parallel)} if par.pp > 1 else {}
    return {
        # DeepSpeed counts context-parallel ranks as data-parallel ones (they average gradients
        # together), each with micro_batch_size rows of its pieces: its batch is cp times ours.
        "train_batch_size": optim.global_batch_size * par.cp,
        "train_micro_batch_size_per_gpu": par.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": zero0_clip_threshold(optim.grad_clip) if par.zero_stage == 0 else optim.grad_clip,
        "zero_optimization": {"stage": par.zero_stage, "reduce_bucket_size": reduce_bucket_elements(local_params)},
        # Our AdamW is torch's (it runs on CPU and GPU alike); ZeRO partitions its states.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        **pipeline,
        **(bf16_params_section() if optim.param_dtype == "bf16" else autocast_section(autocast)),
    }


def zero0_clip_threshold(grad_clip: float) -> float:
    """ZeRO 0 measures the gradient norm only where it clips (record_grad_norm), so no clipping
    (train.grad_clip 0) is an infinite threshold there: the norm is measured and every gradient kept
    (the clip coefficient is min(1, inf) = 1, exact)."""
    return grad_clip if grad_clip > 0 else math.inf


def record_grad_norm(engine) -> None:
    """At ZeRO 0 with fp32 parameters DeepSpeed clips with clip_grad_norm_ (runtime/utils.py) and
    drops the norm it measured, so get_global_grad_norm() said nothing; ZeRO 1-3 and the bf16
    optimizer record theirs. Same call, same arguments, its norm kept: the norm before clipping,
    over every pipeline stage's and tensor-parallel rank's parameters, each counted once
    (pipeline.stages.count_once_in_zero0_clipping marks them for it)."""
    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
    engine.clip_fp32_gradients = clip_and_record


def no_decay(param: torch.Tensor) -> bool:
    """What the model declared exempt (model/hybrid.py declare_no_weight_decay)."""
    return getattr(param, "_no_weight_decay", False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (other if no_decay(p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def lr_multiplier(step: int, optim: OptimizerConfig) -> float:
    """The multiple of train.lr at optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "wsd":
        decay_steps = max(1, round(optim.decay_fraction * optim.max_steps))
        decay_start = optim.max_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps + 1) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: torch.nn.Module, optim: OptimizerConfig, par: ParallelConfig, world_size: int, mpu=None,
                 autocast: torch.dtype | None = None):
    """`autocast`: the dtype the engine's forward computes its matmuls in (None: the parameters';
    with optim.param_dtype bf16 the engine casts the module to bf16 itself)."""
    dp = data_parallel_size(world_size, par)
    local_params = sum(p.numel() for p in model.parameters())
    # ZeRO 1-3 skip a non-finite step themselves; at stage 0 the engine calls AdamW directly.
    adamw = GuardedAdamW if par.zero_stage == 0 else torch.optim.AdamW
    # torch's fused AdamW does foreach's arithmetic in one kernel per parameter group (CUDA) or one
    # pass per tensor (CPU, where the default is a Python loop: 3x faster on the tiny model).
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in model.parameters())
    optimizer = adamw(param_groups(model, optim.weight_decay), lr=optim.lr,
                      betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fusable or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, optim))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(optim, par, dp, autocast, local_params), mpu=mpu)
    record_grad_norm(engine)
    return engine


def apply_schedule_now(engine, lr: float) -> None:
    """Every param group's lr as this run's schedule (peak `lr`, train.lr) gives it at the restored
    step. A checkpoint stores the lr its own schedule gave; after a resume with another
    train.max_steps, warmup, schedule or lr, the first step must already use the new one."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
