"""Linear layers on CPU through oneDNN: x @ W^T + b, forward and backward, in fp32.

PyTorch's CPU matmul for fp32 calls MKL's sgemm. oneDNN picks its kernels by the CPU's features
alone (AVX-512 on the AMD EPYC of docs/BENCHMARKS.md, where a linear's forward and backward ran
1.3-1.8x faster than through F.linear, and the whole training step about 1.3x). Its fp32 matmul
keeps fp32 arithmetic (no bf16 or tf32 shortcut unless torch.backends.mkldnn is told otherwise),
so results differ from MKL's only in summation order. torch.ops.mkldnn._linear_pointwise is the
op inductor itself calls for CPU linears; `available()` is False where this PyTorch build lacks
it, and ops.linear then keeps F.linear. oneDNN takes the transposed operands of the backward's
products as they are (it reorders them itself, as fast as from a contiguous copy).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU tensors outside autocast (autocast's bf16 linears stay PyTorch's)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and available())


MIN_MACS = 2**22
"""Below about 4M multiply-adds oneDNN's per-call cost eats its gain. Forward + backward on one
thread of the 2-core VM: 32 rows of a 64 -> 208 linear 91 us (F.linear 54 us), 128 rows even,
256 rows of 256 -> 704 1.8x faster than F.linear, 2048 rows 1.8x."""


def worth_it(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the product is large enough for oneDNN to pay (see MIN_MACS)."""
    return x.numel() * weight.shape[0] >= MIN_MACS


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias) by oneDNN; a (..., k), b (n, k)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class LinearCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm_t(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm_t(dy, weight.t())
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[1]:
                dw = _mm_t(dy2.t(), x.reshape(-1, x.shape[-1]).t())
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.sum(0)
        return dx, dw, db


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return LinearCPU.apply(x, weight, bias)
