"""The SSD chunked scan for CPU: the reference's algorithm (kernels/ssd/reference.py) as one
autograd Function with a hand-written backward, in a few large ops.

What makes it leaner than the reference under autograd, at the same arithmetic:
- C B^T once per group, not once per head (the reference expands B and C to every head first);
- the decay matrix exp(segsum) from differences of the chunk's cumulative sums (as the Triton
  kernel and mamba_ssm's do), not from a masked cumulative sum over a (T, T) expansion; in fp32
  it meets the Triton scan's tolerances against the reference in fp64, and in fp64 it equals the
  reference to rounding (tests/kernels/test_cpu.py);
- the state passed between chunks by a loop over chunks (c steps of (b, h, p, n)), not a
  (c + 1) x (c + 1) decay matrix;
- the backward is written out: per layer one (T, T) product each for dM, dX, dG, and no
  autograd bookkeeping for the twenty-odd ops of the forward.

The decay matrix L and M = L * C B^T, (b, c, h, T, T) each, are kept for the backward (the
reference's autograd keeps three such). dt arrives prepared (softplus, bias and clamp stay in
autograd: ops.ssd_chunked); the gate z too is applied outside. Accumulation is in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _above_diagonal(t: int, device: torch.device) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).triu(diagonal=1)


def _chunked(t: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """(b, l, ...) -> (b, c, T, ...), zero-padded at the end to whole chunks."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def _unchunked(t: torch.Tensor, length: int) -> torch.Tensor:
    """(b, c, T, ...) -> (b, length, ...)."""
    return t.reshape(t.shape[0], -1, *t.shape[3:])[:, :length]


