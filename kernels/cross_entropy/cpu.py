"""The LM head fused with cross-entropy on CPU: rows in chunks, each chunk's logits computed once
(oneDNN, kernels/linear/cpu.py) and turned in place into the gradient softmax - onehot, whose
products with the head and the hidden states are the loss's gradients, computed in the forward
and scaled in the backward (as the Triton op does, kernels/cross_entropy/kernel.py).

Against the reference (all logits, log_softmax, nll_loss, their backwards): no logits-sized
tensor is kept or allocated more than once per chunk, and a chunk's logits (8 MiB) stay in cache
between the passes over them. Same contract as linear_cross_entropy_ref (no vocab parallelism).
"""
from __future__ import annotations

import torch

from strata.kernels.linear.cpu import _mm_t

CHUNK_ELEMENTS = 2**21
"""Logits per chunk: rows = CHUNK_ELEMENTS // vocab (512 rows of a 4096 vocabulary)."""


def _loss_and_grads(hidden, weight, targets, ignore_index, want_grad):
    """Summed loss over the targets that count, their number, and (want_grad) the gradients of the
    summed loss with respect to hidden and weight."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS // vocab)
    total = hidden.new_zeros(())
    dh = torch.empty_like(hidden) if want_grad else None
    dw_t = hidden.new_zeros(weight.shape[1], vocab) if want_grad else None  # dW^T: oneDNN reads d^T as its 'weight'
    for start in range(0, n, rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)[:, None]
        logits = _mm_t(h, weight)  # (rows, V) fp32
        lse = torch.logsumexp(logits, dim=-1)
        total += torch.where(valid, lse - logits.gather(1, safe)[:, 0], 0.0).sum()
        if want_grad:
            d = logits.sub_(lse[:, None]).exp_()  # softmax
            d.scatter_add_(1, safe, torch.full_like(lse, -1.0)[:, None])
            d.mul_(valid[:, None])
            dh[start:start + rows] = _mm_t(d, weight.t())
            dw_t += _mm_t(h.t(), d.t())
    return total, (targets != ignore_index).sum(), dh, None if dw_t is None else dw_t.t().contiguous()


class LinearCrossEntropyCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, want_grad):
        total, count, dh, dw = _loss_and_grads(hidden, weight, targets, ignore_index, want_grad)
        ctx.save_for_backward(dh, dw, count)
        ctx.reduction = reduction
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        dh, dw, count = ctx.saved_tensors
        scale = grad / count if ctx.reduction == "mean" else grad
        # every row that counts has a gradient; with none (count 0, scale inf) they are all zero
        scale = torch.where(count > 0, scale, 0.0)
        return (dh * scale if ctx.needs_input_grad[0] else None, dw * scale if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def linear_cross_entropy_cpu(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """hidden (N, d), weight (V, d), targets (N,), on CPU in fp32 (ops.linear_cross_entropy checks)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r} is not supported; use 'mean' or 'sum'")
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropyCPU.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                       ignore_index, reduction, want_grad)
