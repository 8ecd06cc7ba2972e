"""Triton causal depthwise conv1d with optional SiLU (channel-last), its backward,
and the single-token decode update. Semantics: kernels/conv/reference.py.

    pre[t, d] = bias[d] + sum_k w[d, k] x[t - (W-1) + k, d],   y = silu(pre)

With seq_idx (b, l) (packed documents) a term reads x only when its row is of t's document,
as causal-conv1d's seq_idx: w[d, k] x[t - (W-1) + k, d] counts iff seq_idx[t - (W-1) + k] ==
seq_idx[t]; the backward applies the same mask (HAS_SEQ: compiled in only when given).

The backward recomputes `pre` rather than saving it, in two passes: the gradient g of
`pre` (with dw and dbias: one program covers a strip of channels over a span of rows,
accumulates them in registers and writes one partial, summed on the host:
deterministic, no atomics), then dx from g.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.triton_utils import interpreting, next_pow2, silu, silu_grad

_ACTIVATIONS = {None: False, "none": False, "silu": True, "swish": True}

# Backward: row blocks per program (more: fewer dw/dbias partials; fewer: more parallelism).
BWD_BLOCKS_PER_PROGRAM = 4


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, seq_ptr, seqlen, dim,
    s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_y_b, s_y_l, s_y_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b, pid_l, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    x_base = x_ptr + pid_b * s_x_b + offs_d[None, :] * s_x_d
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * seqlen + offs_t, mask=offs_t < seqlen, other=-1)
    for k in tl.static_range(WIDTH):
        src = offs_t - (WIDTH - 1) + k
        inside = (src >= 0) & (src < seqlen)
        if HAS_SEQ:
            inside &= tl.load(seq_ptr + pid_b * seqlen + src, mask=inside, other=-2) == seq_t
        xv = tl.load(x_base + src[:, None] * s_x_l, mask=inside[:, None] & mask_d[None, :],
                     other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    if SILU:
        acc = silu(acc)
    tl.store(y_ptr + pid_b * s_y_b + offs_t[:, None] * s_y_l + offs_d[None, :] * s_y_d, acc,
             mask=(offs_t < seqlen)[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, dy_ptr, g_ptr, dw_part_ptr, db_part_ptr, seq_ptr, seqlen, dim, rows_per_program,
    s_x_b, s_x_l, s_x_d, s_w_d, s_w_k, s_y_b, s_y_l, s_y_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """g = dy * silu'(pre) (pre recomputed) into g (b, l, d) contiguous; dw and dbias partials."""
    pid_b, pid_s, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < dim
    x_base = x_ptr + pid_b * s_x_b + offs_d[None, :] * s_x_d
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid_s * rows_per_program
    end = tl.minimum(start + rows_per_program, seqlen)
    for t0 in range(start, end, BLOCK_L):
        offs_t = t0 + tl.arange(0, BLOCK_L)
        mask = (offs_t < end)[:, None] & mask_d[None, :]
        g = tl.load(dy_ptr + pid_b * s_y_b + offs_t[:, None] * s_y_l + offs_d[None, :] * s_y_d, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + pid_b * seqlen + offs_t, mask=offs_t < seqlen, other=-1)
        if SILU:
            pre = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32) + bias[None, :]
            for k in tl.static_range(WIDTH):
                src = offs_t - (WIDTH - 1) + k
                inside = (src >= 0) & (src < seqlen)
                if HAS_SEQ:
                    inside &= tl.load(seq_ptr + pid_b * seqlen + src, mask=inside, other=-2) == seq_t
                xv = tl.load(x_base + src[:, None] * s_x_l, mask=inside[:, None] & mask_d[None, :],
                             other=0.0).to(tl.float32)
                pre += xv * tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            g = g * silu_grad(pre)
        tl.store(g_ptr + (pid_b * seqlen + offs_t[:, None]) * dim + offs_d[None, :], g, mask=mask)
        db += tl.sum(g, axis=0)
        for k in tl.static_range(WIDTH):
            src = offs_t - (WIDTH - 1) + k
            inside = (src >= 0) & (src < seqlen)
            if HAS_SEQ:
                inside &= tl.load(seq_ptr + pid_b * seqlen + src, mask=inside, other=-2) == seq_t
            xv = tl.load(x_base + src[:, None] * s_x_l, mask=inside[:, None] & mask_d[None, :],
                         other=0.0).to(tl.float32)
            dw += tl.where(offs_w[None, :] == k, tl.sum(g * xv, axis=0)[:, None], 0.0)
    part = pid_b * tl.num_programs(1) + pid_s
    tl.store(dw_part_ptr + (part * dim + offs_d[:, None]) * BLOCK_W + offs_w[None, :], dw, mask=mask_d[:, None])
    tl.store(db_part_ptr + part * dim + offs_d, db, mask=mask_d)