class SSDChunkedCPU(torch.autograd.Function):
    """x (b, l, h, p), dt (b, l, h) prepared, A (h,), B and C (b, l, g, n), D (h,), (h, p) or None,
    initial_states (b, h, p, n) or None. Returns y (b, l, h, p) and the final state (b, h, p, n).

    Two layouts: per head (b, c, h, T, .) for the (T, T) products inside chunks, and the input's
    own (b, c, T, h, p), seen per group as (b, c, g, T, r * p), for the products with the states,
    which then run as one matrix product per chunk over all heads of a group (no copy for g = 1)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, chunk_size):
        b, l, h, p = x.shape
        g, n = B.shape[-2:]
        f = torch.promote_types(x.dtype, torch.float32)
        T, pad = chunk_size, (-l) % chunk_size
        c = (l + pad) // T
        xc = _chunked(x.to(f), pad, T)  # (b, c, T, h, p)
        dtc = _chunked(dt.to(f), pad, T)  # (b, c, T, h); padding dt = 0 adds and decays nothing
        Bg = _per_group(_chunked(B.to(f), pad, T))  # (b, c, g, T, n)
        Cg = _per_group(_chunked(C.to(f), pad, T))
        X = xc * dtc[..., None]  # (b, c, T, h, p)
        Acum = torch.cumsum(dtc.transpose(-1, -2) * A.to(f)[:, None], dim=-1)  # (b, c, h, T)

        # Within chunks: y_i = sum_{j<=i} (C_i . B_j) exp(Acum_i - Acum_j) X_j, per head.
        L = Acum[..., :, None] - Acum[..., None, :]
        L.masked_fill_(_above_diagonal(T, x.device), float("-inf")).exp_()  # (b, c, h, T, T)
        G = Cg @ Bg.transpose(-1, -2)  # (b, c, g, T, T)
        M = _times_group(L, G)
        y = (M @ X.transpose(2, 3)).transpose(2, 3)  # (b, c, T, h, p)

        # Each chunk's own state, then the state entering each chunk (a loop over chunks).
        w_end = torch.exp(Acum[..., -1:] - Acum).transpose(-1, -2)[..., None]  # (b, c, T, h, 1)
        S = _per_group(X * w_end, g).transpose(-1, -2) @ Bg  # (b, c, g, r * p, n)
        decay = torch.exp(Acum[..., -1])  # (b, c, h)
        H = torch.empty(b, c + 1, h, p, n, dtype=f, device=x.device)
        H[:, 0] = 0 if initial_states is None else initial_states.to(f)
        for k in range(c):
            torch.addcmul(S[:, k].view(b, h, p, n), H[:, k], decay[:, k, :, None, None], out=H[:, k + 1])

        # The state entering each chunk, read out by C and decayed to each position.
        eA = torch.exp(Acum).transpose(-1, -2)[..., None]  # (b, c, T, h, 1)
        y.addcmul_(_states_read_out(Cg, H, h, p), eA)
        if D is not None:
            y.addcmul_(xc, D.to(f) if D.dim() == 2 else D.to(f)[:, None])
        ctx.save_for_backward(x, dt, A, Bg, Cg, D, Acum, L, M, G, H, initial_states)
        ctx.chunk_size = chunk_size
        return _unchunked(y, l).to(x.dtype), H[:, c].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, Bg, Cg, D, Acum, L, M, G, H, initial_states = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n = Bg.shape[2], Bg.shape[-1]
        f = Acum.dtype
        T = ctx.chunk_size
        pad = (-l) % T
        c = Acum.shape[1]
        dyc = _chunked(dy.to(f), pad, T)  # (b, c, T, h, p)
        xc = _chunked(x.to(f), pad, T)
        dtc = _chunked(dt.to(f), pad, T)
        X = xc * dtc[..., None]

        # y_off = eA * (C . H): the states' gradient from the outputs, dC, and dAcum through eA.
        eA = torch.exp(Acum).transpose(-1, -2)[..., None]  # (b, c, T, h, 1)
        dyA = _per_group(dyc * eA, g)  # (b, c, g, T, r * p)
        Hg = H[:, :c].reshape(b, c, g, -1, n)  # (b, c, g, r * p, n)
        dH = dyA.transpose(-1, -2) @ Cg  # (b, c, g, r * p, n)
        dC = dyA @ Hg  # (b, c, g, T, n)
        dAcum = (dyc * _states_read_out(Cg, H, h, p)).sum(-1).transpose(-1, -2) * eA[..., 0].transpose(-1, -2)

        # y_diag = M @ X per head, M = G * L.
        dyh = dyc.transpose(2, 3)  # (b, c, h, T, p)
        dM = dyh @ X.transpose(2, 3).transpose(-1, -2)  # (b, c, h, T, T)
        dX = (M.transpose(-1, -2) @ dyh).transpose(2, 3)  # (b, c, T, h, p)
        dG = _sum_group(dM * L, g)  # (b, c, g, T, T)
        dS = dM.mul_(M)  # d segsum (zero above the diagonal, where M is)
        dAcum += dS.sum(-1) - dS.sum(-2)
        dC += dG @ Bg
        dB = dG.transpose(-1, -2) @ Cg

        # The states between chunks, walked backwards: H[k + 1] = decay[k] H[k] + S[k].
        decay = torch.exp(Acum[..., -1])  # (b, c, h)
        dH = dH.view(b, c, h, p, n)
        dS_state = torch.empty(b, c, h, p, n, dtype=f, device=x.device)
        d_next = torch.zeros(b, h, p, n, dtype=f, device=x.device) if dfinal is None else dfinal.to(f)
        d_decay = torch.empty(b, c, h, dtype=f, device=x.device)
        for k in reversed(range(c)):
            dS_state[:, k] = d_next
            d_decay[:, k] = (d_next * H[:, k]).sum((-1, -2))
            d_next = torch.addcmul(dH[:, k], d_next, decay[:, k, :, None, None])
        d_initial = d_next if initial_states is not None else None
        dAcum[..., -1] += d_decay * decay

        # S[k] = sum_j w_end_j X_j (x) B_j
        w_end = torch.exp(Acum[..., -1:] - Acum).transpose(-1, -2)[..., None]  # (b, c, T, h, 1)
        dSg = dS_state.view(b, c, g, -1, n)
        dXw = (Bg @ dSg.transpose(-1, -2)).view(b, c, g, T, h // g, p).permute(0, 1, 3, 2, 4, 5).reshape(
            b, c, T, h, p)
        dB += _per_group(X * w_end, g) @ dSg
        dw = (dXw * X).sum(-1, keepdim=True) * w_end  # (b, c, T, h, 1)
        dX.addcmul_(dXw, w_end)
        dw = dw[..., 0].transpose(-1, -2)  # (b, c, h, T)
        dAcum -= dw
        dAcum[..., -1] += dw.sum(-1)

        # Acum = cumsum(dt * A); X = x * dt
        da = dAcum + dAcum.sum(-1, keepdim=True) - torch.cumsum(dAcum, dim=-1)  # reverse cumsum
        dA = (da * dtc.transpose(-1, -2)).sum((0, 1, 3)).to(A.dtype)
        ddt = (dX * xc).sum(-1) + (da * A.to(f)[:, None]).transpose(-1, -2)
        dx = dX.mul_(dtc[..., None])
        dD = None
        if D is not None:
            dx.addcmul_(dyc, D.to(f) if D.dim() == 2 else D.to(f)[:, None])
            dD = (dyc * xc).sum((0, 1, 2))
            dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
        dB = _unchunked(dB.transpose(2, 3), l).to(x.dtype)
        dC = _unchunked(dC.transpose(2, 3), l).to(x.dtype)
        return (_unchunked(dx, l).to(x.dtype), _unchunked(ddt, l).to(dt.dtype), dA, dB, dC, dD,
                None if d_initial is None else d_initial.to(initial_states.dtype), None)


def _per_group(t: torch.Tensor, g: int | None = None) -> torch.Tensor:
    """(b, c, T, g, n) -> (b, c, g, T, n); with g given, (b, c, T, h, p) -> (b, c, g, T, r * p).
    A view when g = 1; matmul copies it where it must."""
    if g is not None:
        t = t.reshape(*t.shape[:3], g, -1)
    return t.transpose(2, 3)


def _times_group(L: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """L (b, c, h, T, T) times G (b, c, g, T, T), each group's G over its h // g heads."""
    b, c, h, T, _ = L.shape
    g = G.shape[2]
    return (L.view(b, c, g, h // g, T, T) * G[:, :, :, None]).view(b, c, h, T, T)


def _sum_group(t: torch.Tensor, g: int) -> torch.Tensor:
    b, c, h, T, _ = t.shape
    return t.view(b, c, g, h // g, T, T).sum(3)


def _states_read_out(Cg: torch.Tensor, H: torch.Tensor, h: int, p: int) -> torch.Tensor:
    """C_i . H for the state H entering each chunk: (b, c, T, h, p)."""
    b, c, g, T, n = Cg.shape
    out = Cg @ H[:, :c].reshape(b, c, g, -1, n).transpose(-1, -2)  # (b, c, g, T, r * p)
    return out.transpose(2, 3).reshape(b, c, T, h, p)


def ssd_chunked_cpu(x, dt, A, B, C, chunk_size, D=None, z=None, initial_states=None, return_final_states=False):
    """dt prepared (ops.ssd_chunked does it, under autograd). Same results as ssd_chunked_ref."""
    y, final = SSDChunkedCPU.apply(x, dt, A, B, C, D, initial_states, chunk_size)
    if z is not None:
        y = (y.to(torch.promote_types(y.dtype, torch.float32)) * F.silu(z.to(torch.promote_types(z.dtype,
                                                                                          torch.float32)))).to(x.dtype)
    return (y, final) if return_final_states else y
