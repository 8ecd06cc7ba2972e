"""The Mamba2 mixer (SSD), as in the Mamba2 paper and mamba_ssm's Mamba2 module.

in_proj -> (z, xBC, dt); causal depthwise conv + SiLU on xBC; SSD scan with
A = -exp(A_log), dt = softplus(dt + dt_bias) and the D skip; gated grouped RMSNorm
with z; out_proj. Training and prompts use the chunked scan; decoding one token
uses the recurrence, with the conv and SSM states kept in a `MambaCache`. Any number of
tokens continues from a cache (the scan starts from its state), and every path clamps dt
to cfg.dt_limit the same way.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from strata.kernels import ops
from strata.model.config import MambaConfig
from strata.model.linear import WHOLE, Projections
from strata.model.norm import RMSNorm
from strata.model.recompute import checkpoint_if


@dataclass
class MambaCache:
    conv_state: torch.Tensor
    """(b, conv_dim, d_conv): the last d_conv inputs of the conv."""
    ssm_state: torch.Tensor
    """(b, nheads, headdim, d_state), fp32."""


class Mamba2Mixer(nn.Module):
    recompute_core = False
    """Recompute `core` in the backward (selective recompute; model/recompute.py)."""

    def __init__(self, cfg: MambaConfig, d_model: int, norm_eps: float = 1e-5, projections: Projections = WHOLE):
        """`projections.ranks` > 1 builds one rank's share: its heads and groups, with in_proj split
        by outputs and out_proj by inputs (parallel/tensor/blocks.py)."""
        super().__init__()
        ranks = projections.ranks
        self.cfg = dataclasses.replace(cfg, ngroups=cfg.ngroups // ranks) if ranks > 1 else cfg
        self.d_inner, self.nheads = cfg.d_inner(d_model) // ranks, cfg.nheads(d_model) // ranks
        self.bc_dim = self.cfg.bc_dim()
        self.conv_dim = self.d_inner + 2 * self.bc_dim
        self.in_proj = projections.column(d_model, cfg.in_proj_dim(d_model), cfg.proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(self.d_inner, norm_eps, group_size=cfg.d_inner(d_model) // cfg.ngroups)
        self.out_proj = projections.row(cfg.d_inner(d_model), d_model, cfg.proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]; A uniform in [A_init_min, A_init_max]."""
        c = self.cfg
        dt = torch.exp(torch.rand(self.nheads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(c.A_init_min, c.A_init_max)))
        self.D.fill_(1.0)

    @property
    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight[:, 0, :]

    @property
    def dt_limit(self) -> tuple[float, float]:
        """(low, high) that every path (chunked scan, recurrence, Triton) clamps dt to."""
        return tuple(self.cfg.dt_limit)

    def conv(self, xbc_in: torch.Tensor, cache: MambaCache | None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Causal conv + SiLU over xbc_in (b, l, conv_dim). With a cache, the tokens continue the
        cached ones: the conv reads the cache's last inputs before them, and the cache keeps the
        last d_conv inputs after them (a fresh cache holds zeros: the conv's own padding).
        seq_idx (b, l): each token's document; the conv reads inputs of its own document only
        (the cached inputs belong to document 0, and the cache keeps the last document's)."""
        if cache is None:
            return ops.causal_conv1d(xbc_in, self.conv_weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx)
        width = self.cfg.d_conv
        seen = torch.cat([cache.conv_state[..., 1:].transpose(1, 2).to(xbc_in.dtype), xbc_in], dim=1)
        if seq_idx is not None:
            seq_idx = torch.nn.functional.pad(seq_idx, (width - 1, 0))
            last_document = (seq_idx == seq_idx[:, -1:])[..., None]
            cache.conv_state.copy_(ops.conv_state(seen * last_document, width))
        else:
            cache.conv_state.copy_(ops.conv_state(seen, width))
        return ops.causal_conv1d(seen, self.conv_weight, self.conv1d.bias, activation="silu",
                                 seq_idx=seq_idx)[:, width - 1:]

    def split_projection(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def split_xbc(self, xbc: torch.Tensor):
        x, B, C = torch.split(xbc, [self.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.nheads, self.cfg.headdim),
                B.reshape(*lead, self.cfg.ngroups, self.cfg.d_state),
                C.reshape(*lead, self.cfg.ngroups, self.cfg.d_state))

    def forward(self, u: torch.Tensor, position_ids: torch.Tensor | None = None, cache: MambaCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """u (b, l, d_model); position_ids are not read (every mixer takes the same arguments). With a cache, u continues the cached tokens: l == 1 steps the recurrence,
        l > 1 runs the chunked scan from the cached conv inputs and SSM state (a prompt, or a piece
        of one: chunked prefill), and the cache is left holding the state after u. seq_idx (b, l):
        the document of each token of packed rows (model/hybrid.py: document_index); no conv input
        and no SSM state crosses from one document to the next."""
        if cache is not None and u.shape[1] == 1:
            return self.step(u, cache)
        zxbcdt = self.in_proj(u)
        return self.out_proj(checkpoint_if(self.recompute_core and cache is None, self.core, zxbcdt, cache, seq_idx))

    def core(self, zxbcdt: torch.Tensor, cache: MambaCache | None = None,
             seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Between in_proj and out_proj: causal conv + SiLU, SSD scan, gated norm; (b, l, d_inner).
        Memory-heavy and FLOP-light: selective recompute redoes it in the backward."""
        z, xbc_in, dt = self.split_projection(zxbcdt)
        xbc = self.conv(xbc_in, cache, seq_idx)
        x, B, C = self.split_xbc(xbc)
        y = self.scan(x, dt, B, C, cache, seq_idx)
        y = y.reshape(*y.shape[:2], self.d_inner)
        return self.norm(y, z)

    def scan(self, x, dt, B, C, cache: MambaCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The SSD scan over the sequence, continuing the cache's state (and leaving it the state after)."""
        if cache is None:
            return self.ssd(x, dt, B, C, seq_idx=seq_idx)
        y, final_state = self.ssd(x, dt, B, C, initial_states=cache.ssm_state, return_final_states=True,
                                  seq_idx=seq_idx)
        cache.ssm_state.copy_(final_state)
        return y

    def ssd(self, x, dt, B, C, initial_states=None, return_final_states=False, seq_idx=None):
        """The one call of the SSD op with this mixer's A, D, dt_bias and dt_limit (kernels/ops.py's
        ssd_chunked: y, and the final state when asked)."""
        return ops.ssd_chunked(x, dt, self.decay_rate(), B, C, self.cfg.chunk_size, D=self.D, dt_bias=self.dt_bias,
                               dt_softplus=True, initial_states=initial_states,
                               return_final_states=return_final_states, dt_limit=self.dt_limit, seq_idx=seq_idx)

    def decay_rate(self) -> torch.Tensor:
        """A = -exp(A_log) per head, in fp32 at least: the state decays by exp(dt * A) per token."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def step(self, u: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        z, xbc_in, dt = self.split_projection(self.in_proj(u[:, 0]))
        xbc, cache.conv_state = ops.causal_conv1d_step(xbc_in, cache.conv_state, self.conv_weight,
                                                       self.conv1d.bias, activation="silu")
        x, B, C = self.split_xbc(xbc)
        y, cache.ssm_state = ops.ssd_step(cache.ssm_state, x, dt, self.decay_rate(), B, C, D=self.D,
                                          dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        y = y.reshape(y.shape[0], 1, self.d_inner)
        return self.out_proj(self.norm(y, z[:, None]))

    def allocate_cache(self, batch_size: int, max_len: int = 0, device=None, dtype=None) -> MambaCache:
        """The conv inputs and SSM state: their size does not grow with max_len."""
        c = self.cfg
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.conv_dim, c.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, c.headdim, c.d_state, device=device,
                                  dtype=torch.promote_types(dtype or torch.float32, torch.float32)),
        )
