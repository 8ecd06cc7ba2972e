"""FP8 linears: y = x @ W^T with its three products (output, input gradient, weight gradient) each
quantised with the current scales of its recipe (recipe.py) and run by torch._scaled_mm, which runs
on CUDA (H100: FP8 tensor cores) and, in PyTorch 2.13 (the CPU build pyproject.toml pins), on CPU
too: the tests run the same FP8 products as a GPU.

Operands enter in the compute dtype (bf16 under autocast, else their own). Tensorwise keeps their
float8 casts for the backward; rowwise keeps them in the compute dtype and quantises them again
along the backward products' contraction dimensions (other scales than the forward's).
Gradients leave in the operands' dtypes; bias, master weights and optimizer never see FP8.

Tensor parallelism: a shard's absolute maxima are not the whole tensor's. With `group` (the TP
group) and `split` (OUT, IN or TOKENS below: which dimension is split over the group), an amax
taken over a split dimension is the maximum over the group, so every rank quantises with the scales
one process holding the whole tensor would use, and a layout computes what one process computes
(replicated operands need no reduction: every rank holds the same values).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from strata.kernels.fp8.recipe import EPS, fp8_max, operand_dtypes, power_of_2_scales

OUT, IN, TOKENS = "out", "in", "tokens"
"""How a tensor-parallel linear's operands are split over its group: output features (a column-parallel
linear), input features (row-parallel), or tokens (a replicated weight applied to this rank's part
of the sequence under sequence parallelism)."""


def scale_for(amax: torch.Tensor, dtype: torch.dtype, power_of_2: bool) -> torch.Tensor:
    """fp8_max / amax in float64, as float32; rounded down to a power of two when asked."""
    scale = (fp8_max(dtype) / amax.double().clamp(min=EPS)).float()
    return torch.exp2(torch.floor(torch.log2(scale))) if power_of_2 else scale


def quantise(t: torch.Tensor, dtype: torch.dtype, recipe: str, dim: int | None,
             group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t * scale cast to `dtype` with saturation, 1 / scale): one scale for the tensor, or, rowwise,
    one per slice along `dim` (the product's contraction dim), shaped to broadcast against t. `group`:
    the amax is the maximum over it (t's shards)."""
    rowwise = recipe == "rowwise"
    amax = t.abs().amax(dim=dim, keepdim=True) if rowwise else t.abs().amax()
    amax = amax.float()
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scale = scale_for(amax, dtype, power_of_2_scales(recipe))
    limit = fp8_max(dtype)
    return (t.float() * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, out_dtype: torch.dtype,
              fast_accum: bool = False) -> torch.Tensor:
    """a (m, k) @ b (k, n) of FP8 operands, dequantised by the reciprocal scales (scalars, or (m, 1)
    and (1, n)). cuBLASLt wants a row-major and b column-major; its rowwise kernels write bf16 only."""
    a, b = a.contiguous(), b.t().contiguous().t()
    mm_dtype = torch.bfloat16 if a.is_cuda and a_inv.numel() > 1 else out_dtype
    y = torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=mm_dtype,
                         use_fast_accum=fast_accum and a.is_cuda)
    return y.to(out_dtype)


def reduced_over(group, split: str | None, recipe: str, dims: tuple[str, ...], contraction: str):
    """The group an operand's amax is reduced over, or None. dims names its dimensions ('m' tokens,
    'k' input features, 'n' output features); the split shards 'n' (OUT), 'k' (IN) or 'm' (TOKENS). Tensorwise
    reduces any sharded operand; rowwise only where the contraction (its scales' span) is sharded."""
    sharded = {OUT: "n", IN: "k", TOKENS: "m"}.get(split)
    if group is None or sharded is None or sharded not in dims:
        return None
    return group if recipe == "tensorwise" or sharded == contraction else None


def as_row(scales: torch.Tensor) -> torch.Tensor:
    """Per-row scales (r, 1) of a transposed operand as the (1, r) its product wants (a scalar stays)."""
    return scales.reshape(1, -1) if scales.dim() else scales


def as_column(scales: torch.Tensor) -> torch.Tensor:
    """(1, r) scales as (r, 1), with the unit strides torch._scaled_mm checks (a transpose keeps r's)."""
    return scales.reshape(-1, 1) if scales.dim() else scales


