"""PyTorch reference for the SSD (Mamba2 state-space dual) scan.

Shapes follow mamba_ssm's ``mamba_chunk_scan_combined``:
x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n) with h % g == 0,
D (h,) or (h, p), z (b, l, h, p), states (b, h, p, n).

dt is prepared once per token, the same way on every path (this reference, the Triton
scan and step, mamba_ssm's kernels): dt = clamp(softplus(dt + dt_bias), *dt_limit).
dt_limit = (0, inf), mamba_ssm's default, clamps nothing; a clamped dt passes no gradient.

seq_idx (b, l), int, non-decreasing along l (mamba_ssm's argument): the document of each
token of a packed row. No state crosses a change of seq_idx: the state decays to zero there,
as if each document ran alone (initial_states belongs to document 0, and the final state is
the last document's). As mamba_ssm's kernels apply it: the intra-chunk matrix is masked where
two tokens' documents differ, a chunk's state counts the tokens of its last token's document,
a state passes from one chunk end to a later one only within one document, and a token reads
the state entering its chunk only when it continues the document of the chunk before.

The chunked algorithm is the one of the Mamba2 paper (ssd_minimal): quadratic
attention-like form inside each chunk, a linear recurrence over chunk states
between chunks. Every exponent is of a non-positive number (A < 0, dt > 0), so
nothing overflows. Accumulation and states are in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_DT_LIMIT = (0.0, math.inf)


def acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: fp32 for half inputs, the input's own for fp32 / fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def clamps_dt(dt_limit) -> bool:
    """Whether dt_limit = (low, high) limits anything: (0, inf) leaves every dt as it is."""
    return tuple(dt_limit) != NO_DT_LIMIT


def prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
               dt_limit=NO_DT_LIMIT) -> torch.Tensor:
    dt = acc(dt)
    if dt_bias is not None:
        dt = dt + acc(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(*dt_limit) if clamps_dt(dt_limit) else dt


def expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): each group serves h // g consecutive heads."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above the diagonal.

    Built from masked cumulative sums, not differences of one cumsum, so that it
    stays exact where the total is large.
    """
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    on_or_below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~on_or_below, float("-inf"))


def apply_skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + acc(x) * (acc(D)[..., None] if D.dim() == 1 else acc(D))
    if z is not None:
        y = y * F.silu(acc(z))
    return y


def ssd_chunked_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                    initial_states=None, return_final_states=False, dt_limit=NO_DT_LIMIT, seq_idx=None):
    bsz, seqlen, nheads, headdim = x.shape
    out_dtype = x.dtype
    dt = prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    pad = (-seqlen) % chunk_size
    # Padding with dt = 0 adds nothing to the state and decays nothing.
    xp = F.pad(acc(x), (0, 0, 0, 0, 0, pad))
    dtp = F.pad(dt, (0, 0, 0, pad))
    Bh = F.pad(expand_groups(acc(B), nheads), (0, 0, 0, 0, 0, pad))
    Ch = F.pad(expand_groups(acc(C), nheads), (0, 0, 0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size

    def chunks(t):
        return t.reshape(bsz, nchunks, chunk_size, *t.shape[2:])

    X, Bc, Cc = chunks(xp * dtp[..., None]), chunks(Bh), chunks(Ch)
    A_dt = chunks(dtp * acc(A)).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cum = torch.cumsum(A_dt, dim=-1)

    # Within chunks: y_i = sum_{j<=i} C_i.B_j exp(sum A_dt(j, i]) X_j
    L = torch.exp(segsum(A_dt))  # (b, h, c, l, s)
    if seq_idx is not None:
        # Padding tokens (dt = 0) join the last document.
        doc = chunks(torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1))  # (b, c, l)
        last = doc[..., -1]  # (b, c): the document of each chunk's last token
        entering = F.pad(last[:, :-1], (1, 0))  # the document of the state entering each chunk (0: initial)
        L = torch.where((doc[..., :, None] == doc[..., None, :])[:, None], L, 0.0)
    CB = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", CB * L, X)

    # State at the end of each chunk, from that chunk's inputs alone.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (b, h, c, l)
    if seq_idx is not None:
        decay_to_end = torch.where((doc == last[..., None])[:, None], decay_to_end, 0.0)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)

    # Pass states across chunks.
    if initial_states is None:
        initial_states = torch.zeros(bsz, nheads, headdim, Bh.shape[-1], dtype=xp.dtype, device=x.device)
    states = torch.cat([acc(initial_states)[:, None], states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    if seq_idx is not None:
        ends = F.pad(last, (1, 0))  # the document of each state: initial, then each chunk's end
        chunk_decay = torch.where((ends[:, :, None] == ends[:, None, :])[:, None], chunk_decay, 0.0)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_states = states[:, :-1], states[:, -1]

    # Contribution of the state entering each chunk.
    decay_from_start = torch.exp(A_cum)  # (b, h, c, l)
    if seq_idx is not None:
        decay_from_start = torch.where((doc == entering[..., None])[:, None], decay_from_start, 0.0)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, decay_from_start)
    y = (y_diag + y_off).reshape(bsz, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    y = apply_skip_and_gate(y, x, D, z).to(out_dtype)
    return (y, final_states) if return_final_states else y


def ssd_step_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """One token of the recurrence. state (b, h, p, n) fp32, x (b, h, p), dt (b, h), B, C (b, g, n).

    Returns (y (b, h, p), new_state); the caller's state is not modified.
    """
    nheads = x.shape[1]
    dt = prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh, Ch = expand_groups(acc(B), nheads), expand_groups(acc(C), nheads)
    decay = torch.exp(dt * acc(A))[..., None, None]
    new_state = acc(state) * decay + (dt[..., None] * acc(x))[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    y = apply_skip_and_gate(y, x, D, z).to(x.dtype)
    return y, new_state


def ssd_recurrent_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None,
                      dt_limit=NO_DT_LIMIT):
    """The token-by-token recurrence over a whole sequence: the ground truth for tests."""
    bsz, seqlen, nheads, headdim = x.shape
    state = initial_states
    if state is None:
        state = torch.zeros(bsz, nheads, headdim, B.shape[-1], dtype=acc(x).dtype, device=x.device)
    ys = []
    for t in range(seqlen):
        y, state = ssd_step_ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t],
                                D, None if z is None else z[:, t], dt_bias, dt_softplus, dt_limit)
        ys.append(y)
    return torch.stack(ys, dim=1), state
