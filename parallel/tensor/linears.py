"""Tensor-parallel linears: megatron-core's Column/RowParallelLinear for dense layers, and
the structured linears (model/structured.py), each with its own split.

Only shells are built here (shapes, no init); the weights are always copied in from the
full model by parallel/tensor/splits.py, which also documents each split. Column-side
linears produce this rank's share of the output features; row-side ones read this rank's
share of the input features and leave the region (all-reduce, or reduce-scatter under SP).

Structured splits (d model width, f MLP width, R inner rank, B blocks, m = min(d, f) / B):
  LowRank     column: V (R x d) replicated, region entered on its R outputs, U split on f.
              row:    V split on f, region left on its R outputs (the reduction carries R
                      values, not d), U (d x R) replicated.
  BlockDense  column: block-diagonal factor replicated, entered on R, U split on f.
              row:    blocks split (each rank's f slice feeds B/tp whole blocks), U split on R.
  BlockShuffle column: rows of every first-factor block split (they feed exactly this rank's
              second-factor blocks after the shuffle), second-factor blocks split.
              row:    first-factor blocks split; the second factor keeps the columns fed by
              this rank's blocks, a partial sum reduced like a dense row-parallel linear.
The self-guided dense path is split like a dense linear of the same side.

FP8 (train.fp8; parallel/engine/parallelize.py apply_fp8 sets `fp8_recipe`): every dense product
here goes through kernels.ops.linear with the TP group and how its operands are split (OUT, IN, or
TOKENS for a replicated factor applied to this rank's tokens under SP), so that its scales are the
ones one process computes for the whole tensors (kernels/fp8/scaled.py). The replicated k/v head
(ReplicatedHead) has no FP8: each rank computes a slice of the whole projection, whose one scale
it cannot know without the other heads' gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from strata.kernels import ops
from strata.kernels.fp8.scaled import IN, OUT, TOKENS
from strata.model.structured import BlockDense, BlockShuffle, LowRank, StructuredLinear
from strata.parallel.tensor.mappings import TPContext, reduce_gradient


def _no_init(weight: torch.Tensor) -> None:
    """Megatron's layers want an init method; ours come from the full model."""


class ColumnLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear reading an input that already entered the region
    (a block's column linears share one entry), returning the output alone."""

    fp8_recipe: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: TPContext,
                 shared_weight: bool = False):
        super().__init__(in_features, out_features, config=ctx.megatron_config(), init_method=_no_init,
                         bias=bias, gather_output=False, disable_grad_reduce=True,
                         skip_weight_param_allocation=shared_weight, tp_group=ctx.group)
        self.ctx = ctx

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.fp8_recipe is None:
            return super().forward(x, weight)[0]
        weight = self.weight if weight is None else weight
        return ops.linear(x, weight, self.bias, fp8=self.fp8_recipe, fp8_group=self.ctx.group, fp8_split=OUT)


class RowLinear(RowParallelLinear):
    """Megatron's RowParallelLinear; its output leaves the region. Under sequence
    parallelism the reduction is our reduce-scatter (megatron's allocates on CUDA)."""

    fp8_recipe: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: TPContext):
        super().__init__(in_features, out_features, config=ctx.megatron_config(), init_method=_no_init,
                         bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=ctx.group)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ctx.sequence_parallel and self.fp8_recipe is None:
            return super().forward(x)[0]
        partial = ops.linear(x, self.weight, fp8=self.fp8_recipe, fp8_group=self.ctx.group, fp8_split=IN)
        y = self.ctx.exit(partial)
        return y if self.bias is None else y + self.ctx.sequence_summed(self.bias)


