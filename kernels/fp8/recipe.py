"""FP8 training recipes with dynamic current scaling, as torchao's float8 training defines them
(torchao/float8/config.py `Float8LinearConfig.from_recipe_name`, float8_utils.py `amax_to_scale`):

- 'tensorwise': one scale per operand (its absolute maximum); input and weight in e4m3, the output
  gradient in e5m2 (more range, less precision: gradients span more magnitudes).
- 'rowwise': one scale per row along each product's contraction dimension (a token's row of the
  input, an output row of the weight, ...: torchao's "axiswise"), every operand in e4m3, the
  scales rounded down to powers of two (exact to apply, and what torchao's recipe does).

scale = fp8_max / max(amax, EPS), computed in float64 and rounded to float32 (torchao computes it so
that eager and compiled code agree); the operand is multiplied by it in float32 and cast with
saturation to +-fp8_max. The GEMM receives the reciprocal scales (torch._scaled_mm multiplies by
them). This file holds the constants both the GEMM (scaled.py) and its float64 emulation
(reference.py) read.
"""
from __future__ import annotations

import torch

RECIPES = ("tensorwise", "rowwise")
"""train.fp8's values besides 'none'."""

EPS = 1e-12
"""The smallest amax a scale is computed from (torchao's EPS): an all-zero operand gets a finite scale."""

ALIGNMENT = 16
"""torch._scaled_mm's dimensions must be multiples of 16 on CUDA (cuBLASLt's FP8 layouts)."""


def operand_dtypes(recipe: str) -> tuple[torch.dtype, torch.dtype]:
    """(forward operands, output gradient) float8 dtypes of `recipe`."""
    if recipe == "tensorwise":
        return torch.float8_e4m3fn, torch.float8_e5m2
    if recipe == "rowwise":
        return torch.float8_e4m3fn, torch.float8_e4m3fn
    raise ValueError(f"fp8: {recipe!r} is not one of {', '.join(map(repr, RECIPES))}")


def power_of_2_scales(recipe: str) -> bool:
    return recipe == "rowwise"


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def aligned(*sizes: int) -> bool:
    """Whether every size is a multiple of ALIGNMENT (a product FP8 can take)."""
    return all(s % ALIGNMENT == 0 for s in sizes)
