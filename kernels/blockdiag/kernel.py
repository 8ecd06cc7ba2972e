"""Triton block-diagonal matmul (BlockDense), optionally with BlockShuffle's stride-nblocks
output interleave fused into the store, forward and backward. Semantics:
kernels/blockdiag/reference.py.

    y[r, col(i, j)] = sum_k x[r, i*K + k] w[i, j, k],  col(i, j) = i*M + j, or j*nblocks + i with shuffle

With the shuffle, the tile of one block covers every nblocks-th column only.
SHUFFLE_MODE picks how it is done:
- "strided" (fused): strided stores (and loads of dy in the backward), with the grid
  ordered so that the programs of the nblocks blocks of one tile run side by side;
- "tiles" (fused): one program computes the tiles of all blocks for a range of j and
  stores one contiguous (rows, j, block) tile; the backward loads such tiles of dy and
  picks block i out of them;
- "copy" (default): the unshuffled kernels plus one permuting copy of y (and of dy).
On an H100 (bf16, 32k x 4096, 4 blocks) the fused forms ran 4-5x slower than the
unshuffled kernel, whose time plus a copy is the least (docs/BENCHMARKS.md).

Backward: dx[:, block i] = dy_i w[i]; dw[i] = dy_i^T x_i over all rows, split over row
spans into fp32 partials when there are too few (block, tile) programs to fill the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.triton_utils import dot_precision, interpreting, next_pow2, num_programs_hint


@triton.jit
def _dy_tile(dy_ptr, rows, offs_j, i, nrows, nblocks, m, s_dy, SHUFFLE: tl.constexpr, NBP: tl.constexpr,
             TILE3D: tl.constexpr):
    """dy[rows, col(i, offs_j)] as a (rows, j) tile; with the shuffle strided, or (TILE3D) through
    a contiguous (rows, j, block) load."""
    if SHUFFLE and not TILE3D:
        return tl.load(dy_ptr + rows[:, None].to(tl.int64) * s_dy + offs_j[None, :] * nblocks + i,
                       mask=(rows < nrows)[:, None] & (offs_j < m)[None, :], other=0.0)
    elif SHUFFLE:
        offs_i = tl.arange(0, NBP)
        ptr = dy_ptr + rows[:, None, None].to(tl.int64) * s_dy + offs_j[None, :, None] * nblocks + offs_i[None, None, :]
        mask = (rows < nrows)[:, None, None] & (offs_j < m)[None, :, None] & (offs_i < nblocks)[None, None, :]
        t = tl.load(ptr, mask=mask, other=0.0)
        return tl.sum(tl.where(offs_i[None, None, :] == i, t.to(tl.float32), 0.0), axis=2).to(t.dtype)
    else:
        return tl.load(dy_ptr + rows[:, None].to(tl.int64) * s_dy + i * m + offs_j[None, :],
                       mask=(rows < nrows)[:, None] & (offs_j < m)[None, :], other=0.0)


@triton.jit
def _bd_fwd_kernel(x_ptr, w_ptr, y_ptr, nrows, nblocks, m, k, s_x, s_y, s_w_b, s_w_m, s_w_k,
                   SHUFFLE: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r, pid_in = tl.program_id(0), tl.program_id(1)
    i, pid_n = pid_in % nblocks, pid_in // nblocks  # blocks fastest: with the shuffle they share sectors
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _block_tile(x_ptr, w_ptr, rows, offs_j, i, nrows, nblocks, m, k, s_x, s_w_b, s_w_m, s_w_k,
                      PREC, BLOCK_R, BLOCK_N, BLOCK_K)
    if SHUFFLE:
        cols = offs_j * nblocks + i
    else:
        cols = i * m + offs_j
    tl.store(y_ptr + rows[:, None].to(tl.int64) * s_y + cols[None, :], acc,
             mask=(rows < nrows)[:, None] & (offs_j < m)[None, :])


@triton.jit
def _bd_fwd_shuffle_kernel(x_ptr, w_ptr, y_ptr, nrows, nblocks, m, k, s_x, s_y, s_w_b, s_w_m, s_w_k,
                           PREC: tl.constexpr, NBP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """All blocks for one (rows, j) tile, stored as the contiguous (rows, j, block) tile of the output."""
    pid_r, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, NBP)
    out = tl.zeros((BLOCK_R, BLOCK_N, NBP), dtype=tl.float32)
    for i in tl.static_range(NBP):
        acc = _block_tile(x_ptr, w_ptr, rows, offs_j, i, nrows, nblocks, m, k, s_x, s_w_b, s_w_m, s_w_k,
                          PREC, BLOCK_R, BLOCK_N, BLOCK_K)
        out = tl.where(offs_i[None, None, :] == i, acc[:, :, None], out)
    ptr = y_ptr + rows[:, None, None].to(tl.int64) * s_y + offs_j[None, :, None] * nblocks + offs_i[None, None, :]
    mask = (rows < nrows)[:, None, None] & (offs_j < m)[None, :, None] & (offs_i < nblocks)[None, None, :]
    tl.store(ptr, out, mask=mask)


@triton.jit
def _block_tile(x_ptr, w_ptr, rows, offs_j, i, nrows, nblocks, m, k, s_x, s_w_b, s_w_m, s_w_k,
                PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, block i] @ w[i, offs_j]^T in fp32 (zeros for a block index past nblocks)."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = (rows < nrows) & (tl.zeros_like(rows) + i < nblocks)
    mask_j = (offs_j < m) & (tl.zeros_like(offs_j) + i < nblocks)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        mk = k0 + offs_k < k
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_x + i * k + (k0 + offs_k)[None, :],
                     mask=mask_r[:, None] & mk[None, :], other=0.0)
        wb = tl.load(w_ptr + i * s_w_b + offs_j[None, :] * s_w_m + (k0 + offs_k)[:, None] * s_w_k,
                     mask=mk[:, None] & mask_j[None, :], other=0.0)
        acc += tl.dot(xb, wb.to(xb.dtype), input_precision=PREC)
    return acc


@triton.jit
def _bd_dx_kernel(dy_ptr, w_ptr, dx_ptr, nrows, nblocks, m, k, s_dy, s_dx, s_w_b, s_w_m, s_w_k,
                  SHUFFLE: tl.constexpr, PREC: tl.constexpr, NBP: tl.constexpr, TILE3D: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[r, i*K + kk] = sum_j dy[r, col(i, j)] w[i, j, kk]; BLOCK_N tiles K, BLOCK_K tiles M."""
    pid_r, pid_in = tl.program_id(0), tl.program_id(1)
    i, pid_n = pid_in % nblocks, pid_in // nblocks
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_kk = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K)
    mask_r, mask_kk = rows < nrows, offs_kk < k
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, m, BLOCK_K):
        mj = j0 + offs_j < m
        g = _dy_tile(dy_ptr, rows, j0 + offs_j, i, nrows, nblocks, m, s_dy, SHUFFLE, NBP, TILE3D)
        wb = tl.load(w_ptr + i * s_w_b + (j0 + offs_j)[:, None] * s_w_m + offs_kk[None, :] * s_w_k,
                     mask=mj[:, None] & mask_kk[None, :], other=0.0)
        acc += tl.dot(g, wb.to(g.dtype), input_precision=PREC)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * s_dx + i * k + offs_kk[None, :], acc,
             mask=mask_r[:, None] & mask_kk[None, :])


