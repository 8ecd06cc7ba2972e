"""SSD backward within chunks: dx (with ddt, dD), dCB, and dB / dC.

With dy the gradient of y (before the gate), dS_c the gradient of chunk c's own
state (from state.state_bwd) and M'_h[l, s] = exp(a_l - a_s) dt_s (dy_l . x_s) for l >= s:

    dx_s  = dt_s * acc_s + D dy_s,  acc_s = exp(a_L - a_s) dS_c B_s + sum_{l>=s} CB[l,s] exp(a_l - a_s) dy_l
    ddt_s = x_s . acc_s        (plus A * dA-gradient, in cumsum.py)
    dCB   = sum over the heads of the group of M'_h
    dC_l  = sum_s dCB[l, s] B_s + sum_h exp(a_l) dy_l H_c
    dB_s  = sum_l dCB[l, s] C_l + sum_h exp(a_L - a_s) dt_s x_s dS_c

The gradient w.r.t. the cumsum values a of head h is, per position,
<dC_h, C> - <dB_h, B> (the head's own share of dC and dB), plus at the chunk's last
position the sum of the state terms and the state-passing term: the intra-chunk
share comes from dCB's kernel as row and column sums of CB * M'_h, the state
share from the dB/dC kernel. Packed documents (seq_idx) mask the same terms as the forward
(documents.py): M' and the CB products to pairs of one document, the chunk state's terms to
its last token's document, the entering state's to its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.ssd.config import blocks
from strata.kernels.ssd.documents import chunk_documents, documents_of
from strata.kernels.triton_utils import dot_precision


@triton.jit
def _dx_kernel(
    x_ptr, dy_ptr, D_ptr, B_ptr, CB_ptr, dt_ptr, dA_cs_ptr, dS_ptr, dx_ptr, ddt_part_ptr, dD_part_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, nchunks, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_y_b, s_y_l, s_y_h, s_y_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_dx_b, s_dx_l, s_dx_h, s_dx_p,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_mn, pid_bch = tl.program_id(0), tl.program_id(1)
    n_nblocks = tl.cdiv(headdim, BLOCK_N)
    pid_m, pid_n = pid_mn // n_nblocks, pid_mn % n_nblocks
    pid_b = pid_bch // (nchunks * nheads)
    pid_c = (pid_bch // nheads) % nchunks
    pid_h = pid_bch % nheads
    pid_g = pid_h // heads_per_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows s of the chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # headdim
    offs_k = tl.arange(0, BLOCK_K)
    offs_l = tl.arange(0, BLOCK_S)
    pos_m = pid_c * chunk_size + offs_m
    in_m = offs_m < chunk_size
    mask_m = in_m & (pos_m < seqlen)
    mask_n = offs_n < headdim
    cs_base = ((pid_b * nheads + pid_h) * nchunks + pid_c) * chunk_size
    a_m = tl.load(dA_cs_ptr + cs_base + offs_m, mask=in_m, other=0.0)
    a_last = tl.load(dA_cs_ptr + cs_base + chunk_size - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # From the chunk's state: exp(a_L - a_s) B_s dS_c^T.
    B_base = B_ptr + pid_b * s_B_b + pid_g * s_B_g + pos_m[:, None] * s_B_l
    dS_base = dS_ptr + ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate + offs_n[None, :] * dstate
    for k in range(0, dstate, BLOCK_K):
        mk = k + offs_k < dstate
        b = tl.load(B_base + (k + offs_k)[None, :] * s_B_n, mask=mask_m[:, None] & mk[None, :], other=0.0)
        ds = tl.load(dS_base + (k + offs_k)[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(b, ds.to(b.dtype), input_precision=PREC)
    into_state = in_m
    if HAS_SEQ:
        _, last = chunk_documents(seq_ptr, pid_b, pid_c, seqlen, chunk_size)
        doc_m = documents_of(seq_ptr, pid_b, pos_m, mask_m, seqlen)
        into_state = into_state & (doc_m == last)
    acc *= tl.exp(tl.where(into_state, a_last - a_m, float("-inf")))[:, None]

    # Within the chunk, l >= s.
    CB_base = CB_ptr + ((pid_b * nchunks + pid_c) * (nheads // heads_per_group) + pid_g) * chunk_size * chunk_size
    y_base = dy_ptr + pid_b * s_y_b + pid_h * s_y_h
    lo = (pid_m * BLOCK_M // BLOCK_S) * BLOCK_S
    for l0 in range(lo, chunk_size, BLOCK_S):
        l = l0 + offs_l
        in_l = l < chunk_size
        causal = (l[None, :] >= offs_m[:, None]) & in_l[None, :] & in_m[:, None]
        pos_l = pid_c * chunk_size + l
        if HAS_SEQ:
            doc_l = documents_of(seq_ptr, pid_b, pos_l, in_l & (pos_l < seqlen), seqlen)
            causal = causal & (doc_l[None, :] == doc_m[:, None])
        cbt = tl.load(CB_base + l[None, :] * chunk_size + offs_m[:, None], mask=causal, other=0.0)
        a_l = tl.load(dA_cs_ptr + cs_base + l, mask=in_l, other=0.0)
        decay = tl.exp(tl.where(causal, a_l[None, :] - a_m[:, None], float("-inf")))
        w = tl.where(causal, cbt * decay, 0.0)
        dyl = tl.load(y_base + pos_l[:, None] * s_y_l + offs_n[None, :] * s_y_p,
                      mask=(in_l & (pos_l < seqlen))[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(w.to(dyl.dtype), dyl, input_precision=PREC)

    mask = mask_m[:, None] & mask_n[None, :]
    xm = tl.load(x_ptr + pid_b * s_x_b + pos_m[:, None] * s_x_l + pid_h * s_x_h + offs_n[None, :] * s_x_p,
                 mask=mask, other=0.0).to(tl.float32)
    dt_m = tl.load(dt_ptr + cs_base + offs_m, mask=in_m, other=0.0)
    tl.store(ddt_part_ptr + (pid_n * tl.num_programs(1) + pid_bch) * chunk_size + offs_m,
             tl.sum(acc * xm, axis=1), mask=in_m)
    dx = acc * dt_m[:, None]
    if HAS_D:
        dym = tl.load(y_base + pos_m[:, None] * s_y_l + offs_n[None, :] * s_y_p, mask=mask, other=0.0).to(tl.float32)
        if D_PER_P:
            d = tl.load(D_ptr + pid_h * headdim + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            dx += dym * d[None, :]
            # dD partials laid out (b, c, m-block, h, p)
            part = ((pid_b * nchunks + pid_c) * tl.num_programs(0) // n_nblocks + pid_m) * nheads + pid_h
            tl.store(dD_part_ptr + part * headdim + offs_n, tl.sum(dym * xm, axis=0), mask=mask_n)
        else:
            dx += dym * tl.load(D_ptr + pid_h).to(tl.float32)
            part = ((pid_b * nchunks + pid_c) * tl.num_programs(0) + pid_mn) * nheads + pid_h
            tl.store(dD_part_ptr + part, tl.sum(tl.sum(dym * xm, axis=1), axis=0))
    tl.store(dx_ptr + pid_b * s_dx_b + pos_m[:, None] * s_dx_l + pid_h * s_dx_h + offs_n[None, :] * s_dx_p,
             dx, mask=mask)


@triton.jit
def _dcb_kernel(
    x_ptr, dy_ptr, CB_ptr, dt_ptr, dA_cs_ptr, dCB_ptr, da_row_ptr, da_col_ptr, seq_ptr,
    seqlen, nheads, headdim, ngroups, nchunks, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_y_b, s_y_l, s_y_h, s_y_p,
    HAS_SEQ: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (l, s) tile of dCB for one (b, c, g), looping over the group's heads.
    da_row[s-block, b, h, c, l] += rowsum(CB * M'_h); da_col[l-block, b, h, c, s] += colsum."""
    pid_mn, pid_bcg = tl.program_id(0), tl.program_id(1)
    nblocks = tl.cdiv(chunk_size, BLOCK_M)
    pid_m, pid_n = pid_mn // nblocks, pid_mn % nblocks
    if pid_n <= pid_m:  # tiles above the diagonal: nothing to do
        _dcb_tile(x_ptr, dy_ptr, CB_ptr, dt_ptr, dA_cs_ptr, dCB_ptr, da_row_ptr, da_col_ptr, seq_ptr,
                  pid_m, pid_n, pid_bcg, seqlen, nheads, headdim, ngroups, nchunks, chunk_size, heads_per_group,
                  s_x_b, s_x_l, s_x_h, s_x_p, s_y_b, s_y_l, s_y_h, s_y_p, HAS_SEQ, PREC, BLOCK_M, BLOCK_K)


