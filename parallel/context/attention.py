"""Attention under context parallelism: this rank's query pieces against the whole sequence's
keys and values, all-gathered (GQA's K/V are n_kv_heads / n_heads of the queries' size) and put
back in sequence order.

The causal mask is written in global token indices (a query at index i sees keys 0..i), and in
documents where the rows are packed; RoPE rotates each query and key at its own position id,
before K is gathered. Every query sees at least itself, so no mask row is empty.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.parallel.context.mamba import no_cache
from strata.parallel.context.pieces import CPContext


class ContextParallelAttention:
    """What attention adds under CP (a mixin before the mixer's class; blocks.py). seq_idx is the
    whole sequence's (b, L); q, k and v (b, heads, l, head_dim) hold this rank's two pieces."""

    cp: CPContext

    def core(self, q, k, v, position_ids=None, cache=None, seq_idx=None):
        no_cache(cache)
        b, _, l, _ = q.shape
        queries = self.cp.query_positions(l * self.cp.size, q.device)
        q, k = self.rotate(q, k, queries if position_ids is None else position_ids)
        k, v = self.repeat_kv(self.cp.whole_sequence(k, dim=2)), self.repeat_kv(self.cp.whole_sequence(v, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_keys(queries, k.shape[2], seq_idx))
        return out.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim)


def visible_keys(queries: torch.Tensor, seq_len: int, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """(l, L), or (b, 1, l, L) with documents: the keys each query attends to (causal, in its document)."""
    mask = queries[:, None] >= torch.arange(seq_len, device=queries.device)
    if seq_idx is None:
        return mask
    same_document = seq_idx[:, queries, None] == seq_idx[:, None, :]
    return (mask & same_document)[:, None]
