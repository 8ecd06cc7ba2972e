"""Packed-document attention on SDPA with a block-causal boolean mask: every device and dtype,
and the KV cache; a boolean mask rules out SDPA's flash backend, so CUDA prefers varlen.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def document_mask(seq_idx: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The block-causal mask (b, 1, l, start + l) of packed rows: a query sees the keys at or
    before it of its own document (the `start` cached keys belong to document 0)."""
    keys = F.pad(seq_idx, (start, 0))
    causal = torch.ones(seq_idx.shape[1], keys.shape[1], dtype=torch.bool, device=seq_idx.device).tril(start)
    return ((seq_idx[:, :, None] == keys[:, None, :]) & causal)[:, None]


def document_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor,
                           start: int = 0) -> torch.Tensor:
    """q (b, h, l, d), k and v (b, h, start + l, d) of as many heads; seq_idx (b, l)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(seq_idx, start))
