"""Packed documents in the SSD kernels (seq_idx (b, l) int32: each token's document, 0, 1, ...
along a row). No state crosses from one document to the next: a token reads the tokens before it
of its own document only, the state a chunk leaves is its last token's document's, and the state
entering a chunk reaches only the tokens of the document it belongs to (the initial state is
document 0's). Every kernel applies these masks to the same terms in its forward and backward, so
the gradients are those of the documents run alone (kernels/ssd/reference.py is the same
computation in PyTorch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def documents_of(seq_ptr, pid_b, pos, mask, seqlen):
    """The documents of positions `pos` of row pid_b (-1 where masked)."""
    return tl.load(seq_ptr + pid_b * seqlen + pos, mask=mask, other=-1)


@triton.jit
def chunk_documents(seq_ptr, pid_b, c, seqlen, chunk_size):
    """(the document of the state entering chunk c: the previous chunk's last token's, 0 for the
    first chunk; the document of chunk c's last token)."""
    row = seq_ptr + pid_b * seqlen
    last = tl.load(row + tl.minimum(c * chunk_size + chunk_size - 1, seqlen - 1))
    enter = tl.load(row + tl.maximum(c * chunk_size - 1, 0))
    return tl.where(c > 0, enter, 0), last


def as_documents(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """seq_idx as the kernels read it: int32, contiguous."""
    return None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
