"""The causal depthwise conv1d (+ SiLU) of Mamba2 on CPU: width shifted multiply-adds over the
channel-last input, as one autograd Function.

The reference goes through F.conv1d, which for channel-last (b, l, d) input transposes to
(b, d, l), pads, runs oneDNN's depthwise convolution and transposes back, forward and backward;
with a width of 4 the work is a few passes over (b, l, d), and doing exactly those is 2-3x faster
on CPU (docs/BENCHMARKS.md). Same contract as causal_conv1d_ref without seq_idx.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "none", "silu", "swish")


class CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        width, length = weight.shape[1], x.shape[1]
        xp = F.pad(x, (0, 0, width - 1, 0))  # (b, l + w - 1, d)
        pre = xp[:, width - 1:] * weight[:, width - 1]
        if bias is not None:
            pre += bias
        for k in range(width - 1):
            pre.addcmul_(xp[:, k:k + length], weight[:, k])
        ctx.save_for_backward(xp, weight, pre if silu else None)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, dy):
        xp, weight, pre = ctx.saved_tensors
        width = weight.shape[1]
        length = xp.shape[1] - width + 1
        dpre = torch.ops.aten.silu_backward(dy, pre) if ctx.silu else dy.contiguous()
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:  # x_t feeds y_{t + w - 1 - k} through weight[:, k]
            dp = F.pad(dpre, (0, 0, 0, width - 1))
            dx = dpre * weight[:, width - 1]
            for k in range(width - 1):
                dx.addcmul_(dp[:, width - 1 - k:width - 1 - k + length], weight[:, k])
        if ctx.needs_input_grad[1]:
            dweight = torch.stack([(dpre * xp[:, k:k + length]).sum((0, 1)) for k in range(width)], 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dpre.sum((0, 1))
        return dx, dweight, dbias, None


def causal_conv1d_cpu(x, weight, bias=None, activation="silu"):
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}; use 'silu' or None")
    return CausalConv1dCPU.apply(x, weight, bias, activation in ("silu", "swish"))