class ReplicatedHead(nn.Module):
    """A k or v projection with fewer heads than TP ranks: every rank holds all of it (a
    replicated parameter) and computes the one head its query heads share. Backward sums
    the weight's gradient over the TP ranks (a copy_to region on the weight), so every
    head gets the gradient of all query heads that read it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, head_dim: int, head_index: int,
                 ctx: TPContext):
        super().__init__()
        self.ctx = ctx
        self.rows = slice(head_index * head_dim, (head_index + 1) * head_dim)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = reduce_gradient(self.weight, self.ctx.group)[self.rows]
        b = None if self.bias is None else reduce_gradient(self.bias, self.ctx.group)[self.rows]
        return F.linear(x, w, b)


class TPStructured(StructuredLinear):
    """A structured linear's TP form. Being a StructuredLinear, model/guidance.py drives
    its dense path (guide_alpha, guide_active, drop_guide) as it does the full model's."""

    def __init__(self, full: StructuredLinear, ctx: TPContext, in_features: int, out_features: int):
        super().__init__(in_features, out_features, full.bias is not None, full.layer_idx)
        self.ctx = ctx  # its self-guided state (a, draw) follows the original's: model.structured.carry_guidance
        if full.guide is not None:
            self.guide = nn.Parameter(torch.empty(out_features, in_features))

    def split_product(self, x: torch.Tensor, weight: torch.Tensor, split: str | None) -> torch.Tensor:
        """One dense product of this shard (StructuredLinear.product), its operands split over the TP
        group as `split` says (OUT, IN, TOKENS; None: replicated), so FP8 scales are the whole tensors'."""
        if self.fp8_recipe is None:
            return F.linear(x, weight)
        return ops.linear(x, weight, fp8=self.fp8_recipe, fp8_group=self.ctx.group, fp8_split=split)

    def sequence_split(self) -> str | None:
        """How a replicated factor's operands are split: by tokens under SP, not at all without."""
        return TOKENS if self.ctx.sequence_parallel else None


