"""Triton RMSNorm, plain or gated and grouped (Mamba2's RMSNormGated, norm_before_gate=False),
forward and backward. Semantics: kernels/norm/reference.py.

    h = x * silu(z) (or x),  y = h * rsqrt(mean_group(h^2) + eps) * weight

The forward saves 1/rms per (row, group) in fp32. The backward walks rows in a
grid-stride loop, one group of columns per program, keeps dweight in registers and
writes one partial per program (summed on the host: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.triton_utils import next_pow2, num_programs_hint, silu, silu_grad


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, nrows, dim, group_size, eps,
    s_x, s_z, s_y,
    HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_g = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_g * group_size + tl.arange(0, BLOCK_N)
    mask_c = tl.arange(0, BLOCK_N) < group_size
    mask = (rows < nrows)[:, None] & mask_c[None, :]
    h = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = h * silu(z)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / group_size + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], h * rstd[:, None] * w[None, :], mask=mask)
    tl.store(rstd_ptr + rows * (dim // group_size) + pid_g, rstd, mask=rows < nrows)


@triton.jit
def _rmsnorm_bwd_kernel(
    x_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dz_ptr, dw_part_ptr, nrows, dim, group_size,
    s_x, s_z, s_dy, s_dx, s_dz,
    HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, pid_g = tl.program_id(0), tl.program_id(1)
    nprog = tl.num_programs(0)
    cols = pid_g * group_size + tl.arange(0, BLOCK_N)
    mask_c = tl.arange(0, BLOCK_N) < group_size
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, nrows, nprog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < nrows)[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = x * silu(z)
        else:
            h = x
        rstd = tl.load(rstd_ptr + rows * (dim // group_size) + pid_g, mask=rows < nrows, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hn = h * rstd[:, None]
        dw += tl.sum(dy * hn, axis=0)
        dhn = dy * w[None, :]
        dh = rstd[:, None] * (dhn - hn * (tl.sum(dhn * hn, axis=1) / group_size)[:, None])
        if HAS_Z:
            tl.store(dx_ptr + rows[:, None] * s_dx + cols[None, :], dh * silu(z), mask=mask)
            tl.store(dz_ptr + rows[:, None] * s_dz + cols[None, :], dh * x * silu_grad(z), mask=mask)
        else:
            tl.store(dx_ptr + rows[:, None] * s_dx + cols[None, :], dh, mask=mask)
    tl.store(dw_part_ptr + pid * dim + cols, dw, mask=mask_c)


# Backward launch: programs per SM (each walks rows with a grid stride and writes one
# dweight partial), elements per row block and warps; the benchmark may change these.
# Defaults from a sweep on an H100 (bf16, 32k rows): one row of 2048 on 4 warps, two
# rows of 4096 on 16 warps, i.e. 16 elements per thread; more spills registers.
BWD_PROGRAMS_PER_SM = 8
BWD_ELEMENTS = None  # None: 2048, or 2 rows where a row is longer
BWD_NUM_WARPS = None  # None: 16 elements per thread


def _blocks(group_size, elements=4096):
    block_n = next_pow2(group_size)
    block_m = max(1, min(16, elements // block_n))
    num_warps = 4 if block_n * block_m <= 1024 else 8
    return block_m, block_n, num_warps


def _rows(t, dim):
    t = t.reshape(-1, dim)
    return t if t.stride(-1) == 1 else t.contiguous()


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, z, group_size):
        shape, dim = x.shape, x.shape[-1]
        gs = dim if group_size is None else int(group_size)
        if dim % gs:
            raise ValueError(f"rmsnorm: group_size {gs} does not divide the last dim {dim}")
        x2 = _rows(x, dim)
        z2 = _rows(z, dim) if z is not None else None
        nrows = x2.shape[0]
        y = torch.empty(nrows, dim, device=x.device, dtype=x.dtype)
        rstd = torch.empty(nrows, dim // gs, device=x.device, dtype=torch.float32)
        bm, bn, nw = _blocks(gs)
        _rmsnorm_fwd_kernel[(triton.cdiv(nrows, bm), dim // gs)](
            x2, z2 if z2 is not None else x2, weight, y, rstd, nrows, dim, gs, float(eps),
            x2.stride(0), (z2 if z2 is not None else x2).stride(0), y.stride(0),
            HAS_Z=z is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.shape, ctx.gs = shape, gs
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        nrows, dim = x2.shape
        gs = ctx.gs
        dy2 = _rows(dy, dim)
        dx = torch.empty_like(x2)
        dz = torch.empty_like(z2) if z2 is not None else None
        bm, bn, _ = _blocks(gs, BWD_ELEMENTS or (2 * next_pow2(gs) if next_pow2(gs) >= 4096 else 2048))
        nw = BWD_NUM_WARPS or min(16, max(4, bm * bn // (16 * 32)))
        ngroups = dim // gs
        nprog = max(1, min(triton.cdiv(nrows, bm), BWD_PROGRAMS_PER_SM * num_programs_hint(x2) // ngroups))
        dw_part = torch.empty(nprog, dim, device=x2.device, dtype=torch.float32)
        zz = z2 if z2 is not None else x2
        _rmsnorm_bwd_kernel[(nprog, ngroups)](
            x2, zz, weight, rstd, dy2, dx, dz if dz is not None else dx, dw_part, nrows, dim, gs,
            x2.stride(0), zz.stride(0), dy2.stride(0), dx.stride(0), (dz if dz is not None else dx).stride(0),
            HAS_Z=z2 is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
        dw = dw_part.sum(0).to(weight.dtype)
        return (dx.reshape(ctx.shape), dw, None,
                dz.reshape(ctx.shape) if dz is not None else None, None)


def rmsnorm_triton(x, weight, eps=1e-5, z=None, group_size=None):
    return RMSNorm.apply(x, weight, eps, z, group_size)
