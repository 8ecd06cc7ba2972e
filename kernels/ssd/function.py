"""The SSD chunked scan as an autograd Function whose forward and backward are Triton.

Forward (5 launches): cumsum of dt * A -> chunk states + state passing (fused) ->
C B^T -> chunk scan. Saved for backward: the inputs, the prepared dt and the cumsum
(b, h, l fp32 each) and, with z, y before the gate; the chunk states and C B^T are
recomputed in the backward rather than held (they would cost 4 * h * p * n bytes
per chunk per layer).

Backward (up to 8 launches): gate -> recompute states, C B^T -> reverse state walk
(dS, d initial state) -> dx (+ ddt, dD) -> dCB -> dB, dC -> cumsum backward (ddt,
dA, ddt_bias).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.ssd.cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from strata.kernels.ssd.documents import as_documents
from strata.kernels.ssd.reference import NO_DT_LIMIT
from strata.kernels.ssd.scan import bmm_fwd, scan_fwd
from strata.kernels.ssd.scan_bwd import dbc_bwd, dcb_bwd, dx_bwd
from strata.kernels.ssd.state import state_bwd, state_fwd
from strata.kernels.triton_utils import contiguous_last, silu, silu_grad


@triton.jit
def _gate_bwd_kernel(dout_ptr, y_ptr, z_ptr, dy_ptr, dz_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dy_ptr + offs, g * silu(z), mask=mask)
    tl.store(dz_ptr + offs, g * y * silu_grad(z), mask=mask)


def _gate_bwd(dout, y, z, dy_dtype):
    dout, z = dout.contiguous(), z.contiguous()
    dy = torch.empty(z.shape, device=z.device, dtype=dy_dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    n = z.numel()
    block = 1024
    _gate_bwd_kernel[(triton.cdiv(n, block),)](dout, y, z, dy, dz, n, BLOCK=block)
    return dy, dz


class SSDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states, return_final_states,
                dt_limit, seq_idx):
        B_dtype, C_dtype = B.dtype, C.dtype
        x, dt, z = contiguous_last(x), contiguous_last(dt), contiguous_last(z)
        B, C = contiguous_last(B.to(x.dtype)), contiguous_last(C.to(x.dtype))
        D = D.contiguous() if D is not None else None
        dt_proc, dA_cs = chunk_cumsum_fwd(dt, A, dt_bias, dt_softplus, chunk_size, dt_limit)
        seq_idx = as_documents(seq_idx)
        states, final = state_fwd(x, B, dt_proc, dA_cs, initial_states, seq_idx)
        CB = bmm_fwd(C, B, chunk_size)
        out, out_x = scan_fwd(x, C, CB, dt_proc, dA_cs, states, D, z, x.dtype, seq_idx)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_proc, dA_cs, out_x, seq_idx)
        ctx.dt_softplus, ctx.dt_limit, ctx.dtypes = dt_softplus, dt_limit, (B_dtype, C_dtype)
        if return_final_states:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, dt, A, B, C, D, z, dt_bias, init, dt_proc, dA_cs, out_x, seq_idx = ctx.saved_tensors
        ngroups = B.shape[2]
        if z is not None:
            dy, dz = _gate_bwd(dout, out_x, z, x.dtype)
        else:
            dy, dz = contiguous_last(dout.to(x.dtype)), None
        states, _ = state_fwd(x, B, dt_proc, dA_cs, init, seq_idx)
        CB = bmm_fwd(C, B, dA_cs.shape[-1])
        need_dinit = init is not None and ctx.needs_input_grad[10]
        dS, dinit, ddaL_pass = state_bwd(dy, C, dA_cs, states, dfinal, need_dinit, seq_idx)
        dx, ddt_direct, dD = dx_bwd(x, dy, D, B, CB, dt_proc, dA_cs, dS, seq_idx)
        dCB, da_intra = dcb_bwd(x, dy, CB, dt_proc, dA_cs, ngroups, seq_idx)
        dB, dC, da_state, daL_state = dbc_bwd(x, dy, B, C, dCB, dt_proc, dA_cs, states, dS, seq_idx)
        ddt, dA, ddt_bias = chunk_cumsum_bwd(dt, A, dt_bias, ctx.dt_softplus, dt_proc, ddt_direct,
                                             da_intra + da_state, ddaL_pass + daL_state, ctx.dt_limit)
        B_dtype, C_dtype = ctx.dtypes
        return (dx, ddt, dA.to(A.dtype), dB.to(B_dtype), dC.to(C_dtype), None,
                None if D is None else dD.to(D.dtype), dz,
                None if dt_bias is None else ddt_bias.to(dt_bias.dtype), None,
                None if dinit is None else dinit.to(init.dtype), None, None, None)


def ssd_chunked_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                       initial_states=None, return_final_states=False, dt_limit=NO_DT_LIMIT, seq_idx=None):
    """Same contract as kernels.ssd.reference.ssd_chunked_ref."""
    if x.shape[1] == 0:
        raise ValueError("ssd_chunked: empty sequence")
    return SSDChunked.apply(x, dt, A, B, C, int(chunk_size), D, z, dt_bias, bool(dt_softplus),
                            initial_states, bool(return_final_states), tuple(map(float, dt_limit)), seq_idx)
