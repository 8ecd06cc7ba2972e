"""Packed-document attention on PyTorch's FlashAttention variable-length kernel
(torch.nn.attention.varlen.varlen_attn, CUDA, fp16/bf16): each document is its own causal
sequence, so the blocks a block-causal mask would zero are never computed.

The kernel sizes its grid from host integers (the documents' offsets and the longest one), so
reading them costs one device-to-host copy; it is made once per forward: the blocks of one
forward (and their recomputation) share one seq_idx tensor, and its spans are kept for it."""
from __future__ import annotations

import functools
import inspect
import weakref

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # FlashAttention-2's largest head dimension

_spans_of: tuple[weakref.ref, int, torch.Tensor, int] | None = None
"""The last seq_idx's (tensor, version, cu_seqlens, longest document)."""


@functools.cache
def varlen_attn_function():
    """torch.nn.attention.varlen.varlen_attn where this PyTorch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_supported(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in HALF_DTYPES and q.shape[-1] <= MAX_HEAD_DIM
            and varlen_attn_function() is not None and torch.cuda.get_device_capability(q.device)[0] >= 8)


def document_spans(seq_idx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 (n + 1,) on seq_idx's device, longest document) of the documents of
    seq_idx (b, l), rows laid end to end: a document starts at each row's start and wherever
    the index changes."""
    global _spans_of
    if _spans_of is not None and _spans_of[0]() is seq_idx and _spans_of[1] == seq_idx._version:
        return _spans_of[2], _spans_of[3]
    flat = seq_idx.detach().reshape(-1).cpu()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts.view(seq_idx.shape)[:, 0] = True
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    spans = cu.to(seq_idx.device, non_blocking=True)
    _spans_of = (weakref.ref(seq_idx), seq_idx._version, spans, longest)
    return spans, longest


@functools.cache
def causal_keyword(varlen_attn) -> dict:
    """How this PyTorch's varlen_attn is asked for causal attention: is_causal up to 2.10,
    window_size=(-1, 0) after (read from its signature once)."""
    if "window_size" in inspect.signature(varlen_attn).parameters:
        return {"window_size": (-1, 0)}
    return {"is_causal": True}


def causal_varlen(q, k, v, cu_seqlens: torch.Tensor, longest: int) -> torch.Tensor:
    """varlen_attn, causal within each sequence, on (t, h, d) tensors."""
    varlen_attn = varlen_attn_function()
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, **causal_keyword(varlen_attn))


def document_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              seq_idx: torch.Tensor) -> torch.Tensor:
    """q, k, v (b, h, l, d) of as many heads, seq_idx (b, l): what document_attention_ref gives
    without a cache, (b, h, l, d)."""
    b, h, l, d = q.shape
    cu_seqlens, longest = document_spans(seq_idx)

    def tokens(t):  # (b, h, l, d) -> (b * l, h, d)
        return t.transpose(1, 2).reshape(b * l, h, d)

    out = causal_varlen(tokens(q), tokens(k), tokens(v), cu_seqlens, longest)
    return out.view(b, l, h, d).transpose(1, 2)