@triton.jit
def _dcb_tile(x_ptr, dy_ptr, CB_ptr, dt_ptr, dA_cs_ptr, dCB_ptr, da_row_ptr, da_col_ptr, seq_ptr,
              pid_m, pid_n, pid_bcg, seqlen, nheads, headdim, ngroups, nchunks, chunk_size, heads_per_group,
              s_x_b, s_x_l, s_x_h, s_x_p, s_y_b, s_y_l, s_y_h, s_y_p,
              HAS_SEQ: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = pid_bcg // (nchunks * ngroups)
    pid_c = (pid_bcg // ngroups) % nchunks
    pid_g = pid_bcg % ngroups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # l
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)  # s
    offs_k = tl.arange(0, BLOCK_K)
    in_m, in_n = offs_m < chunk_size, offs_n < chunk_size
    pos_m, pos_n = pid_c * chunk_size + offs_m, pid_c * chunk_size + offs_n
    mask_m, mask_n = in_m & (pos_m < seqlen), in_n & (pos_n < seqlen)
    causal = (offs_m[:, None] >= offs_n[None, :]) & in_m[:, None] & in_n[None, :]
    if HAS_SEQ:
        doc_m = documents_of(seq_ptr, pid_b, pos_m, mask_m, seqlen)
        doc_n = documents_of(seq_ptr, pid_b, pos_n, mask_n, seqlen)
        causal = causal & (doc_m[:, None] == doc_n[None, :])
    tile = offs_m[:, None] * chunk_size + offs_n[None, :]
    CB_off = pid_bcg * chunk_size * chunk_size
    cb = tl.load(CB_ptr + CB_off + tile, mask=causal, other=0.0)
    dcb = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for hh in range(heads_per_group):
        h = pid_g * heads_per_group + hh
        cs_base = ((pid_b * nheads + h) * nchunks + pid_c) * chunk_size
        a_m = tl.load(dA_cs_ptr + cs_base + offs_m, mask=in_m, other=0.0)
        a_n = tl.load(dA_cs_ptr + cs_base + offs_n, mask=in_n, other=0.0)
        dt_n = tl.load(dt_ptr + cs_base + offs_n, mask=in_n, other=0.0)
        dyx = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k in range(0, headdim, BLOCK_K):
            mk = k + offs_k < headdim
            dy = tl.load(dy_ptr + pid_b * s_y_b + pos_m[:, None] * s_y_l + h * s_y_h + (k + offs_k)[None, :] * s_y_p,
                         mask=mask_m[:, None] & mk[None, :], other=0.0)
            xt = tl.load(x_ptr + pid_b * s_x_b + pos_n[None, :] * s_x_l + h * s_x_h + (k + offs_k)[:, None] * s_x_p,
                         mask=mk[:, None] & mask_n[None, :], other=0.0)
            dyx += tl.dot(dy, xt, input_precision=PREC)
        decay = tl.exp(tl.where(causal, a_m[:, None] - a_n[None, :], float("-inf")))
        mp = tl.where(causal, dyx * decay * dt_n[None, :], 0.0)
        dcb += mp
        m = mp * cb
        row = ((pid_n * (tl.num_programs(1) // (nchunks * ngroups)) + pid_b) * nheads + h) * nchunks + pid_c
        tl.store(da_row_ptr + row * chunk_size + offs_m, tl.sum(m, axis=1), mask=in_m)
        col = ((pid_m * (tl.num_programs(1) // (nchunks * ngroups)) + pid_b) * nheads + h) * nchunks + pid_c
        tl.store(da_col_ptr + col * chunk_size + offs_n, tl.sum(m, axis=0), mask=in_n)
    tl.store(dCB_ptr + CB_off + tile, dcb, mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _dbc_kernel(
    x_ptr, dy_ptr, B_ptr, C_ptr, dCB_ptr, dt_ptr, dA_cs_ptr, states_ptr, dS_ptr,
    dB_ptr, dC_ptr, da_part_ptr, daL_part_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, ngroups, nchunks, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_y_b, s_y_l, s_y_h, s_y_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_dB_b, s_dB_l, s_dB_g, s_dB_n,
    HAS_SEQ: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Rows r of one chunk, a tile of dstate, for one (b, c, g): dB and dC complete
    (all heads of the group), and each head's state share of the cumsum gradient."""
    pid_mn, pid_bcg = tl.program_id(0), tl.program_id(1)
    n_nblocks = tl.cdiv(dstate, BLOCK_N)
    pid_m, pid_n = pid_mn // n_nblocks, pid_mn % n_nblocks
    nb = tl.num_programs(1) // (nchunks * ngroups)
    pid_b = pid_bcg // (nchunks * ngroups)
    pid_c = (pid_bcg // ngroups) % nchunks
    pid_g = pid_bcg % ngroups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, BLOCK_S)
    in_m = offs_m < chunk_size
    pos_m = pid_c * chunk_size + offs_m
    mask_m = in_m & (pos_m < seqlen)
    mask_n = offs_n < dstate
    mask = mask_m[:, None] & mask_n[None, :]
    Bm = tl.load(B_ptr + pid_b * s_B_b + pos_m[:, None] * s_B_l + pid_g * s_B_g + offs_n[None, :] * s_B_n,
                 mask=mask, other=0.0).to(tl.float32)
    Cm = tl.load(C_ptr + pid_b * s_C_b + pos_m[:, None] * s_C_l + pid_g * s_C_g + offs_n[None, :] * s_C_n,
                 mask=mask, other=0.0).to(tl.float32)
    dB = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    from_state, into_state = in_m, in_m  # rows that read the entering state, rows in the leaving one
    if HAS_SEQ:
        enter, last = chunk_documents(seq_ptr, pid_b, pid_c, seqlen, chunk_size)
        doc_m = documents_of(seq_ptr, pid_b, pos_m, mask_m, seqlen)
        from_state, into_state = from_state & (doc_m == enter), into_state & (doc_m == last)
    for hh in range(heads_per_group):
        h = pid_g * heads_per_group + hh
        cs_base = ((pid_b * nheads + h) * nchunks + pid_c) * chunk_size
        a_m = tl.load(dA_cs_ptr + cs_base + offs_m, mask=in_m, other=0.0)
        a_last = tl.load(dA_cs_ptr + cs_base + chunk_size - 1)
        dt_m = tl.load(dt_ptr + cs_base + offs_m, mask=in_m, other=0.0)
        st_base = ((pid_b * nchunks + pid_c) * nheads + h) * headdim * dstate + offs_n[None, :]
        t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, headdim, BLOCK_P):
            mk = k + offs_p < headdim
            pm = mask_m[:, None] & mk[None, :]
            dy = tl.load(dy_ptr + pid_b * s_y_b + pos_m[:, None] * s_y_l + h * s_y_h + (k + offs_p)[None, :] * s_y_p,
                         mask=pm, other=0.0)
            xx = tl.load(x_ptr + pid_b * s_x_b + pos_m[:, None] * s_x_l + h * s_x_h + (k + offs_p)[None, :] * s_x_p,
                         mask=pm, other=0.0)
            pn = mk[:, None] & mask_n[None, :]
            hs = tl.load(states_ptr + st_base + (k + offs_p)[:, None] * dstate, mask=pn, other=0.0)
            ds = tl.load(dS_ptr + st_base + (k + offs_p)[:, None] * dstate, mask=pn, other=0.0)
            t += tl.dot(dy, hs.to(dy.dtype), input_precision=PREC)
            u += tl.dot(xx, ds.to(xx.dtype), input_precision=PREC)
        t *= tl.where(from_state, tl.exp(a_m), 0.0)[:, None]
        u *= (tl.exp(tl.where(into_state, a_last - a_m, float("-inf"))) * dt_m)[:, None]
        dC += t
        dB += u
        ub = tl.sum(u * Bm, axis=1)
        part = ((pid_n * nb + pid_b) * nheads + h) * nchunks + pid_c
        tl.store(da_part_ptr + part * chunk_size + offs_m, tl.sum(t * Cm, axis=1) - ub, mask=in_m)
        tl.store(daL_part_ptr + part * tl.cdiv(chunk_size, BLOCK_M) + pid_m, tl.sum(ub, axis=0))

    # Within the chunk: dC_l += sum_{s<=l} dCB[l,s] B_s, dB_s += sum_{l>=s} dCB[l,s] C_l.
    CB_base = dCB_ptr + pid_bcg * chunk_size * chunk_size
    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    for s0 in range(0, hi, BLOCK_S):
        s = s0 + offs_s
        in_s = s < chunk_size
        pos_s = pid_c * chunk_size + s
        causal = (offs_m[:, None] >= s[None, :]) & in_s[None, :] & in_m[:, None]
        dcb = tl.load(CB_base + offs_m[:, None] * chunk_size + s[None, :], mask=causal, other=0.0)
        bs = tl.load(B_ptr + pid_b * s_B_b + pos_s[:, None] * s_B_l + pid_g * s_B_g + offs_n[None, :] * s_B_n,
                     mask=(in_s & (pos_s < seqlen))[:, None] & mask_n[None, :], other=0.0)
        dC += tl.dot(dcb.to(bs.dtype), bs, input_precision=PREC)
    lo = (pid_m * BLOCK_M // BLOCK_S) * BLOCK_S
    for l0 in range(lo, chunk_size, BLOCK_S):
        l = l0 + offs_s
        in_l = l < chunk_size
        pos_l = pid_c * chunk_size + l
        causal = (l[None, :] >= offs_m[:, None]) & in_l[None, :] & in_m[:, None]
        dcbt = tl.load(CB_base + l[None, :] * chunk_size + offs_m[:, None], mask=causal, other=0.0)
        cl = tl.load(C_ptr + pid_b * s_C_b + pos_l[:, None] * s_C_l + pid_g * s_C_g + offs_n[None, :] * s_C_n,
                     mask=(in_l & (pos_l < seqlen))[:, None] & mask_n[None, :], other=0.0)
        dB += tl.dot(dcbt.to(cl.dtype), cl, input_precision=PREC)
    off = pid_b * s_dB_b + pos_m[:, None] * s_dB_l + pid_g * s_dB_g + offs_n[None, :] * s_dB_n
    tl.store(dB_ptr + off, dB, mask=mask)
    tl.store(dC_ptr + off, dC, mask=mask)


def dx_bwd(x, dy, D, B, CB, dt_proc, dA_cs, dS, seq_idx=None):
    """Returns (dx, ddt through dt's direct uses (b, h, c, L), dD or None)."""
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks, chunk_size = dA_cs.shape[2], dA_cs.shape[3]
    cfg = blocks("dx", chunk_size, headdim, dstate)
    nm, nn = triton.cdiv(chunk_size, cfg["BLOCK_M"]), triton.cdiv(headdim, cfg["BLOCK_N"])
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ddt_part = torch.empty(nn, bsz, nchunks, nheads, chunk_size, device=x.device, dtype=torch.float32)
    if D is None:
        dD_part = ddt_part
    elif D.dim() == 2:
        dD_part = torch.empty(bsz, nchunks, nm, nheads, headdim, device=x.device, dtype=torch.float32)
    else:
        dD_part = torch.empty(bsz, nchunks, nm * nn, nheads, device=x.device, dtype=torch.float32)
    _dx_kernel[(nm * nn, bsz * nchunks * nheads)](
        x, dy, D if D is not None else x, B, CB, dt_proc, dA_cs, dS, dx, ddt_part, dD_part,
        seq_idx if seq_idx is not None else dA_cs,
        seqlen, nheads, headdim, dstate, nchunks, chunk_size, nheads // ngroups,
        *x.stride(), *dy.stride(), *B.stride(), *dx.stride(),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_SEQ=seq_idx is not None,
        PREC=dot_precision(x.dtype), **cfg,
    )
    ddt = ddt_part.sum(0) if nn > 1 else ddt_part[0]
    ddt = ddt.permute(0, 2, 1, 3).contiguous()  # (b, h, c, L)
    dD = None if D is None else dD_part.sum((0, 1, 2))
    return dx, ddt, dD


def dcb_bwd(x, dy, CB, dt_proc, dA_cs, ngroups, seq_idx=None):
    """Returns (dCB (b, c, g, L, L) fp32, intra-chunk cumsum gradient (b, h, c, L))."""
    bsz, seqlen, nheads, headdim = x.shape
    nchunks, chunk_size = dA_cs.shape[2], dA_cs.shape[3]
    cfg = blocks("dcb", chunk_size, headdim, 16)
    nm = triton.cdiv(chunk_size, cfg["BLOCK_M"])
    dCB = torch.empty_like(CB)
    da_row = torch.zeros(nm, bsz, nheads, nchunks, chunk_size, device=x.device, dtype=torch.float32)
    da_col = torch.zeros_like(da_row)
    _dcb_kernel[(nm * nm, bsz * nchunks * ngroups)](
        x, dy, CB, dt_proc, dA_cs, dCB, da_row, da_col, seq_idx if seq_idx is not None else dA_cs,
        seqlen, nheads, headdim, ngroups, nchunks, chunk_size, nheads // ngroups,
        *x.stride(), *dy.stride(),
        HAS_SEQ=seq_idx is not None, PREC=dot_precision(x.dtype), **cfg,
    )
    return dCB, da_row.sum(0) - da_col.sum(0)


def dbc_bwd(x, dy, B, C, dCB, dt_proc, dA_cs, states, dS, seq_idx=None):
    """Returns (dB, dC, state share of the cumsum gradient (b, h, c, L), its last-position part (b, h, c))."""
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks, chunk_size = dA_cs.shape[2], dA_cs.shape[3]
    cfg = blocks("dbc", chunk_size, headdim, dstate)
    nm, nn = triton.cdiv(chunk_size, cfg["BLOCK_M"]), triton.cdiv(dstate, cfg["BLOCK_N"])
    dB = torch.empty(B.shape, device=B.device, dtype=B.dtype)
    dC = torch.empty(C.shape, device=C.device, dtype=C.dtype)
    da_part = torch.empty(nn, bsz, nheads, nchunks, chunk_size, device=x.device, dtype=torch.float32)
    daL_part = torch.empty(nn, bsz, nheads, nchunks, nm, device=x.device, dtype=torch.float32)
    _dbc_kernel[(nm * nn, bsz * nchunks * ngroups)](
        x, dy, B, C, dCB, dt_proc, dA_cs, states, dS, dB, dC, da_part, daL_part,
        seq_idx if seq_idx is not None else dA_cs,
        seqlen, nheads, headdim, dstate, ngroups, nchunks, chunk_size, nheads // ngroups,
        *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *dB.stride(),
        HAS_SEQ=seq_idx is not None, PREC=dot_precision(x.dtype), **cfg,
    )
    return dB, dC, da_part.sum(0), daL_part.sum((0, -1))
