"""SSD steps 4-5: C B^T within each chunk, and the chunk scan that produces the output.

    CB[b, c, g, l, s] = C_l . B_s                                   (fp32)
    y_l = exp(a_l) C_l H_c  +  sum_{s <= l} CB[l, s] exp(a_l - a_s) dt_s x_s  +  D x_l
    out = y * silu(z)   (when z is given; y itself is then also stored for the backward)

The decay exp(a_l - a_s) is taken only where l >= s (the difference is masked to
-inf first), so every exponent is of a non-positive number. Packed documents (seq_idx): the sum
runs over s of l's document, and the entering state's term only where l is of its document
(documents.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.ssd.config import blocks
from strata.kernels.ssd.documents import chunk_documents, documents_of
from strata.kernels.triton_utils import dot_precision, silu


@triton.jit
def _bmm_kernel(
    C_ptr, B_ptr, CB_ptr,
    seqlen, ngroups, dstate, nchunks, chunk_size,
    s_C_b, s_C_l, s_C_g, s_C_n, s_B_b, s_B_l, s_B_g, s_B_n,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_mn, pid_bcg = tl.program_id(0), tl.program_id(1)
    n_nblocks = tl.cdiv(chunk_size, BLOCK_N)
    pid_m, pid_n = pid_mn // n_nblocks, pid_mn % n_nblocks
    # Tiles wholly above the diagonal are never read unmasked: skip them.
    if pid_n * BLOCK_N < (pid_m + 1) * BLOCK_M:
        _bmm_tile(C_ptr, B_ptr, CB_ptr, pid_m, pid_n, pid_bcg, seqlen, ngroups, dstate, nchunks, chunk_size,
                  s_C_b, s_C_l, s_C_g, s_C_n, s_B_b, s_B_l, s_B_g, s_B_n, PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _bmm_tile(C_ptr, B_ptr, CB_ptr, pid_m, pid_n, pid_bcg, seqlen, ngroups, dstate, nchunks, chunk_size,
              s_C_b, s_C_l, s_C_g, s_C_n, s_B_b, s_B_l, s_B_g, s_B_n,
              PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = pid_bcg // (nchunks * ngroups)
    pid_c = (pid_bcg // ngroups) % nchunks
    pid_g = pid_bcg % ngroups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    pos_m = pid_c * chunk_size + offs_m
    pos_n = pid_c * chunk_size + offs_n
    mask_m = (offs_m < chunk_size) & (pos_m < seqlen)
    mask_n = (offs_n < chunk_size) & (pos_n < seqlen)
    C_base = C_ptr + pid_b * s_C_b + pid_g * s_C_g + pos_m[:, None] * s_C_l
    B_base = B_ptr + pid_b * s_B_b + pid_g * s_B_g + pos_n[None, :] * s_B_l
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, dstate, BLOCK_K):
        mk = k + offs_k < dstate
        c = tl.load(C_base + (k + offs_k)[None, :] * s_C_n, mask=mask_m[:, None] & mk[None, :], other=0.0)
        b = tl.load(B_base + (k + offs_k)[:, None] * s_B_n, mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(c, b, input_precision=PREC)
    out = CB_ptr + pid_bcg * chunk_size * chunk_size + offs_m[:, None] * chunk_size + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m < chunk_size)[:, None] & (offs_n < chunk_size)[None, :])


@triton.jit
def _scan_fwd_kernel(
    x_ptr, z_ptr, D_ptr, C_ptr, CB_ptr, dt_ptr, dA_cs_ptr, states_ptr, out_ptr, outx_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, nchunks, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_o_b, s_o_l, s_o_h, s_o_p,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_mn, pid_bch = tl.program_id(0), tl.program_id(1)
    n_nblocks = tl.cdiv(headdim, BLOCK_N)
    pid_m, pid_n = pid_mn // n_nblocks, pid_mn % n_nblocks
    pid_b = pid_bch // (nchunks * nheads)
    pid_c = (pid_bch // nheads) % nchunks
    pid_h = pid_bch % nheads
    pid_g = pid_h // heads_per_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_s = tl.arange(0, BLOCK_S)
    pos_m = pid_c * chunk_size + offs_m
    in_m = offs_m < chunk_size
    mask_m = in_m & (pos_m < seqlen)
    mask_n = offs_n < headdim
    cs_base = ((pid_b * nheads + pid_h) * nchunks + pid_c) * chunk_size
    a_m = tl.load(dA_cs_ptr + cs_base + offs_m, mask=in_m, other=0.0)
    x_base = x_ptr + pid_b * s_x_b + pid_h * s_x_h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # The state entering the chunk: exp(a_l) C_l H_c^T.
    C_base = C_ptr + pid_b * s_C_b + pid_g * s_C_g + pos_m[:, None] * s_C_l
    H_base = states_ptr + ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate + offs_n[None, :] * dstate
    for k in range(0, dstate, BLOCK_K):
        mk = k + offs_k < dstate
        c = tl.load(C_base + (k + offs_k)[None, :] * s_C_n, mask=mask_m[:, None] & mk[None, :], other=0.0)
        h = tl.load(H_base + (k + offs_k)[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(c, h.to(c.dtype), input_precision=PREC)
    from_state = tl.exp(a_m)
    if HAS_SEQ:
        enter, _ = chunk_documents(seq_ptr, pid_b, pid_c, seqlen, chunk_size)
        doc_m = documents_of(seq_ptr, pid_b, pos_m, mask_m, seqlen)
        from_state = tl.where(doc_m == enter, from_state, 0.0)
    acc *= from_state[:, None]

    # Within the chunk, s <= l.
    CB_base = CB_ptr + ((pid_b * nchunks + pid_c) * (nheads // heads_per_group) + pid_g) * chunk_size * chunk_size
    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    for s0 in range(0, hi, BLOCK_S):
        s = s0 + offs_s
        in_s = s < chunk_size
        causal = (offs_m[:, None] >= s[None, :]) & in_s[None, :]
        pos_s = pid_c * chunk_size + s
        if HAS_SEQ:
            doc_s = documents_of(seq_ptr, pid_b, pos_s, in_s & (pos_s < seqlen), seqlen)
            causal = causal & (doc_m[:, None] == doc_s[None, :])
        cb = tl.load(CB_base + offs_m[:, None] * chunk_size + s[None, :], mask=in_m[:, None] & causal, other=0.0)
        a_s = tl.load(dA_cs_ptr + cs_base + s, mask=in_s, other=0.0)
        dt_s = tl.load(dt_ptr + cs_base + s, mask=in_s, other=0.0)
        decay = tl.exp(tl.where(causal, a_m[:, None] - a_s[None, :], float("-inf")))
        w = tl.where(causal, cb * decay * dt_s[None, :], 0.0)
        xs = tl.load(x_base + pos_s[:, None] * s_x_l + offs_n[None, :] * s_x_p,
                     mask=(in_s & (pos_s < seqlen))[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(w.to(xs.dtype), xs, input_precision=PREC)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_D:
        xm = tl.load(x_base + pos_m[:, None] * s_x_l + offs_n[None, :] * s_x_p, mask=mask, other=0.0).to(tl.float32)
        if D_PER_P:
            d = tl.load(D_ptr + pid_h * headdim + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += xm * d[None, :]
        else:
            acc += xm * tl.load(D_ptr + pid_h).to(tl.float32)
    o_off = pid_b * s_o_b + pos_m[:, None] * s_o_l + pid_h * s_o_h + offs_n[None, :] * s_o_p
    if HAS_Z:
        tl.store(outx_ptr + o_off, acc, mask=mask)
        zz = tl.load(z_ptr + pid_b * s_z_b + pos_m[:, None] * s_z_l + pid_h * s_z_h + offs_n[None, :] * s_z_p,
                     mask=mask, other=0.0).to(tl.float32)
        acc = acc * silu(zz)
    tl.store(out_ptr + o_off, acc, mask=mask)


def bmm_fwd(C, B, chunk_size):
    """CB (b, c, g, L, L) fp32; tiles wholly above the diagonal are left unwritten."""
    bsz, seqlen, ngroups, dstate = C.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    CB = torch.empty(bsz, nchunks, ngroups, chunk_size, chunk_size, device=C.device, dtype=torch.float32)
    cfg = blocks("bmm", chunk_size, 16, dstate)
    grid = (triton.cdiv(chunk_size, cfg["BLOCK_M"]) ** 2, bsz * nchunks * ngroups)
    _bmm_kernel[grid](
        C, B, CB, seqlen, ngroups, dstate, nchunks, chunk_size, *C.stride(), *B.stride(),
        PREC=dot_precision(C.dtype), BLOCK_N=cfg["BLOCK_M"], **cfg,
    )
    return CB


def scan_fwd(x, C, CB, dt_proc, dA_cs, states, D, z, out_dtype, seq_idx=None):
    """Returns (out, y before the gate or None). seq_idx: (b, l) int32, contiguous, or None."""
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    nchunks, chunk_size = dA_cs.shape[2], dA_cs.shape[3]
    out = torch.empty(bsz, seqlen, nheads, headdim, device=x.device, dtype=out_dtype)
    out_x = torch.empty(bsz, seqlen, nheads, headdim, device=x.device, dtype=torch.float32) if z is not None else None
    cfg = blocks("scan_fwd", chunk_size, headdim, dstate)
    grid = (triton.cdiv(chunk_size, cfg["BLOCK_M"]) * triton.cdiv(headdim, cfg["BLOCK_N"]), bsz * nchunks * nheads)
    zz = z if z is not None else x
    _scan_fwd_kernel[grid](
        x, zz, D if D is not None else x, C, CB, dt_proc, dA_cs, states, out,
        out_x if out_x is not None else out, seq_idx if seq_idx is not None else dA_cs,
        seqlen, nheads, headdim, dstate, nchunks, chunk_size, nheads // ngroups,
        *x.stride(), *zz.stride(), *C.stride(), *out.stride(),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ=seq_idx is not None, PREC=dot_precision(x.dtype), **cfg,
    )
    return out, out_x
