"""PyTorch reference for RMSNorm, plain or gated and grouped (Mamba2's RMSNormGated).

Gated: y = rmsnorm(x * silu(z)) * weight, the norm taken over groups of
`group_size` channels (norm_before_gate=False, as in Mamba2). Statistics in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_ref(x, weight, eps=1e-5, z=None, group_size=None):
    dtype = x.dtype
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    if z is not None:
        h = h * F.silu(z.to(h.dtype))
    d = h.shape[-1]
    gs = d if group_size is None else group_size
    h = h.reshape(*h.shape[:-1], d // gs, gs)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.reshape(*h.shape[:-2], d) * weight.to(h.dtype)).to(dtype)
