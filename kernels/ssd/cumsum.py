"""SSD step 1: dt preparation and the within-chunk cumulative sum of dt * A, and its backward.

dt = clamp(softplus(dt + dt_bias), dt_min, dt_max) as in the reference (kernels/ssd/reference.py,
prepare_dt); the clamp is compiled in only when dt_limit limits anything (HAS_LIMIT), and a
clamped dt passes no gradient (as torch.clamp and mamba_ssm's kernel).

Layout of the outputs: (b, h, c, chunk_size) fp32, contiguous. Positions past the
end of the sequence hold dt = 0 (they add nothing and decay nothing), so the
cumsum there stays at the chunk's last real value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.ssd.reference import NO_DT_LIMIT, clamps_dt
from strata.kernels.triton_utils import next_pow2, sigmoid, softplus


@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, dA_cs_ptr,
    seqlen, nheads, nchunks, chunk_size, dt_min, dt_max,
    s_dt_b, s_dt_l, s_dt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    pos = pid_c * chunk_size + offs_l
    mask_h = offs_h < nheads
    mask_l = (offs_l < chunk_size) & (pos < seqlen)
    mask = mask_h[:, None] & mask_l[None, :]
    dt = tl.load(dt_ptr + pid_b * s_dt_b + pos[None, :] * s_dt_l + offs_h[:, None] * s_dt_h,
                 mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    dA_cs = tl.cumsum(dt * A[:, None], axis=1)
    out = ((pid_b * nheads + offs_h[:, None]) * nchunks + pid_c) * chunk_size + offs_l[None, :]
    smask = mask_h[:, None] & (offs_l < chunk_size)[None, :]
    tl.store(dt_out_ptr + out, dt, mask=smask)
    tl.store(dA_cs_ptr + out, dA_cs, mask=smask)


@triton.jit
def _chunk_cumsum_bwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_proc_ptr, ddt_in_ptr, dda_ptr, ddaL_ptr,
    ddt_ptr, dA_part_ptr, dbias_part_ptr,
    seqlen, nheads, nchunks, chunk_size, dt_min, dt_max,
    s_dt_b, s_dt_l, s_dt_h, s_ddt_b, s_ddt_l, s_ddt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dda: gradient w.r.t. the cumsum values (b, h, c, L); ddaL: the extra gradient
    w.r.t. each chunk's last cumsum value (b, h, c); ddt_in: gradient w.r.t. the
    prepared dt through its direct uses. Writes the gradient w.r.t. the raw dt and
    per-program partial sums for A and dt_bias."""
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    pos = pid_c * chunk_size + offs_l
    mask_h = offs_h < nheads
    mask_l = (offs_l < chunk_size) & (pos < seqlen)
    mask = mask_h[:, None] & mask_l[None, :]
    inner = ((pid_b * nheads + offs_h[:, None]) * nchunks + pid_c) * chunk_size + offs_l[None, :]
    imask = mask_h[:, None] & (offs_l < chunk_size)[None, :]
    dda = tl.load(dda_ptr + inner, mask=imask, other=0.0)
    ddaL = tl.load(ddaL_ptr + (pid_b * nheads + offs_h) * nchunks + pid_c, mask=mask_h, other=0.0)
    dda += tl.where(offs_l[None, :] == chunk_size - 1, ddaL[:, None], 0.0)
    ddA = tl.cumsum(dda, axis=1, reverse=True)  # d/d(dt*A) at each position
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    dt_proc = tl.load(dt_proc_ptr + inner, mask=imask, other=0.0)
    ddt = tl.load(ddt_in_ptr + inner, mask=imask, other=0.0) + ddA * A[:, None]
    ddt = tl.where(mask, ddt, 0.0)
    dA_part = tl.sum(ddA * dt_proc, axis=1)
    if SOFTPLUS or HAS_LIMIT:
        raw = tl.load(dt_ptr + pid_b * s_dt_b + pos[None, :] * s_dt_l + offs_h[:, None] * s_dt_h,
                      mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[:, None]
        if HAS_LIMIT:
            unclamped = softplus(raw) if SOFTPLUS else raw
            ddt = tl.where((unclamped < dt_min) | (unclamped > dt_max), 0.0, ddt)
        if SOFTPLUS:
            ddt = ddt * sigmoid(raw)
    tl.store(ddt_ptr + pid_b * s_ddt_b + pos[None, :] * s_ddt_l + offs_h[:, None] * s_ddt_h,
             ddt, mask=mask)
    part = (pid_b * nchunks + pid_c) * nheads + offs_h
    tl.store(dA_part_ptr + part, dA_part, mask=mask_h)
    tl.store(dbias_part_ptr + part, tl.sum(ddt, axis=1), mask=mask_h)


def _block_h(nheads: int, block_l: int) -> int:
    return max(1, min(triton.next_power_of_2(nheads), 4096 // block_l))


def chunk_cumsum_fwd(dt, A, dt_bias, dt_softplus, chunk_size, dt_limit=NO_DT_LIMIT):
    """dt (b, l, h) -> (dt_proc, dA_cumsum), each (b, h, c, chunk_size) fp32."""
    bsz, seqlen, nheads = dt.shape
    nchunks = triton.cdiv(seqlen, chunk_size)
    dt_out = torch.empty(bsz, nheads, nchunks, chunk_size, device=dt.device, dtype=torch.float32)
    dA_cs = torch.empty_like(dt_out)
    block_l = next_pow2(chunk_size)
    block_h = _block_h(nheads, block_l)
    grid = (bsz, nchunks, triton.cdiv(nheads, block_h))
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, dA_cs,
        seqlen, nheads, nchunks, chunk_size, float(dt_limit[0]), float(dt_limit[1]), *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=clamps_dt(dt_limit),
        BLOCK_H=block_h, BLOCK_L=block_l,
    )
    return dt_out, dA_cs


def chunk_cumsum_bwd(dt, A, dt_bias, dt_softplus, dt_proc, ddt_in, dda, ddaL, dt_limit=NO_DT_LIMIT):
    """Returns (ddt (b, l, h) in dt's dtype, dA (h,) fp32, ddt_bias (h,) fp32 or None)."""
    bsz, seqlen, nheads = dt.shape
    _, _, nchunks, chunk_size = dt_proc.shape
    ddt = torch.empty(bsz, seqlen, nheads, device=dt.device, dtype=dt.dtype)
    dA_part = torch.empty(bsz, nchunks, nheads, device=dt.device, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part)
    block_l = next_pow2(chunk_size)
    block_h = _block_h(nheads, block_l)
    grid = (bsz, nchunks, triton.cdiv(nheads, block_h))
    _chunk_cumsum_bwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_proc, ddt_in, dda, ddaL,
        ddt, dA_part, dbias_part,
        seqlen, nheads, nchunks, chunk_size, float(dt_limit[0]), float(dt_limit[1]),
        *dt.stride(), *ddt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=clamps_dt(dt_limit),
        BLOCK_H=block_h, BLOCK_L=block_l,
    )
    dbias = dbias_part.sum((0, 1)) if dt_bias is not None else None
    return ddt, dA_part.sum((0, 1)), dbias
