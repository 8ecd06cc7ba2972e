"""One decoding step of the SSD recurrence (forward only: decoding needs no gradient).

    state' = exp(dt A) state + dt x B^T,   y = state' C + D x,   y *= silu(z)

with dt = clamp(softplus(dt + dt_bias), *dt_limit), as every SSD path prepares it.

state (b, h, p, n) fp32, x (b, h, p), dt (b, h), B and C (b, g, n). A new state
tensor is returned; the caller's state is not modified (as in the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.ssd.reference import NO_DT_LIMIT, clamps_dt
from strata.kernels.triton_utils import next_pow2, silu, softplus


@triton.jit
def _step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, new_ptr, y_ptr,
    nheads, headdim, dstate, heads_per_group,
    s_s_b, s_s_h, s_s_p, s_s_n,
    s_x_b, s_x_h, s_x_p, s_dt_b, s_dt_h, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n,
    s_z_b, s_z_h, s_z_p, dt_min, dt_max,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p, pid_bh = tl.program_id(0), tl.program_id(1)
    pid_b, pid_h = pid_bh // nheads, pid_bh % nheads
    pid_g = pid_h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < headdim, offs_n < dstate
    mask = mask_p[:, None] & mask_n[None, :]
    state = tl.load(state_ptr + pid_b * s_s_b + pid_h * s_s_h + offs_p[:, None] * s_s_p + offs_n[None, :] * s_s_n,
                    mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_x_b + pid_h * s_x_h + offs_p * s_x_p, mask=mask_p, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + pid_h * s_dt_h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + pid_h).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    B = tl.load(B_ptr + pid_b * s_B_b + pid_g * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + pid_b * s_C_b + pid_g * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0).to(tl.float32)
    state = state * tl.exp(dt * A) + (dt * x)[:, None] * B[None, :]
    tl.store(new_ptr + ((pid_b * nheads + pid_h) * headdim + offs_p[:, None]) * dstate + offs_n[None, :],
             state, mask=mask)
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        if D_PER_P:
            y += x * tl.load(D_ptr + pid_h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + pid_h).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + pid_h * s_z_h + offs_p * s_z_p, mask=mask_p, other=0.0).to(tl.float32)
        y = y * silu(z)
    tl.store(y_ptr + (pid_b * nheads + pid_h) * headdim + offs_p, y, mask=mask_p)


def ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    bsz, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    new_state = torch.empty(bsz, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    y = torch.empty(bsz, nheads, headdim, device=x.device, dtype=x.dtype)
    block_n = next_pow2(dstate)
    block_p = min(next_pow2(headdim), max(16, 8192 // block_n))
    zz = z if z is not None else x
    Dc = D.contiguous() if D is not None else A
    _step_kernel[(triton.cdiv(headdim, block_p), bsz * nheads)](
        state, x, dt, A, B, C, Dc, zz, dt_bias if dt_bias is not None else A, new_state, y,
        nheads, headdim, dstate, nheads // ngroups,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zz.stride(),
        float(dt_limit[0]), float(dt_limit[1]),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=clamps_dt(dt_limit),
        BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return y, new_state
