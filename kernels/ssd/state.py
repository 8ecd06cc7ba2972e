"""SSD steps 2-3: the state of each chunk and the recurrence that passes states across
chunks, fused (one program walks the chunks of one (batch, head, state tile) in
order), and the reverse walk of the backward pass.

Forward, per chunk c (a = cumsum of dt * A within the chunk, L its last position):
    S_c     = sum_s exp(a_L - a_s) dt_s x_s B_s^T          (p, n)
    H_{c+1} = exp(a_L) H_c + S_c,   H_0 = initial state
The states entering each chunk, H_c, are stored (b, c, h, p, n), 16-bit for 16-bit inputs; H_nc is the
final state.

Packed documents (seq_idx: each token's document): S_c sums only the tokens of the document of
the chunk's last token, and H_c passes into H_{c+1} only when chunk c's last token is of the
document of the state entering it (no document starts within the chunk); the initial state is
document 0's. The backward applies the same masks (documents.py).

Backward, with G_c = sum_l exp(a_l) dy_l C_l^T (the gradient that chunk c's outputs
send to H_c) and T = dH_nc (the final state's gradient):
    dS_c = T_{c+1},  T_c = G_c + exp(a_L) T_{c+1},  d initial = T_0,
    d a_L += exp(a_L) <T_{c+1}, H_c>.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.ssd.config import blocks
from strata.kernels.ssd.documents import chunk_documents, documents_of
from strata.kernels.triton_utils import dot_precision


@triton.jit
def _state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, init_ptr, states_ptr, final_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, nchunks, chunk_size, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_i_b, s_i_h, s_i_p, s_i_n,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_pn, pid_bh = tl.program_id(0), tl.program_id(1)
    pid_b, pid_h = pid_bh // nheads, pid_bh % nheads
    n_nblocks = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // n_nblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_pn = (offs_p < headdim)[:, None] & (offs_n < dstate)[None, :]
    x_base = x_ptr + pid_b * s_x_b + pid_h * s_x_h + offs_p[:, None] * s_x_p
    B_base = B_ptr + pid_b * s_B_b + (pid_h // heads_per_group) * s_B_g + offs_n[None, :] * s_B_n
    cs_base = (pid_b * nheads + pid_h) * nchunks * chunk_size
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + pid_b * s_i_b + pid_h * s_i_h + offs_p[:, None] * s_i_p
                        + offs_n[None, :] * s_i_n, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for c in range(nchunks):
        tl.store(states_ptr + ((pid_b * nchunks + c) * nheads + pid_h) * headdim * dstate + pn,
                 state.to(states_ptr.dtype.element_ty), mask=mask_pn)
        a_last = tl.load(dA_cs_ptr + cs_base + c * chunk_size + chunk_size - 1)
        keep = tl.exp(a_last)
        if HAS_SEQ:
            enter, last = chunk_documents(seq_ptr, pid_b, c, seqlen, chunk_size)
            keep = tl.where(last == enter, keep, 0.0)
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for k in range(0, chunk_size, BLOCK_K):
            in_chunk = k + offs_k < chunk_size
            pos = c * chunk_size + k + offs_k
            mask_k = in_chunk & (pos < seqlen)
            if HAS_SEQ:
                mask_k = mask_k & (documents_of(seq_ptr, pid_b, pos, mask_k, seqlen) == last)
            xt = tl.load(x_base + pos[None, :] * s_x_l, mask=(offs_p < headdim)[:, None] & mask_k[None, :],
                         other=0.0)
            b = tl.load(B_base + pos[:, None] * s_B_l, mask=mask_k[:, None] & (offs_n < dstate)[None, :],
                        other=0.0).to(tl.float32)
            a = tl.load(dA_cs_ptr + cs_base + c * chunk_size + k + offs_k, mask=in_chunk, other=0.0)
            dt = tl.load(dt_ptr + cs_base + c * chunk_size + k + offs_k, mask=in_chunk, other=0.0)
            scale = tl.where(mask_k, tl.exp(a_last - a) * dt, 0.0)
            acc += tl.dot(xt, (b * scale[:, None]).to(xt.dtype), input_precision=PREC)
        state = keep * state + acc
    tl.store(final_ptr + (pid_b * nheads + pid_h) * headdim * dstate + pn, state, mask=mask_pn)


@triton.jit
def _state_bwd_kernel(
    dy_ptr, C_ptr, dA_cs_ptr, states_ptr, dfinal_ptr, dS_ptr, dinit_ptr, ddaL_part_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, nchunks, chunk_size, heads_per_group,
    s_y_b, s_y_l, s_y_h, s_y_p,
    s_C_b, s_C_l, s_C_g, s_C_n,
    HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_pn, pid_bh = tl.program_id(0), tl.program_id(1)
    n_pn = tl.num_programs(0)
    pid_b, pid_h = pid_bh // nheads, pid_bh % nheads
    n_nblocks = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // n_nblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_pn = (offs_p < headdim)[:, None] & (offs_n < dstate)[None, :]
    y_base = dy_ptr + pid_b * s_y_b + pid_h * s_y_h + offs_p[:, None] * s_y_p
    C_base = C_ptr + pid_b * s_C_b + (pid_h // heads_per_group) * s_C_g + offs_n[None, :] * s_C_n
    cs_base = (pid_b * nheads + pid_h) * nchunks * chunk_size
    pn = offs_p[:, None] * dstate + offs_n[None, :]
    if HAS_DFINAL:
        t = tl.load(dfinal_ptr + (pid_b * nheads + pid_h) * headdim * dstate + pn, mask=mask_pn, other=0.0)
    else:
        t = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for cc in range(nchunks):
        c = nchunks - 1 - cc
        off_state = ((pid_b * nchunks + c) * nheads + pid_h) * headdim * dstate + pn
        tl.store(dS_ptr + off_state, t.to(dS_ptr.dtype.element_ty), mask=mask_pn)
        a_last = tl.load(dA_cs_ptr + cs_base + c * chunk_size + chunk_size - 1)
        keep = tl.exp(a_last)
        if HAS_SEQ:
            enter, last = chunk_documents(seq_ptr, pid_b, c, seqlen, chunk_size)
            keep = tl.where(last == enter, keep, 0.0)
        h_c = tl.load(states_ptr + off_state, mask=mask_pn, other=0.0).to(tl.float32)
        tl.store(ddaL_part_ptr + ((pid_b * nheads + pid_h) * nchunks + c) * n_pn + pid_pn,
                 keep * tl.sum(tl.sum(t * h_c, axis=1), axis=0))
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for k in range(0, chunk_size, BLOCK_K):
            in_chunk = k + offs_k < chunk_size
            pos = c * chunk_size + k + offs_k
            mask_k = in_chunk & (pos < seqlen)
            if HAS_SEQ:
                mask_k = mask_k & (documents_of(seq_ptr, pid_b, pos, mask_k, seqlen) == enter)
            dyt = tl.load(y_base + pos[None, :] * s_y_l, mask=(offs_p < headdim)[:, None] & mask_k[None, :],
                          other=0.0)
            cm = tl.load(C_base + pos[:, None] * s_C_l, mask=mask_k[:, None] & (offs_n < dstate)[None, :],
                         other=0.0).to(tl.float32)
            a = tl.load(dA_cs_ptr + cs_base + c * chunk_size + k + offs_k, mask=in_chunk, other=0.0)
            scale = tl.where(mask_k, tl.exp(a), 0.0)
            acc += tl.dot(dyt, (cm * scale[:, None]).to(dyt.dtype), input_precision=PREC)
        t = acc + keep * t
    if HAS_DINIT:
        tl.store(dinit_ptr + (pid_b * nheads + pid_h) * headdim * dstate + pn, t, mask=mask_pn)


def state_dtype(dtype):
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def state_fwd(x, B, dt_proc, dA_cs, initial_states, seq_idx=None):
    """Returns (states entering each chunk (b, c, h, p, n), final state (b, h, p, n) fp32).
    seq_idx: (b, l) int32, contiguous (documents.py), or None.

    The recurrence runs in fp32; the states entering the chunks are stored in the
    input's dtype when that is 16-bit (they feed 16-bit matmuls only), fp32 otherwise.
    """
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks, chunk_size = dA_cs.shape[2], dA_cs.shape[3]
    states = torch.empty(bsz, nchunks, nheads, headdim, dstate, device=x.device, dtype=state_dtype(x.dtype))
    final = torch.empty(bsz, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    cfg = blocks("state_fwd", chunk_size, headdim, dstate)
    grid = (triton.cdiv(headdim, cfg["BLOCK_P"]) * triton.cdiv(dstate, cfg["BLOCK_N"]), bsz * nheads)
    init = initial_states if initial_states is not None else final
    _state_fwd_kernel[grid](
        x, B, dt_proc, dA_cs, init, states, final, seq_idx if seq_idx is not None else dA_cs,
        seqlen, nheads, headdim, dstate, nchunks, chunk_size, nheads // ngroups,
        *x.stride(), *B.stride(), *init.stride(),
        HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, PREC=dot_precision(x.dtype), **cfg,
    )
    return states, final


def state_bwd(dy, C, dA_cs, states, dfinal, need_dinit, seq_idx=None):
    """Returns (dS (b, c, h, p, n) in the states' dtype, d initial state or None, d a_L (b, h, c) fp32)."""
    bsz, seqlen, nheads, headdim = dy.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    nchunks, chunk_size = dA_cs.shape[2], dA_cs.shape[3]
    dS = torch.empty_like(states)
    dinit = torch.empty(bsz, nheads, headdim, dstate, device=dy.device, dtype=torch.float32) if need_dinit else None
    cfg = blocks("state_bwd", chunk_size, headdim, dstate)
    n_pn = triton.cdiv(headdim, cfg["BLOCK_P"]) * triton.cdiv(dstate, cfg["BLOCK_N"])
    ddaL_part = torch.empty(bsz, nheads, nchunks, n_pn, device=dy.device, dtype=torch.float32)
    _state_bwd_kernel[(n_pn, bsz * nheads)](
        dy, C, dA_cs, states, dfinal.contiguous() if dfinal is not None else states, dS,
        dinit if dinit is not None else states, ddaL_part, seq_idx if seq_idx is not None else dA_cs,
        seqlen, nheads, headdim, dstate, nchunks, chunk_size, nheads // ngroups,
        *dy.stride(), *C.stride(),
        HAS_DFINAL=dfinal is not None, HAS_DINIT=need_dinit, HAS_SEQ=seq_idx is not None,
        PREC=dot_precision(dy.dtype), **cfg,
    )
    return dS, dinit, ddaL_part.sum(-1)
