"""The FP8 recipes (recipe.py) emulated in float64, to test scaled.py against: scales from float64
maxima, operands rounded to the float8 grid and dequantised exactly, products summed in float64.
No torch._scaled_mm, no float32 anywhere but the scale itself (which the recipe rounds to float32).
"""
from __future__ import annotations

import torch

from strata.kernels.fp8.recipe import EPS, fp8_max, operand_dtypes, power_of_2_scales


def quantise_ref(t: torch.Tensor, dtype: torch.dtype, recipe: str,
                 dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float8 values as float64, their float64 scale): t * scale, saturated, rounded to `dtype`."""
    t = t.double()
    amax = t.abs().amax(dim=dim, keepdim=True) if recipe == "rowwise" else t.abs().amax()
    scale = (fp8_max(dtype) / amax.clamp(min=EPS)).float().double()
    if power_of_2_scales(recipe):
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    limit = fp8_max(dtype)
    return (t * scale).clamp(-limit, limit).to(dtype).double(), scale


def dequantised_ref(t: torch.Tensor, dtype: torch.dtype, recipe: str, dim: int | None) -> torch.Tensor:
    """What an operand is worth after quantisation, in float64."""
    q, scale = quantise_ref(t, dtype, recipe, dim)
    return q / scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, recipe: str) -> torch.Tensor:
    """x (m, k) @ weight (n, k)^T as the recipe computes it, in float64."""
    fwd, _ = operand_dtypes(recipe)
    return dequantised_ref(x, fwd, recipe, 1) @ dequantised_ref(weight, fwd, recipe, 1).t()


def fp8_linear_grads_ref(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                         recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of x, grad of weight) for the output gradient dy (m, n), in float64: each product
    quantises its operands along its own contraction dimension."""
    fwd, grad = operand_dtypes(recipe)
    dx = dequantised_ref(dy, grad, recipe, 1) @ dequantised_ref(weight, fwd, recipe, 0)
    dw = dequantised_ref(dy, grad, recipe, 0).t() @ dequantised_ref(x, fwd, recipe, 0)
    return dx, dw