@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr, w_ptr, dx_ptr, seq_ptr, seqlen, dim, s_w_d, s_w_k, s_dx_b, s_dx_l, s_dx_d,
    WIDTH: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[t] = sum_j g[t + j] w[W - 1 - j] (over rows t + j of t's document with HAS_SEQ)."""
    pid_b, pid_l, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * seqlen + offs_t, mask=offs_t < seqlen, other=-1)
    for j in tl.static_range(WIDTH):
        rows = offs_t + j
        inside = rows < seqlen
        if HAS_SEQ:
            inside &= tl.load(seq_ptr + pid_b * seqlen + rows, mask=inside, other=-2) == seq_t
        g = tl.load(g_ptr + (pid_b * seqlen + rows[:, None]) * dim + offs_d[None, :],
                    mask=inside[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + offs_d * s_w_d + (WIDTH - 1 - j) * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        dx += g * wv[None, :]
    tl.store(dx_ptr + pid_b * s_dx_b + offs_t[:, None] * s_dx_l + offs_d[None, :] * s_dx_d, dx,
             mask=(offs_t < seqlen)[:, None] & mask_d[None, :])


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, new_ptr, dim,
    s_x_b, s_x_d, s_s_b, s_s_d, s_s_k, s_w_d, s_w_k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < dim
    shifted = tl.load(state_ptr + pid_b * s_s_b + offs_d[:, None] * s_s_d + (offs_w + 1)[None, :] * s_s_k,
                      mask=mask_d[:, None] & (offs_w < WIDTH - 1)[None, :], other=0.0)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0)
    new = tl.where((offs_w == WIDTH - 1)[None, :], x.to(shifted.dtype)[:, None], shifted)
    mask = mask_d[:, None] & (offs_w < WIDTH)[None, :]
    tl.store(new_ptr + ((pid_b * dim + offs_d[:, None]) * WIDTH + offs_w[None, :]), new, mask=mask)
    w = tl.load(w_ptr + offs_d[:, None] * s_w_d + offs_w[None, :] * s_w_k, mask=mask, other=0.0).to(tl.float32)
    y = tl.sum(tl.where(mask, new.to(tl.float32) * w, 0.0), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = silu(y)
    tl.store(y_ptr + pid_b * dim + offs_d, y, mask=mask_d)


def _silu_flag(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}; use 'silu' or None")
    return _ACTIVATIONS[activation]


def _fwd_blocks(dim):
    return (32, min(next_pow2(dim), 64)) if interpreting() else (64, min(next_pow2(dim), 128))


class CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, seq_idx=None):
        silu_on = _silu_flag(activation)
        if seq_idx is not None:
            seq_idx = seq_idx.to(device=x.device, dtype=torch.int32).contiguous()
        bsz, seqlen, dim = x.shape
        width = weight.shape[1]
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        bl, bd = _fwd_blocks(dim)
        _conv_fwd_kernel[(bsz, triton.cdiv(seqlen, bl), triton.cdiv(dim, bd))](
            x, weight, bias if bias is not None else weight, y, seq_idx if seq_idx is not None else x, seqlen, dim,
            *x.stride(), *weight.stride(), *y.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, SILU=silu_on, HAS_SEQ=seq_idx is not None, BLOCK_L=bl, BLOCK_D=bd,
        )
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu_on
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        seq = seq_idx if seq_idx is not None else x
        bsz, seqlen, dim = x.shape
        width = weight.shape[1]
        bl, bd = _fwd_blocks(dim)
        # Each program takes a span of a few row blocks, so that many programs run at once.
        n_d = triton.cdiv(dim, bd)
        rows = bl * BWD_BLOCKS_PER_PROGRAM
        spans = triton.cdiv(seqlen, rows)
        bw = triton.next_power_of_2(width)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        dw_part = torch.empty(bsz * spans, dim, bw, device=x.device, dtype=torch.float32)
        db_part = torch.empty(bsz * spans, dim, device=x.device, dtype=torch.float32)
        # Two passes: g = dL/dpre (stored in x's dtype, fp32 for fp32) with dw and dbias, then dx from g;
        # one fused pass would need every input row W times over and spills its registers.
        g = torch.empty(bsz, seqlen, dim, device=x.device, dtype=x.dtype)
        _conv_bwd_pre_kernel[(bsz, spans, n_d)](
            x, weight, bias if bias is not None else weight, dy, g, dw_part, db_part, seq, seqlen, dim, rows,
            *x.stride(), *weight.stride(), *dy.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, SILU=ctx.silu, HAS_SEQ=seq_idx is not None,
            BLOCK_L=bl, BLOCK_D=bd, BLOCK_W=bw,
        )
        _conv_bwd_dx_kernel[(bsz, triton.cdiv(seqlen, bl), n_d)](
            g, weight, dx, seq, seqlen, dim, *weight.stride(), *dx.stride(), WIDTH=width, HAS_SEQ=seq_idx is not None,
            BLOCK_L=bl, BLOCK_D=bd,
        )
        dw = dw_part.sum(0)[:, :width].to(weight.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, None, None


def causal_conv1d_triton(x, weight, bias=None, activation="silu", seq_idx=None):
    return CausalConv1d.apply(x, weight, bias, activation, seq_idx)


def causal_conv1d_step_triton(x, conv_state, weight, bias=None, activation="silu"):
    """One token: x (b, d), conv_state (b, d, w). Returns (y (b, d), new_state)."""
    silu_on = _silu_flag(activation)
    bsz, dim = x.shape
    width = weight.shape[1]
    y = torch.empty(bsz, dim, device=x.device, dtype=x.dtype)
    new_state = torch.empty(bsz, dim, width, device=x.device, dtype=conv_state.dtype)
    bd = min(next_pow2(dim), 256)
    _conv_step_kernel[(bsz, triton.cdiv(dim, bd))](
        x, conv_state, weight, bias if bias is not None else weight, y, new_state, dim,
        *x.stride(), *conv_state.stride(), *weight.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu_on, BLOCK_D=bd, BLOCK_W=triton.next_power_of_2(width),
    )
    return y, new_state
