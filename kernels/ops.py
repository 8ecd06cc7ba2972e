"""The one dispatch point per kernel op: the model calls only these functions.

Backend choice (`backend_for`): Triton when the tensors are on CUDA and Triton
imports, the CPU paths for CPU tensors, the PyTorch reference otherwise.
STRATA_KERNELS=reference forces the reference everywhere; STRATA_KERNELS=cpu the CPU paths
(where their inputs allow); STRATA_KERNELS=triton forces Triton (with TRITON_INTERPRET=1 this
runs the Triton kernels on CPU, as the kernel tests do).

The CPU paths (`cpu.py` beside a reference) compute what the reference computes with fewer
passes over memory: linears and the LM head on oneDNN in fp32 (kernels/linear/cpu.py), the SSD
scan, RMSNorm and the causal conv as autograd Functions with written-out backwards. Ops without
one, packed rows (seq_idx) and inputs of mixed dtypes or under autocast take the reference.
docs/BENCHMARKS.md measures them against the reference and transformers (bench/cpu.py).

The Triton modules are imported on first use only, so that a CPU-only run never
imports them and the interpreter switch (read when a kernel is defined) is honoured
whenever the first Triton call happens. Every Triton op is an autograd Function
whose backward is Triton too; the two decode steps are forward-only and fall back
to the reference when a gradient is asked of them.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from strata.kernels.attention.reference import document_attention_ref
from strata.kernels.blockdiag.reference import blockdiag_matmul_ref
from strata.kernels.conv.cpu import causal_conv1d_cpu
from strata.kernels.conv.reference import causal_conv1d_ref, causal_conv1d_step_ref, conv_state_from_inputs
from strata.kernels.cross_entropy.cpu import linear_cross_entropy_cpu
from strata.kernels.cross_entropy.reference import linear_cross_entropy_ref, vocab_parallel_linear_cross_entropy_ref
from strata.kernels.fp8.recipe import aligned
from strata.kernels.fp8.scaled import fp8_linear
from strata.kernels.linear import cpu as linear_on_cpu
from strata.kernels.norm.cpu import rmsnorm_cpu
from strata.kernels.norm.reference import rmsnorm_ref
from strata.kernels.ssd.cpu import ssd_chunked_cpu
from strata.kernels.ssd.reference import NO_DT_LIMIT, prepare_dt, ssd_chunked_ref, ssd_step_ref

BACKENDS = ("auto", "reference", "cpu", "triton")


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
        if t.is_cuda and triton_available():
            return "triton"
        return "cpu" if t.device.type == "cpu" else "reference"
    if choice == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("STRATA_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 "
                           "(the Triton interpreter); or use STRATA_KERNELS=reference")
    return choice


def _same_dtype(*tensors) -> bool:
    """The CPU paths compute in their inputs' dtype: all of one dtype, outside autocast (whose
    casts the references' ops make themselves)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and not torch.is_autocast_enabled("cpu")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                initial_states=None, return_final_states=False, dt_limit=NO_DT_LIMIT, seq_idx=None):
    """Chunked SSD scan; see kernels/ssd/reference.py for shapes. dt_limit = (low, high) clamps
    softplus(dt + dt_bias), as mamba_ssm's dt_limit (the default clamps nothing). seq_idx (b, l):
    the document of each token of a packed row (None: one document); no state crosses documents.
    (The CPU path has no seq_idx: packed rows take the reference there.)"""
    backend = backend_for(x)
    if backend == "triton":
        from strata.kernels.ssd.function import ssd_chunked_triton
        return ssd_chunked_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                  initial_states, return_final_states, dt_limit, seq_idx)
    if backend == "cpu" and seq_idx is None:
        return ssd_chunked_cpu(x, prepare_dt(dt, dt_bias, dt_softplus, dt_limit), A, B, C, chunk_size, D, z,
                               initial_states, return_final_states)
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                           initial_states, return_final_states, dt_limit, seq_idx)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """One decoding step of the SSD recurrence: returns (y, new_state). dt is prepared (and
    clamped to dt_limit) exactly as ssd_chunked prepares it."""
    if backend_for(x) == "triton" and not _needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        from strata.kernels.ssd.step import ssd_step_triton
        return ssd_step_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    return ssd_step_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)


def causal_conv1d(x, weight, bias=None, activation="silu", seq_idx=None):
    """Causal depthwise conv1d over x (b, l, d) with weight (d, w). seq_idx (b, l): the document
    of each token (None: one document); an output reads inputs of its own document only."""
    backend = backend_for(x)
    if backend == "triton":
        from strata.kernels.conv.kernel import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, activation, seq_idx)
    if backend == "cpu" and seq_idx is None and _same_dtype(x, weight, bias):
        return causal_conv1d_cpu(x, weight, bias, activation)
    return causal_conv1d_ref(x, weight, bias, activation, seq_idx)


