"""The one dispatch point per kernel op: the model calls only these functions.

Backend choice (`backend_for`): Triton when the tensors are on CUDA and Triton
imports, the PyTorch reference otherwise. STRATA_KERNELS=reference forces the
reference everywhere; STRATA_KERNELS=triton forces Triton (with TRITON_INTERPRET=1
this runs the Triton kernels on CPU, as the kernel tests do).
"""
from __future__ import annotations

import functools
import os

import torch

from kernels.blockdiag.reference import blockdiag_matmul_ref
from kernels.conv.reference import causal_conv1d_ref, causal_conv1d_step_ref
from kernels.cross_entropy.reference import linear_cross_entropy_ref
from kernels.norm.reference import rmsnorm_ref
from kernels.ssd.reference import ssd_chunked_ref, ssd_step_ref

BACKENDS = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(t: torch.Tensor) -> str:
    choice = os.environ.get("STRATA_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"STRATA_KERNELS={choice!r} is not a backend; use one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if t.is_cuda and triton_available() else "reference"
    return choice


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                initial_states=None, return_final_states=False):
    """Chunked SSD scan; see kernels/ssd/reference.py for shapes."""
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                           initial_states, return_final_states)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step of the SSD recurrence: returns (y, new_state)."""
    return ssd_step_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(x, weight, bias=None, activation="silu"):
    """Causal depthwise conv1d over x (b, l, d) with weight (d, w)."""
    return causal_conv1d_ref(x, weight, bias, activation)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One decoding step of the conv: returns (y, new_state)."""
    return causal_conv1d_step_ref(x, conv_state, weight, bias, activation)


def rmsnorm(x, weight, eps=1e-5, z=None, group_size=None):
    """RMSNorm over the last dim; gated by silu(z) and grouped when given."""
    return rmsnorm_ref(x, weight, eps, z, group_size)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100):
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets."""
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index)


def blockdiag_matmul(x, w, shuffle=False):
    """Block-diagonal matmul, optionally with the stride-nblocks output shuffle."""
    return blockdiag_matmul_ref(x, w, shuffle)
