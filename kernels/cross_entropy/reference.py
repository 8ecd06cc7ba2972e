"""PyTorch reference for the LM head fused with cross-entropy: all logits materialised."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """hidden (N, d), weight (V, d), targets (N,). Mean over targets that are not ignored."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


class _AllReduceForward(torch.autograd.Function):
    """Sum over the group in the forward; identity in the backward (every rank holds the
    same loss, so each rank's share receives the upstream gradient unchanged)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToGroup(torch.autograd.Function):
    """Identity in the forward; sums the gradient over the group in the backward."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def vocab_parallel_linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100, reduction="mean",
                                            process_group=None, vocab_start=0):
    """The same loss with the head's rows split over `process_group`: weight is this rank's
    shard (V_local, d) of global ids [vocab_start, vocab_start + V_local). hidden is
    replicated; its gradient is summed over the group (as the Triton op does)."""
    hidden = _CopyToGroup.apply(hidden, process_group)
    logits = F.linear(hidden, weight).float()
    vocab = weight.shape[0]
    with torch.no_grad():
        m = logits.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    sumexp = _AllReduceForward.apply(torch.exp(logits - m[:, None]).sum(-1), process_group)
    local = targets - vocab_start
    inside = (local >= 0) & (local < vocab)
    t = logits.gather(1, local.clamp(0, vocab - 1)[:, None])[:, 0] * inside
    t = _AllReduceForward.apply(t, process_group)
    valid = targets != ignore_index
    losses = torch.where(valid, torch.log(sumexp) + m - t, 0.0)
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / valid.sum()
    raise ValueError(f"linear_cross_entropy: reduction {reduction!r} is not supported; use 'mean' or 'sum'")
