"""RMSNorm on CPU, plain or gated and grouped, as one autograd Function with a written-out backward.

The reference under autograd runs about a dozen passes over the activations (pow, mean, rsqrt,
two products and their backwards, the reductions of broadcast gradients); this runs four forward
and about seven backward, keeping the normalised input. Same arithmetic and contract as
rmsnorm_ref for inputs in the weight's dtype (ops.rmsnorm checks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size):
        d = x.shape[-1]
        gs = d if group_size is None else group_size
        h = x if z is None else x * F.silu(z)
        hg = h.view(*h.shape[:-1], d // gs, gs)
        rstd = torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)  # (..., groups, 1)
        hn = (hg * rstd).view(h.shape)
        ctx.save_for_backward(hn, rstd, weight, x if z is not None else None, z)
        ctx.group_size = gs
        return hn * weight

    @staticmethod
    def backward(ctx, dy):
        hn, rstd, weight, x, z = ctx.saved_tensors
        gs = ctx.group_size
        dweight = (dy * hn).reshape(-1, hn.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        g = (dy * weight).view(*hn.shape[:-1], -1, gs)
        hng = hn.view(g.shape)
        # d/dh of h * rstd(h): rstd * (g - hn * mean(g * hn)) over each group
        dh = torch.addcmul(g, hng, (g * hng).mean(-1, keepdim=True), value=-1.0).mul_(rstd).view(hn.shape)
        if z is None:
            return dh, dweight, None, None, None
        dx = dh * F.silu(z) if ctx.needs_input_grad[0] else None
        dz = torch.ops.aten.silu_backward(dh * x, z) if ctx.needs_input_grad[2] else None
        return dx, dweight, dz, None, None


def rmsnorm_cpu(x, weight, eps=1e-5, z=None, group_size=None):
    return RMSNormCPU.apply(x, weight, z, eps, group_size)