@triton.jit
def _bd_dw_kernel(dy_ptr, x_ptr, dw_ptr, nrows, nblocks, m, k, s_dy, s_x, rows_per_split,
                  SHUFFLE: tl.constexpr, PREC: tl.constexpr, NBP: tl.constexpr, TILE3D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dw[split, i, j, kk] = sum over the split's rows of dy[r, col(i, j)] x[r, i*K + kk]."""
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_k = tl.cdiv(m, BLOCK_M), tl.cdiv(k, BLOCK_N)
    i = pid % nblocks
    pid_m = pid // (nblocks * tiles_k)
    pid_n = (pid // nblocks) % tiles_k
    offs_j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kk = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_j, mask_kk = offs_j < m, offs_kk < k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, nrows)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + offs_r
        mr = rows < end
        g = _dy_tile(dy_ptr, rows, offs_j, i, end, nblocks, m, s_dy, SHUFFLE, NBP, TILE3D)
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_x + i * k + offs_kk[None, :],
                     mask=mr[:, None] & mask_kk[None, :], other=0.0)
        acc += tl.dot(tl.trans(g), xb.to(g.dtype), input_precision=PREC)
    out = dw_ptr + ((pid_s * nblocks + i) * m + offs_j[:, None]) * k + offs_kk[None, :]
    tl.store(out, acc, mask=mask_j[:, None] & mask_kk[None, :])


# GPU tiles (rows, columns, reduction) and launch options, and the way of fusing the
# shuffle (see above); the benchmark may change them.
GPU_CONFIG = dict(BLOCK_R=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
SHUFFLE_MODE = "copy"  # or "strided", "tiles"


def _cfg():
    if interpreting():
        return dict(BLOCK_R=32, BLOCK_N=32, BLOCK_K=32), {}
    c = dict(GPU_CONFIG)
    return {k: c.pop(k) for k in ("BLOCK_R", "BLOCK_N", "BLOCK_K")}, c


def _fit(blocks, n_cols, n_red):
    """Shrink the column and reduction tiles to the problem (tl.dot needs >= 16)."""
    b = dict(blocks)
    b["BLOCK_N"] = min(b["BLOCK_N"], next_pow2(n_cols))
    b["BLOCK_K"] = min(b["BLOCK_K"], next_pow2(n_red))
    return b


def _compute_dtype(x, w):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, w.dtype)


class BlockDiagMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, shuffle):
        nblocks, m, k = w.shape
        dtype = _compute_dtype(x, w)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, nblocks * k).to(dtype)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        wc = w.to(dtype)
        nrows = x2.shape[0]
        y = torch.empty(nrows, nblocks * m, device=x.device, dtype=dtype)
        blocks, opts = _cfg()
        b = _fit(blocks, m, k)
        mode = SHUFFLE_MODE if shuffle else None
        if mode not in (None, "copy", "strided", "tiles"):
            raise ValueError(f"blockdiag: SHUFFLE_MODE {mode!r}; use 'copy', 'strided' or 'tiles'")
        if mode == "tiles":
            nbp = triton.next_power_of_2(nblocks)
            # Keep the (rows, j, block) tile at about the size of one plain tile.
            b["BLOCK_N"] = max(16, min(b["BLOCK_N"], next_pow2(b["BLOCK_N"] // nbp)))
            grid = (triton.cdiv(nrows, b["BLOCK_R"]), triton.cdiv(m, b["BLOCK_N"]))
            _bd_fwd_shuffle_kernel[grid](x2, wc, y, nrows, nblocks, m, k, x2.stride(0), y.stride(0), *wc.stride(),
                                         PREC=dot_precision(dtype), NBP=nbp, **b, **opts)
        else:
            grid = (triton.cdiv(nrows, b["BLOCK_R"]), nblocks * triton.cdiv(m, b["BLOCK_N"]))
            _bd_fwd_kernel[grid](x2, wc, y, nrows, nblocks, m, k, x2.stride(0), y.stride(0), *wc.stride(),
                                 SHUFFLE=mode == "strided", PREC=dot_precision(dtype), **b, **opts)
            if mode == "copy":
                y = y.view(nrows, nblocks, m).transpose(1, 2).reshape(nrows, nblocks * m)
        ctx.save_for_backward(x2, wc)
        ctx.mode, ctx.lead, ctx.dtypes = mode, lead, (x.dtype, w.dtype)
        return y.reshape(*lead, nblocks * m)

    @staticmethod
    def backward(ctx, dy):
        x2, wc = ctx.saved_tensors
        nblocks, m, k = wc.shape
        nrows = x2.shape[0]
        dy2 = dy.reshape(-1, nblocks * m).to(wc.dtype)
        if ctx.mode == "copy":  # back to the unshuffled layout
            dy2 = dy2.view(nrows, m, nblocks).transpose(1, 2).reshape(nrows, nblocks * m)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        shuffle = ctx.mode in ("strided", "tiles")
        blocks, opts = _cfg()
        prec = dot_precision(wc.dtype)
        nbp = triton.next_power_of_2(nblocks)
        tile3d = ctx.mode == "tiles"
        dx = dw = None
        if ctx.needs_input_grad[0]:
            b = _fit(blocks, k, m)
            if tile3d:  # dy is read as (rows, j, block) tiles: fewer j per tile
                b["BLOCK_K"] = max(16, min(b["BLOCK_K"], 128 // nbp))
            dx = torch.empty(nrows, nblocks * k, device=dy.device, dtype=wc.dtype)
            grid = (triton.cdiv(nrows, b["BLOCK_R"]), nblocks * triton.cdiv(k, b["BLOCK_N"]))
            _bd_dx_kernel[grid](dy2, wc, dx, nrows, nblocks, m, k, dy2.stride(0), dx.stride(0), *wc.stride(),
                                SHUFFLE=shuffle, PREC=prec, NBP=nbp, TILE3D=tile3d, **b, **opts)
            dx = dx.reshape(*ctx.lead, nblocks * k).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            bm = min(blocks["BLOCK_N"], next_pow2(m))
            if tile3d:
                bm = max(16, min(bm, 256 // nbp))
            bn = min(blocks["BLOCK_N"], next_pow2(k))
            br = blocks["BLOCK_K"]
            tiles = nblocks * triton.cdiv(m, bm) * triton.cdiv(k, bn)
            splits = max(1, min(triton.cdiv(nrows, 8 * br), 2 * num_programs_hint(x2) // tiles))
            rows_per_split = triton.cdiv(triton.cdiv(nrows, splits), br) * br
            splits = triton.cdiv(nrows, rows_per_split)
            part = torch.empty(splits, nblocks, m, k, device=dy.device, dtype=torch.float32)
            _bd_dw_kernel[(tiles, splits)](dy2, x2, part, nrows, nblocks, m, k, dy2.stride(0), x2.stride(0),
                                           rows_per_split, SHUFFLE=shuffle, PREC=prec, NBP=nbp, TILE3D=tile3d,
                                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, **opts)
            dw = (part[0] if splits == 1 else part.sum(0)).to(ctx.dtypes[1])
        return dx, dw, None


def blockdiag_matmul_triton(x, w, shuffle=False):
    return BlockDiagMatmul.apply(x, w, shuffle)
