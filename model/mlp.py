"""The MLP block: SwiGLU (gate, up, down) or squared ReLU (up, down, as NemotronH).

Its linears are dense or structured (model/structured.py), chosen by `make_linear`."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.config import MLP_BLOCK, MLPConfig, ModelConfig, StructuredSizes
from strata.model.linear import WHOLE, Linear, Projections
from strata.model.recompute import checkpoint_if
from strata.model.structured import BlockDense, BlockShuffle, LowRank


def make_linear(in_features: int, out_features: int, cfg: MLPConfig, layer_idx: int,
                sizes: StructuredSizes | None = None) -> nn.Module:
    """The one place that decides how an MLP linear is built (dense or structured).
    `sizes` (from cfg.structured_sizes) selects a structured linear; None builds a dense one."""
    if sizes is None or sizes.structure == "dense":
        return Linear(in_features, out_features, bias=cfg.bias)
    if sizes.structure == "lowrank":
        linear = LowRank(in_features, out_features, sizes.rank, cfg.bias, layer_idx)
    elif sizes.structure == "blockdense":
        linear = BlockDense(in_features, out_features, sizes.rank, sizes.nblocks, cfg.bias, layer_idx)
    else:
        linear = BlockShuffle(in_features, out_features, sizes.nblocks, cfg.bias, layer_idx)
    if cfg.self_guided:
        linear.add_guide()
    return linear


def describe_structure(cfg: ModelConfig) -> str | None:
    """The derived sizes as one log line; None for dense MLPs."""
    mlp = cfg.mlp
    if mlp.structure == "dense" or not cfg.has(MLP_BLOCK):
        return None
    sizes = mlp.structured_sizes(cfg.d_model)
    size = {"lowrank": f"rank={sizes.rank}", "blockdense": f"rank={sizes.rank} nblocks={sizes.nblocks}",
            "blockshuffle": f"nblocks={sizes.nblocks}"}[sizes.structure]
    extras = ["first MLP dense"] if mlp.dense_first_layer else []
    if mlp.self_guided:
        extras.append(f"self-guided until {mlp.guide_ratio:g} of the steps ({mlp.guide_schedule}"
                      f"{', stochastic' if mlp.guide_stochastic else ''})")
    return (f"structured MLP: {sizes.structure} {size}, {100 * sizes.fraction:.1f}% of the dense MLP's "
            f"parameters (d_model={cfg.d_model}, d_ff={mlp.resolved_d_ff(cfg.d_model)})"
            + "".join(f"; {e}" for e in extras))


class MLP(nn.Module):
    recompute_core = False
    """Recompute `core` (the activation) in the backward (selective recompute; model/recompute.py)."""

    def __init__(self, cfg: MLPConfig, d_model: int, layer_idx: int = 0, dense: bool = False,
                 projections: Projections = WHOLE):
        """`dense`: this block's linears are dense whatever mlp.structure (BlockSpec.dense_mlp).
        `projections.ranks` > 1 builds one rank's share: up and gate split by outputs, down by inputs."""
        super().__init__()
        self.activation = cfg.activation
        d_ff = cfg.resolved_d_ff(d_model)
        sizes = None if dense or cfg.structure == "dense" else cfg.structured_sizes(d_model)
        if self.activation == "swiglu":
            self.gate_proj = projections.column_of(partial(make_linear, d_model, d_ff, cfg, layer_idx, sizes))
        self.up_proj = projections.column_of(partial(make_linear, d_model, d_ff, cfg, layer_idx, sizes))
        self.down_proj = projections.row_of(partial(make_linear, d_ff, d_model, cfg, layer_idx, sizes))

    def forward(self, x: torch.Tensor, position_ids=None, cache=None, seq_idx=None) -> torch.Tensor:
        """x (b, l, d_model); position_ids, cache and seq_idx are not read (every mixer takes the
        same arguments: an MLP mixes no tokens)."""
        gate = self.gate_proj(x) if self.activation == "swiglu" else None
        return checkpoint_if(self.recompute_core, self.core, self.up_proj(x), gate, into=self.down_proj)

    def core(self, up: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """The activation: silu(gate) * up (swiglu) or relu(up)^2 (relu2). Selective recompute
        keeps only up (and gate) and redoes it, its output included, in the backward."""
        if self.activation == "swiglu":
            return F.silu(gate) * up
        return torch.square(F.relu(up))

    def allocate_cache(self, batch_size: int, max_len: int = 0, device=None, dtype=None) -> None:
        """An MLP keeps no state between tokens."""
        return None
