"""Helpers shared by the Triton kernels: numerics that never exponentiate a positive
number, block-size choice, and the interpreter switch.

Everything here runs under TRITON_INTERPRET=1 on CPU: block sizes come from plain
functions (no autotune), and nothing calls torch.cuda on the CPU path.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype):
    """`input_precision` for tl.dot: exact fp32 for fp32 inputs, the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_hint(t: torch.Tensor) -> int:
    """How many programs fill the device: the SM count on CUDA, a few under the interpreter."""
    if t.is_cuda:
        return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4


def contiguous_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor with unit stride in its last dim (a copy only when needed)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


@triton.jit
def sigmoid(x):
    # exp of -|x| only: never overflows.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def silu_grad(x):
    """d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def softplus(x):
    # max(x, 0) + log(1 + exp(-|x|)): the exponent is never positive.
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
