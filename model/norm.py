"""RMSNorm modules; the arithmetic is the kernels' (kernels.ops.rmsnorm)."""
from __future__ import annotations

import torch
from torch import nn

from strata.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Plain RMSNorm, or gated by silu(z) and grouped when z is given (Mamba2's RMSNormGated)."""
        return ops.rmsnorm(x, self.weight, self.eps, z=z, group_size=self.group_size)
