"""PyTorch reference for the block-diagonal matmul of the structured linears.

x (..., nblocks * k) is split into nblocks contiguous chunks; chunk i is multiplied
by w[i] (m, k). The outputs (..., nblocks, m) are concatenated, or, with
shuffle=True, interleaved with stride nblocks (the Monarch permutation of
BlockShuffle): out[..., j * nblocks + i] = block i's output j.
"""
from __future__ import annotations

import torch


def blockdiag_matmul_ref(x, w, shuffle=False):
    nblocks, m, k = w.shape
    xb = x.reshape(*x.shape[:-1], nblocks, k)
    y = torch.einsum("...bk,bmk->...bm", xb, w)
    if shuffle:
        y = y.transpose(-1, -2)
    return y.reshape(*x.shape[:-1], nblocks * m)
