"""Rebuild the DeepSpeed engine after parameters left the model (the dense paths of
self-guided training, model/guidance.py), carrying every remaining parameter's optimizer
state, the LR schedule and the step counters over: the run continues as if the removed
parameters had never been there, and they hold no optimizer state afterwards.

ZeRO stage 0 keeps torch's per-parameter state; stages 1 and 2 keep flat fp32 partitions,
read and written per parameter through deepspeed.utils' safe_get/safe_set helpers (stage 3,
written only by parallel/checkpoint/reshard.py, through safe_set_local_optimizer_state). With bf16
parameters (DeepSpeed's bf16 mode) the fp32 master weights in those partitions are
carried the same way: a fresh engine builds them from the bf16 module, rounded.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state)

from strata.parallel.config import OptimizerConfig, ParallelConfig
from strata.parallel.engine.build import build_engine

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def supports_rebuild(zero_stage: int) -> bool:
    return zero_stage in (0, 1, 2)


def rebuild_engine(old, model: torch.nn.Module, optim: OptimizerConfig, par: ParallelConfig, world_size: int,
                   mpu=None):
    """Collective (every rank calls it). `model` is old.module with parameters removed."""
    if not supports_rebuild(par.zero_stage):
        raise ValueError(f"parallel.zero_stage: dropping parameters mid-run supports ZeRO stages 0-2, "
                         f"not {par.zero_stage}")
    kept = [p for p in model.parameters() if p.requires_grad]
    states, step = _read_states(old, kept, par.zero_stage)
    masters = {p: safe_get_full_fp32_param(p) for p in kept} if has_bf16_masters(old) else {}
    lr_state = old.lr_scheduler.state_dict()
    counters = {k: getattr(old, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")}
    autocast = old.torch_autocast_dtype() if old.torch_autocast_enabled() else None
    old.destroy()  # removes its gradient hooks from the parameters we keep
    new = build_engine(model, optim, par, world_size, mpu, autocast)
    if masters:
        write_master_weights(new, kept, masters.__getitem__)
    write_optimizer_states(new, kept, states.get, step, par.zero_stage)
    restore_schedule(new, lr_state, counters)
    return new


def has_bf16_masters(engine) -> bool:
    """DeepSpeed's bf16 mode: bf16 module parameters, fp32 masters in ZeRO's partitions."""
    return engine.bfloat16_enabled()


def write_master_weights(engine, params, weight_of) -> None:
    """Each parameter's fp32 master weight (weight_of(p), unpartitioned) into a bf16-mode engine,
    whose masters were rounded from the bf16 module when it was built. The module already holds
    them rounded to bf16: nothing else changes."""
    zero3 = engine.zero_optimization_stage() == 3
    for p in params:
        weight = weight_of(p).to(torch.float32)
        if zero3:
            safe_set_local_fp32_param(p, zero3_local_part(p, weight, engine.optimizer).to(p.ds_tensor.device))
        else:
            safe_set_full_fp32_param(p, weight.to(p.device))


def zero3_local_part(p, full: torch.Tensor, zero) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full tensor of p, padded as DeepSpeed pads it (its
    set_full_hp_param reads past the end of a parameter whose size the ranks do not divide)."""
    part = p.ds_tensor.numel()
    rank, world = dist.get_rank(group=zero.dp_process_group), dist.get_world_size(group=zero.dp_process_group)
    flat = full.flatten()
    return torch.nn.functional.pad(flat, (0, part * world - flat.numel())).narrow(0, part * rank, part)


def restore_schedule(engine, lr_scheduler_state: dict | None, counters: dict) -> None:
    """The LR schedule where it was, each param group's lr with it, and DeepSpeed's step
    counters, in a fresh engine (also parallel/checkpoint/reshard.py's)."""
    if lr_scheduler_state is not None:
        engine.lr_scheduler.load_state_dict(lr_scheduler_state)
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for k, v in counters.items():
        setattr(engine, k, v)


def _inner(engine):
    """The torch optimizer: the engine's own at stage 0, the ZeRO wrapper's inside at 1-2."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "single_partition_of_fp32_groups") else opt


def _read_states(engine, params, stage):
    inner = _inner(engine)
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    step = steps[0].clone() if steps else None
    if step is None:  # no optimizer step taken yet: nothing to carry
        return {}, None
    if stage == 0:
        return {p: dict(inner.state[p]) for p in params if p in inner.state}, step
    _relink(engine.optimizer)
    return {p: {k: safe_get_full_optimizer_state(p, k) for k in ADAM_STATES} for p in params}, step


def placed_step(optimizer: torch.optim.Optimizer, param: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """AdamW's `step` where torch's own Optimizer.load_state_dict puts it: for a fused or capturable
    group, an fp32 tensor on the parameter's device (a CPU step beside CUDA parameters fails fused AdamW);
    otherwise as saved. The state written here skips load_state_dict, so it applies the rule itself."""
    if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"):  # one AdamW: every group alike
        return step.to(device=param.device, dtype=torch.float32, copy=True)
    return step.clone()


def write_optimizer_states(engine, params, state_of, step, stage):
    """Each parameter's AdamW state into a fresh engine (also parallel/checkpoint/reshard.py's way in):
    state_of(p) gives exp_avg and exp_avg_sq (and, for stage 0, step), unpartitioned, or
    None for a parameter without state; it is called once per parameter, when needed."""
    if step is None:
        return
    inner = _inner(engine)
    if stage == 0:
        for p in params:
            state = state_of(p)
            if state is not None:
                inner.state[p] = {**state, "step": placed_step(inner, p, state["step"])}
        return
    zero = engine.optimizer
    if stage == 3:
        _write_zero3_states(zero, params, state_of, step)
        return
    # ZeRO links per-parameter views into its flat state only after a first step; create
    # the flat state now (the values are overwritten below) and link it.
    for flat in zero.single_partition_of_fp32_groups:
        inner.state[flat] = {"step": placed_step(inner, flat, step), **{k: torch.zeros_like(flat) for k in ADAM_STATES}}
    _relink(zero)
    for p in params:
        state = state_of(p)
        for k in ADAM_STATES:
            safe_set_full_optimizer_state(p, state[k].to(p.device, torch.float32), k)


def _write_zero3_states(zero, params, state_of, step) -> None:
    """ZeRO-3 creates AdamW's state per flat sub-group at the first step: create it, then copy
    each parameter's partition of its state in."""
    for flat in zero.fp32_partitioned_groups_flat:
        zero.optimizer.state[flat] = {"step": placed_step(zero.optimizer, flat, step),
                                      **{k: torch.zeros_like(flat) for k in ADAM_STATES}}
    for p in params:
        state = state_of(p)
        for k in ADAM_STATES:
            safe_set_local_optimizer_state(p, zero3_local_part(p, state[k].to(torch.float32), zero).to(p.ds_tensor.device), k)


def _relink(zero) -> None:
    """(Re)build each parameter's view into ZeRO's flat optimizer state. DeepSpeed links
    them once, right after the first group's first step, so the views of the other param
    groups (here: the no-weight-decay group) stay empty; linking again fixes that."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