def conv_state(x, width):
    """The decoding state after inputs x (b, l, d): their last `width`, zero-padded on the left
    (the same on every backend: a slice and a pad)."""
    return conv_state_from_inputs(x, width)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One decoding step of the conv: returns (y, new_state)."""
    if backend_for(x) == "triton" and not _needs_grad(x, conv_state, weight, bias):
        from strata.kernels.conv.kernel import causal_conv1d_step_triton
        return causal_conv1d_step_triton(x, conv_state, weight, bias, activation)
    return causal_conv1d_step_ref(x, conv_state, weight, bias, activation)


def document_attention(q, k, v, seq_idx, start=0):
    """Causal attention within the documents of packed rows: q (b, h, l, d), k and v (b, h,
    start + l, d) of as many heads (GQA repeated), seq_idx (b, l) each query's document (the
    `start` cached keys belong to document 0). On CUDA in fp16/bf16 without a cache: PyTorch's
    FlashAttention variable-length kernel (kernels/attention/varlen.py); else SDPA with a
    block-causal mask."""
    if backend_for(q) == "triton" and start == 0:
        from strata.kernels.attention.varlen import document_attention_varlen, varlen_supported
        if varlen_supported(q):
            return document_attention_varlen(q, k, v, seq_idx)
    return document_attention_ref(q, k, v, seq_idx, start)


def rmsnorm(x, weight, eps=1e-5, z=None, group_size=None):
    """RMSNorm over the last dim; gated by silu(z) and grouped when given."""
    backend = backend_for(x)
    if backend == "triton":
        from strata.kernels.norm.kernel import rmsnorm_triton
        return rmsnorm_triton(x, weight, eps, z, group_size)
    if backend == "cpu" and _same_dtype(x, weight, z):
        return rmsnorm_cpu(x, weight, eps, z, group_size)
    return rmsnorm_ref(x, weight, eps, z, group_size)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, *, reduction="mean",
                         process_group=None, vocab_start=None, chunk_size=None):
    """Mean (or summed) cross-entropy of softmax(hidden @ weight.T) against targets.

    Vocab parallel: weight is this rank's shard (V_local, d) holding global ids
    [vocab_start, vocab_start + V_local) (default vocab_start: rank * V_local) and
    process_group the group that splits the vocab; hidden is replicated, and its
    gradient comes back summed over the group. chunk_size: token rows per chunk of
    the Triton op (default about N * d / V).
    """
    backend = backend_for(hidden)
    if (backend == "cpu" and process_group is None and linear_on_cpu.usable(hidden, weight)
            and linear_on_cpu.worth_it(hidden, weight)):
        return linear_cross_entropy_cpu(hidden, weight, targets, ignore_index, reduction)
    if backend == "triton":
        from strata.kernels.cross_entropy.kernel import linear_cross_entropy_triton
        return linear_cross_entropy_triton(hidden, weight, targets, ignore_index, reduction,
                                           process_group=process_group, vocab_start=vocab_start,
                                           chunk_size=chunk_size)
    if process_group is not None:
        import torch.distributed as dist
        if vocab_start is None:
            vocab_start = dist.get_rank(process_group) * weight.shape[0]
        return vocab_parallel_linear_cross_entropy_ref(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                       targets.reshape(-1), ignore_index, reduction,
                                                       process_group, vocab_start)
    return linear_cross_entropy_ref(hidden, weight, targets, ignore_index, reduction)


def linear(x, weight, bias=None, fp8=None, fp8_group=None, fp8_split=None):
    """x @ weight.T + bias, as F.linear: oneDNN on CPU in fp32 for products large enough to pay
    (kernels/linear/cpu.py), F.linear elsewhere. fp8 (a recipe of kernels/fp8/recipe.py, or None):
    the product in float8 through torch._scaled_mm (kernels/fp8/scaled.py, on CUDA and CPU alike)
    where its sizes allow (fp8_applies), else as without it. A tensor-parallel linear passes its
    group and split (scaled.py: OUT, IN or TOKENS), so that its scales are the whole tensor's."""
    if fp8 is not None and fp8_applies(x, weight):
        return fp8_linear(x, weight, bias, fp8, fp8_group, fp8_split)
    if backend_for(x) == "cpu" and linear_on_cpu.usable(x, weight) and linear_on_cpu.worth_it(x, weight):
        return linear_on_cpu.linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)


def fp8_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an FP8 product can take these sizes: tokens, inputs and outputs multiples of 16."""
    return aligned(x.numel() // max(x.shape[-1], 1), *weight.shape)


def blockdiag_matmul(x, w, shuffle=False):
    """Block-diagonal matmul, optionally with the stride-nblocks output shuffle.

    On CUDA the reference (a cuBLAS batched matmul) is the default: measured on an H100 it
    beats the Triton kernel (0.82-0.84x alone; BlockShuffle MLPs 0.43x of dense with it,
    1.15x without; docs/BENCHMARKS.md). STRATA_KERNELS=triton still selects the kernel."""
    if os.environ.get("STRATA_KERNELS") == "triton" and backend_for(x) == "triton":
        from strata.kernels.blockdiag.kernel import blockdiag_matmul_triton
        return blockdiag_matmul_triton(x, w, shuffle)
    return blockdiag_matmul_ref(x, w, shuffle)
