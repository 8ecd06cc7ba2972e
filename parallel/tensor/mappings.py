"""Where a tensor-parallel region starts and ends, with and without sequence parallelism.

A TP region turns a replicated activation into per-rank shards of features (column-parallel
linears) and back into a replicated one (row-parallel linears reduce partial sums):

    enter: identity forward, all-reduce of the gradient backward (megatron's copy_to_...)
    exit:  all-reduce forward, identity backward                 (megatron's reduce_from_...)

With sequence parallelism the activations outside a region are split along the sequence
(dim 1 of (batch, seq, ...)), so norms and residuals hold 1/tp of the tokens:

    enter: all-gather over the sequence forward, reduce-scatter backward
    exit:  reduce-scatter over the sequence forward, all-gather backward

megatron-core's own sequence-parallel and gather mappings allocate their outputs with
`torch.cuda.current_device()` and cannot run on CPU; the small autograd functions below
do the same collectives on whatever device the tensor is on (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

SEQ_DIM = 1

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=group)
    return torch.cat(out.chunk(size), dim=dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    chunks = torch.cat(x.chunk(size, dim=dim), dim=0).contiguous()
    out = torch.empty((chunks.shape[0] // size, *chunks.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, chunks, group=group)
    return out


def split_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


class _ReduceGradient(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward: megatron's copy_to region,
    except that a non-contiguous gradient is reduced too (megatron's all-reduces a
    contiguous copy and returns the unreduced original)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _conjugate(name: str, forward, backward, dim: int) -> type[torch.autograd.Function]:
    """An autograd function doing the collective `forward` along `dim` over the group, and
    `backward` (its conjugate) on the gradient."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, dim, group)

    def bwd(ctx, grad):
        return backward(grad, dim, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_GatherSequence = _conjugate("_GatherSequence", gather_along, reduce_scatter_along, SEQ_DIM)
_ReduceScatterSequence = _conjugate("_ReduceScatterSequence", reduce_scatter_along, gather_along, SEQ_DIM)
_SplitSequence = _conjugate("_SplitSequence", split_along, gather_along, SEQ_DIM)
# All-gather over the sequence; backward keeps this rank's part of a gradient that the
# consumer already summed over the group.
_GatherSequenceKeepGrad = _conjugate("_GatherSequenceKeepGrad", gather_along, split_along, SEQ_DIM)
_GatherLastDim = _conjugate("_GatherLastDim", gather_along, split_along, -1)


def reduce_gradient(x: torch.Tensor, group) -> torch.Tensor:
    return x if dist.get_world_size(group) == 1 else _ReduceGradient.apply(x, group)


@dataclass
class TPContext:
    """One tensor-parallel group as the TP modules see it."""

    group: object
    """The tensor-parallel process group (megatron's parallel_state group)."""
    rank: int
    """This rank's index in the group."""
    size: int
    """Ranks in the group."""
    sequence_parallel: bool = False
    """Split norms and residuals along the sequence between TP regions."""

    @classmethod
    def from_parallel_state(cls, sequence_parallel: bool = False) -> "TPContext":
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        return cls(group, dist.get_rank(group), dist.get_world_size(group), sequence_parallel and
                   dist.get_world_size(group) > 1)

    def megatron_config(self, dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
        """Megatron's layers allocate on CPU and skip their own init: the weights are
        always copied in from the full model (parallel/tensor/splits.py)."""
        return ModelParallelConfig(tensor_model_parallel_size=self.size, use_cpu_initialization=True,
                                   perform_initialization=False, params_dtype=dtype)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or sequence-split) activation -> the full one a column-parallel op reads."""
        if self.sequence_parallel:
            return _GatherSequence.apply(x, self.group)
        return reduce_gradient(x, self.group)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums of a row-parallel op -> the replicated (or sequence-split) sum."""
        if self.sequence_parallel:
            return _ReduceScatterSequence.apply(y, self.group)
        return reduce_from_tensor_model_parallel_region(y.contiguous(), group=self.group)

    def split_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated activation -> this rank's part of the sequence (no-op without SP)."""
        return _SplitSequence.apply(x, self.group) if self.sequence_parallel else x

    def full_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence on every rank, for an op that itself sums its input's gradient
        over the TP group (the vocab-parallel fused loss). No-op without SP."""
        return _GatherSequenceKeepGrad.apply(x, self.group) if self.sequence_parallel else x

    def sequence_summed(self, param: torch.Tensor) -> torch.Tensor:
        """A replicated parameter used outside the regions: under SP each rank applies it
        to its own tokens only, so its gradient is summed over the TP ranks (identity
        forward, all-reduce backward; megatron does the same for its sequence_parallel
        parameters). Without SP, a no-op."""
        return reduce_gradient(param, self.group) if self.sequence_parallel else param

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Feature shards (e.g. vocab-parallel logits) -> the full last dimension."""
        return _GatherLastDim.apply(x, self.group)

