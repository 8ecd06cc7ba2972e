"""Which tokens a CP rank holds, and the collectives that move what crosses ranks.

The sequence (length L) is cut into 2 x CP pieces of L / (2 CP) tokens; rank r holds pieces r
and 2CP-1-r, side by side (Llama 3's and torchtitan's load balancing: under a causal mask the
early pieces are cheap and the late ones dear, and each rank gets one of each). Every tensor a
CP block sees holds this rank's two pieces along the sequence dim (dim 1), in that order.

What crosses ranks is gathered with `gather_pieces`: an all-gather whose backward sums every
rank's gradient of the gathered tensor and keeps this rank's part (a reduce-scatter), so that
a rank's activations receive the gradient of every rank that read them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

SEQ_DIM = 1
PIECES_PER_RANK = 2

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class CPContext:
    """One CP group: `size` ranks sharing each sequence; this rank is `rank` of them."""

    group: object
    rank: int
    size: int

    @classmethod
    def of_group(cls, group) -> "CPContext":
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def pieces(self) -> int:
        return PIECES_PER_RANK * self.size

    def local_pieces(self) -> tuple[int, int]:
        """The global indices of this rank's two pieces, in the order it holds them."""
        return self.rank, self.pieces - 1 - self.rank

    def piece_length(self, seq_len: int) -> int:
        if seq_len % self.pieces:
            raise ValueError(f"context parallel: the sequence length {seq_len} does not divide into "
                             f"2 x cp = {self.pieces} pieces; make train.seq_len a multiple of {self.pieces}")
        return seq_len // self.pieces

    def shard(self, t: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
        """This rank's two pieces of a whole-sequence tensor (the loader's rows, the positions)."""
        pieces = t.chunk(self.pieces, dim=dim)
        return torch.cat([pieces[j] for j in self.local_pieces()], dim=dim)

    def global_order(self) -> torch.Tensor:
        """For global piece j, its index among the gathered pieces (rank-major: rank r's two pieces
        at 2r and 2r + 1)."""
        order = [0] * self.pieces
        for r in range(self.size):
            order[r], order[self.pieces - 1 - r] = 2 * r, 2 * r + 1
        return torch.tensor(order)

    def query_positions(self, seq_len: int, device=None) -> torch.Tensor:
        """The index in the whole sequence of each token this rank holds: (2 * L / (2 CP),)."""
        length = self.piece_length(seq_len)
        return torch.cat([torch.arange(j * length, (j + 1) * length, device=device) for j in self.local_pieces()])

    def gather_pieces(self, t: torch.Tensor) -> torch.Tensor:
        """t (PIECES_PER_RANK, ...): something of each of this rank's pieces -> (2 CP, ...), every
        piece's in global order; differentiable (see the module docstring)."""
        gathered = _GatherPieces.apply(t.contiguous(), self.group, self.rank, self.size)
        return gathered.index_select(0, self.global_order().to(t.device))

    def whole_sequence(self, t: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
        """The whole sequence along `dim`, from every rank's two pieces of it (differentiable)."""
        local = torch.stack(t.chunk(PIECES_PER_RANK, dim=dim))
        return torch.cat(self.gather_pieces(local).unbind(0), dim=dim)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over the CP ranks, for the loss: see _SumForAveragedGradients."""
        return _SumForAveragedGradients.apply(t, self.group, self.size)


class _GatherPieces(torch.autograd.Function):
    """All-gather along a new leading dim of size `size` x t's; backward: the sum of every rank's
    gradient of the whole, this rank's share of it."""

    @staticmethod
    def forward(ctx, t, group, rank, size):
        ctx.group, ctx.size = group, size
        out = t.new_empty((size * t.shape[0], *t.shape[1:]))
        _all_gather(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // ctx.size, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None, None, None


class _SumForAveragedGradients(torch.autograd.Function):
    """Forward: the sum over the CP ranks (every rank then reports the whole sequence's loss).
    Backward: the gradient times the CP size on each rank's own term. The CP ranks' parameter
    gradients are averaged together with data parallelism's (as Megatron scales its CP loss by
    the CP size); the average of size x (each rank's share) is the whole sequence's gradient."""

    @staticmethod
    def forward(ctx, t, group, size):
        ctx.size = size
        total = t.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.size, None, None