class FP8Linear(torch.autograd.Function):
    """x (m, k) @ weight (n, k)^T in FP8; both already in the compute dtype. Tensorwise keeps the
    forward's float8 operands for the backward (their one scale serves every product: half the bytes
    of bf16 and no second cast); rowwise keeps the compute-dtype operands and quantises them again
    along the backward products' own contraction dimensions."""

    @staticmethod
    def forward(ctx, x, weight, recipe, group, split):
        ctx.recipe, ctx.group, ctx.split, ctx.dtypes = recipe, group, split, (x.dtype, weight.dtype)
        fwd, _ = operand_dtypes(recipe)
        xq, x_inv = quantise(x, fwd, recipe, 1, reduced_over(group, split, recipe, ("m", "k"), "k"))
        wq, w_inv = quantise(weight, fwd, recipe, 1, reduced_over(group, split, recipe, ("n", "k"), "k"))
        if recipe == "tensorwise":
            ctx.save_for_backward(xq, x_inv, wq, w_inv)
        else:
            ctx.save_for_backward(x, weight)
        return scaled_mm(xq, wq.t(), x_inv, as_row(w_inv), x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        x_dtype, w_dtype = ctx.dtypes
        for_dx, for_dw = (backward_operands_tensorwise if ctx.recipe == "tensorwise" else backward_operands)(ctx, dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy (m, n) @ W (n, k): contraction over n
            dyq, dy_inv, wq, w_inv = for_dx
            dx = scaled_mm(dyq, wq, dy_inv, w_inv, x_dtype)
        if ctx.needs_input_grad[1]:  # dy^T (n, m) @ x (m, k): contraction over the tokens m
            dyq, dy_inv, xq, x_inv = for_dw
            dw = scaled_mm(dyq.t(), xq, as_column(dy_inv), x_inv, w_dtype)
        return dx, dw, None, None, None


def backward_operands_tensorwise(ctx, dy: torch.Tensor) -> tuple[tuple, tuple]:
    """(dy, 1 / its scale, W, 1 / its scale) and the same with x: dy cast once, the forward's casts."""
    xq, x_inv, wq, w_inv = ctx.saved_tensors
    _, grad = operand_dtypes(ctx.recipe)
    dyq, dy_inv = quantise(dy, grad, ctx.recipe, None, reduced_over(ctx.group, ctx.split, ctx.recipe, ("m", "n"), "n"))
    return (dyq, dy_inv, wq, w_inv), (dyq, dy_inv, xq, x_inv)


def backward_operands(ctx, dy: torch.Tensor) -> tuple[tuple | None, tuple | None]:
    """The backward products' operands, each quantised along its product's contraction dimension:
    n for the input gradient, the tokens m for the weight gradient (None where none is needed)."""
    x, weight = ctx.saved_tensors
    recipe, group, split = ctx.recipe, ctx.group, ctx.split
    fwd, grad = operand_dtypes(recipe)
    for_dx = for_dw = None
    if ctx.needs_input_grad[0]:
        for_dx = (*quantise(dy, grad, recipe, 1, reduced_over(group, split, recipe, ("m", "n"), "n")),
                  *quantise(weight, fwd, recipe, 0, reduced_over(group, split, recipe, ("n", "k"), "n")))
    if ctx.needs_input_grad[1]:
        for_dw = (*quantise(dy, grad, recipe, 0, reduced_over(group, split, recipe, ("m", "n"), "m")),
                  *quantise(x, fwd, recipe, 0, reduced_over(group, split, recipe, ("m", "k"), "m")))
    return for_dx, for_dw


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the product runs in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: str,
               group=None, split: str | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the product in FP8 (`recipe`); x (..., k). The bias is added in
    the compute dtype."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = FP8Linear.apply(x2, weight.to(dtype), recipe, group, split).unflatten(0, x.shape[:-1])
        return y if bias is None else y + bias.to(dtype)


def unavailable(recipe: str, device: torch.device) -> str | None:
    """Why `recipe` cannot run on `device`, in a few words, or None: one product of each kind (output,
    input and weight gradients) tried on 16 x 16 operands, which is what the PyTorch build, the GPU
    (FP8 GEMMs need compute capability 8.9+) and cuBLASLt together allow."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"PyTorch {torch.__version__} has no float8 GEMM (torch._scaled_mm)"
    try:
        x = torch.ones(16, 16, device=device, requires_grad=True)
        fp8_linear(x, torch.ones(16, 16, device=device), None, recipe).sum().backward()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"torch._scaled_mm says: {str(e).strip().splitlines()[0]}"
    return None