class ColumnStructured(TPStructured):
    """Column side: x is the activation outside the region; the split decides where it enters."""

    def __init__(self, full: StructuredLinear, ctx: TPContext):
        super().__init__(full, ctx, full.in_features, full.out_features // ctx.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.column_forward(x)
        if self.guided():
            a = self.guide_alpha
            y = a * self.split_product(self.ctx.enter(x), self.guide, OUT) + (1.0 - a) * y
        return y if self.bias is None else y + self.bias


class ColumnLowRank(ColumnStructured):
    def __init__(self, full: LowRank, ctx: TPContext):
        super().__init__(full, ctx)
        self.rank = full.rank
        self.V = nn.Parameter(torch.empty(full.rank, full.in_features))
        self.U = nn.Parameter(torch.empty(self.out_features, full.rank))

    def column_forward(self, x):
        r = self.split_product(x, self.ctx.sequence_summed(self.V), self.sequence_split())
        return self.split_product(self.ctx.enter(r), self.U, OUT)


class ColumnBlockDense(ColumnStructured):
    def __init__(self, full: BlockDense, ctx: TPContext):
        super().__init__(full, ctx)
        self.rank, self.nblocks = full.rank, full.nblocks
        self.blocks = nn.Parameter(torch.empty(full.blocks.shape))
        self.U = nn.Parameter(torch.empty(self.out_features, full.rank))

    def column_forward(self, x):
        r = ops.blockdiag_matmul(x, self.ctx.sequence_summed(self.blocks))
        return self.split_product(self.ctx.enter(r), self.U, OUT)


class ColumnBlockShuffle(ColumnStructured):
    def __init__(self, full: BlockShuffle, ctx: TPContext):
        super().__init__(full, ctx)
        self.nblocks = full.nblocks
        b, m, k = full.blocks1.shape
        self.blocks1 = nn.Parameter(torch.empty(b, m // ctx.size, k))
        b, m, k = full.blocks2.shape
        self.blocks2 = nn.Parameter(torch.empty(b // ctx.size, m, k))

    def column_forward(self, x):
        # The local shuffle of rows j in this rank's range is the global shuffled vector's
        # slice [rank*K/tp, (rank+1)*K/tp): the input of exactly this rank's blocks2.
        shuffled = ops.blockdiag_matmul(self.ctx.enter(x), self.blocks1, shuffle=True)
        return ops.blockdiag_matmul(shuffled, self.blocks2)


class RowStructured(TPStructured):
    """Row side: h holds this rank's input features; the output leaves the region."""

    def __init__(self, full: StructuredLinear, ctx: TPContext):
        super().__init__(full, ctx, full.in_features // ctx.size, full.out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        partial = self.row_partial(h)
        if self.guided():
            a = self.guide_alpha
            partial = a * self.split_product(h, self.guide, IN) + (1.0 - a) * partial
        return self.finish(self.ctx.exit(partial))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The replicated bias, added outside the region."""
        return y if self.bias is None else y + self.ctx.sequence_summed(self.bias)

    def row_partial(self, h):
        """This rank's partial sum of the d outputs."""
        raise NotImplementedError


class RowLowRank(RowStructured):
    def __init__(self, full: LowRank, ctx: TPContext):
        super().__init__(full, ctx)
        self.rank = full.rank
        self.V = nn.Parameter(torch.empty(full.rank, self.in_features))
        self.U = nn.Parameter(torch.empty(full.out_features, full.rank))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Leaves the region on R values; the guide (d outputs) needs its own reduction.
        r = self.ctx.exit(self.split_product(h, self.V, IN))
        y = self.split_product(r, self.ctx.sequence_summed(self.U), self.sequence_split())
        if self.guided():
            a = self.guide_alpha
            y = a * self.ctx.exit(self.split_product(h, self.guide, IN)) + (1.0 - a) * y
        return self.finish(y)


class RowBlockDense(RowStructured):
    def __init__(self, full: BlockDense, ctx: TPContext):
        super().__init__(full, ctx)
        self.rank, self.nblocks = full.rank, full.nblocks
        b, r, k = full.blocks.shape
        self.blocks = nn.Parameter(torch.empty(b // ctx.size, r, k))
        self.U = nn.Parameter(torch.empty(full.out_features, full.rank // ctx.size))

    def row_partial(self, h):
        return self.split_product(ops.blockdiag_matmul(h, self.blocks), self.U, IN)


class RowBlockShuffle(RowStructured):
    def __init__(self, full: BlockShuffle, ctx: TPContext):
        super().__init__(full, ctx)
        self.nblocks = full.nblocks
        b, m, k = full.blocks1.shape
        self.blocks1 = nn.Parameter(torch.empty(b // ctx.size, m, k))
        b, m, k = full.blocks2.shape
        self.blocks2 = nn.Parameter(torch.empty(b, m, k // ctx.size))

    def row_partial(self, h):
        # Outputs j of local block i sit at shuffled position j*B + i; block c of the second
        # factor reads positions c*m .. (c+1)*m, i.e. j = c*m/B + j'. Lay this rank's outputs
        # out as (c, j', i) to meet the columns of blocks2 this rank holds.
        z = ops.blockdiag_matmul(h, self.blocks1)
        local_blocks, nb = self.blocks1.shape[0], self.nblocks
        z = z.unflatten(-1, (local_blocks, nb, -1)).movedim(-3, -1).flatten(-3)
        return ops.blockdiag_matmul(z, self.blocks2)


_COLUMN = {LowRank: ColumnLowRank, BlockDense: ColumnBlockDense, BlockShuffle: ColumnBlockShuffle}
_ROW = {LowRank: RowLowRank, BlockDense: RowBlockDense, BlockShuffle: RowBlockShuffle}


def column_linear(full: nn.Module, ctx: TPContext) -> nn.Module:
    """The TP shell of an MLP linear whose outputs are split. A dense one reads an input
    that already entered the region; a structured one enters it itself."""
    if isinstance(full, nn.Linear):
        return ColumnLinear(full.in_features, full.out_features, full.bias is not None, ctx)
    return _COLUMN[type(full)](full, ctx)


def row_linear(full: nn.Module, ctx: TPContext) -> nn.Module:
    if isinstance(full, nn.Linear):
        return RowLinear(full.in_features, full.out_features, full.bias is not None, ctx)
    return _ROW[type(full)](full, ctx)
