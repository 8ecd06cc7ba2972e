"""The divergence guard: a step whose loss or gradient is not finite is never applied.

One rule for every layout: the step is skipped when the global gradient is not finite, and a
non-finite loss makes its own gradient non-finite (`poison_non_finite`), so it falls under the
same rule. DeepSpeed's ZeRO 1-3 optimizers already skip such a step (their global norm is
checked before the update, marked `overflow`); with ZeRO 0 the engine calls torch's AdamW
directly, which `GuardedAdamW` makes do the same. Either way the engine then leaves the LR
schedule where it was and counts the step in `engine.skipped_steps`, so the weights, optimizer
state and schedule are those of a run that never took the step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def poison_non_finite(loss: torch.Tensor) -> torch.Tensor:
    """The loss itself where finite; else NaN, whose gradient is NaN in every parameter it
    reaches (an infinite loss can have a finite gradient: cross-entropy's is bounded). Decided on
    the device, without a host synchronisation: times 1 (exact) or times NaN."""
    finite = torch.isfinite(loss.detach()).all()
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that skips a step whose gradient is not finite on any rank. `overflow` is
    what DeepSpeed's engine reads after optimizer.step() to skip the schedule and count it."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.overflow = False

    def step(self, closure=None):
        self.overflow = not gradients_finite(self)
        if self.overflow:
            return None
        return super().step(closure)


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Collective over every rank: each holds the (data-parallel reduced) gradients of its own
    model-parallel part, so one bad rank stops every rank's step."""
    return _all_ranks_finite([p.grad for group in optimizer.param_groups for p in group["params"]
                              if p.grad is not None])


def parameters_finite(engine) -> bool:
    """Collective: every rank's weights (its ZeRO-3 partition, where parameters are partitioned)
    are finite. Checked before a checkpoint is written, which a diverged run falls back to."""
    local = [getattr(p, "ds_tensor", p).detach() for p in engine.module.parameters()]
    return _all_ranks_finite(local)


def _all_ranks_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync: the norms of all tensors at once are NaN or inf wherever one is."""
    tensors = [t for t in tensors if t.numel()]
    if tensors:
        bad = (~torch.isfinite(torch.stack(torch._foreach_norm(tensors)))).any().float().reshape(1)
    else:
        bad = torch.zeros(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


class SpikeGuard:
    """The optional loss-spike guard (train.spike_zscore > 0): a loss more than `zscore` standard
    deviations above the mean of the last `window` applied steps is a spike. It is logged; with
    `skip`, a micro-batch whose loss is a spike is poisoned like a non-finite one, so the step is
    skipped on every rank. Every rank keeps the same history (the all-reduced step losses), so
    they judge alike. The history starts empty at each start and judges nothing until it holds
    `window` // 2 losses."""

    def __init__(self, zscore: float, window: int, skip: bool):
        from collections import deque

        self.zscore, self.skip = zscore, skip
        self.history = deque(maxlen=window)

    def zscore_of(self, loss: float) -> float:
        if self.zscore <= 0 or len(self.history) < max(2, self.history.maxlen // 2):
            return 0.0
        values = torch.tensor(list(self.history), dtype=torch.float64)
        return (loss - values.mean().item()) / max(values.std().item(), 1e-12)

    def is_spike(self, loss: float) -> bool:
        return math.isfinite(loss) and self.zscore_of(loss) > self.zscore

    def gate(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: poisoned when it is a spike and spikes are skipped."""
        if self.skip and self.is_spike(loss.item()):
            return loss * float("nan")
        return loss

    def record(self, step_loss: float, applied: bool) -> None:
        if applied and math.isfinite(step_loss):
            self.history.append(step_loss)
