"""Causal self-attention with GQA and optional RoPE, on PyTorch SDPA (FlashAttention on GPU);
packed documents through kernels.ops.document_attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import ops
from strata.model.config import AttentionConfig
from strata.model.linear import WHOLE, Projections
from strata.model.recompute import checkpoint_if


@dataclass
class KVCache:
    k: torch.Tensor
    """(b, n_kv_heads, max_len, head_dim)"""
    v: torch.Tensor
    length: int = 0
    """Positions filled so far."""


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, rotary_dim: int = 0):
    """cos and sin for positions (b, l) or (l,): (..., l, head_dim), in fp32. Partial RoPE (rotary_dim <
    head_dim, transformers' partial_rotary_factor): the frequencies theta^(-2i / rotary_dim) span the first
    rotary_dim channels, and the others get cos 1 and sin 0, which leave them exactly as they are."""
    rotary = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary, 2, device=positions.device, dtype=torch.float32) / rotary))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if rotary < head_dim:
        rest = angles.new_zeros(*angles.shape[:-1], head_dim - rotary)
        cos, sin = torch.cat([cos, rest + 1.0], dim=-1), torch.cat([sin, rest], dim=-1)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int = 0) -> torch.Tensor:
    """x (b, h, l, d); the rotate-half convention of GPT-NeoX / Llama / Bamba within the first rotary_dim
    channels (all by default); the tables of rope_tables pass the others through. One expression over the
    whole head, so the result keeps x's memory layout (and SDPA's output then needs no copy for o_proj)."""
    rotary = rotary_dim or x.shape[-1]
    half = rotary // 2
    rotated = torch.cat([-x[..., half:rotary], x[..., :half], x[..., rotary:]], dim=-1)
    if cos.dim() == 3:  # per-sample positions (b, l, d)
        cos, sin = cos[:, None], sin[:, None]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    recompute_core = False
    """Recompute `core` in the backward (selective recompute; model/recompute.py)."""

    def __init__(self, cfg: AttentionConfig, d_model: int, projections: Projections = WHOLE):
        """`projections.ranks` > 1 builds one rank's share of the query heads, and of the KV heads
        (or the one KV head its query heads share where the ranks outnumber them)."""
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.resolved_head_dim(d_model)
        self.rotary_dim = cfg.rotary_dim(d_model)
        self.n_heads = cfg.n_heads // projections.ranks
        full_width = cfg.n_heads * self.head_dim
        self.q_proj = projections.column(d_model, full_width, cfg.qkv_bias)
        self.k_proj, self.n_kv_heads = projections.kv(d_model, cfg.resolved_kv_heads(), self.head_dim, cfg.qkv_bias)
        self.v_proj, _ = projections.kv(d_model, cfg.resolved_kv_heads(), self.head_dim, cfg.qkv_bias)
        self.o_proj = projections.row(full_width, d_model, False)

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, l, _ = t.shape
        return t.view(b, l, n, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """seq_idx (b, l): the document of each token of packed rows (model/hybrid.py:
        document_index); a token then attends to earlier tokens of its own document only."""
        q = self.heads(self.q_proj(x), self.n_heads)
        k = self.heads(self.k_proj(x), self.n_kv_heads)
        v = self.heads(self.v_proj(x), self.n_kv_heads)
        out = checkpoint_if(self.recompute_core and cache is None, self.core, q, k, v, position_ids, cache, seq_idx)
        return self.o_proj(out)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None = None,
             cache: KVCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Between the q/k/v projections and o_proj: RoPE, the KV cache, GQA and SDPA; (b, l, n_heads *
        head_dim). Memory-heavy and FLOP-light: selective recompute redoes it in the backward."""
        b, _, l, _ = q.shape
        start = cache.length if cache is not None else 0
        q, k = self.rotate(q, k, position_ids, start)
        if cache is not None:
            cache.k[:, :, start:start + l] = k
            cache.v[:, :, start:start + l] = v
            cache.length = start + l
            k, v = cache.k[:, :, :cache.length], cache.v[:, :, :cache.length]
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        # A single new token attends to everything cached; a block of new tokens is causal
        # among itself, which SDPA's is_causal expresses only when nothing precedes it.
        if seq_idx is not None:
            out = ops.document_attention(q, k, v, seq_idx, start)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif l == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(l, start + l, dtype=torch.bool, device=q.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None, start: int = 0):
        """q and k with RoPE at position_ids (default: start, start + 1, ...); unchanged without RoPE."""
        if not self.cfg.rope:
            return q, k
        if position_ids is None:
            position_ids = torch.arange(start, start + q.shape[2], device=q.device)
        cos, sin = rope_tables(position_ids, self.head_dim, self.cfg.rope_theta, self.rotary_dim)
        return apply_rope(q, cos, sin, self.rotary_dim), apply_rope(k, cos, sin, self.rotary_dim)

    def repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        """GQA: each KV head repeated for the query heads that share it."""
        if self.n_kv_heads == self.n_heads:
            return t
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    def allocate_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
