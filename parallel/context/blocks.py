"""A HybridLM's context-parallel form, built from outside: model/ has no process groups.

    ctx = CPContext.of_group(cp_group)
    cp_model = context_parallel(HybridLM(cfg), ctx)          # the same init on every CP rank
    loss = cp_model(ctx.shard(input_ids), labels=ctx.shard(labels), position_ids=ctx.shard(positions))

No parameter is split: every CP rank holds the whole model and its own two pieces of each
sequence (pieces.py). Token-wise parts (embedding, norms, MLPs, the LM head) run as they are;
Mamba2 and attention mixers get the CP mixins of mamba.py and attention.py, their class
swapped for a subclass in place (as FSDP2's fully_shard does), so parameters, their names and
marks, and the recompute flags stay the model's. The loss is the whole sequence's mean, the
same on every CP rank, with gradients to be averaged over the CP ranks with data parallelism's.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from strata.kernels import ops
from strata.model.attention import Attention
from strata.model.hybrid import HybridLM, document_index
from strata.model.mamba2 import Mamba2Mixer
from strata.parallel.context.attention import ContextParallelAttention
from strata.parallel.context.mamba import ContextParallelMamba, no_cache
from strata.parallel.context.pieces import CPContext

IGNORE_INDEX = -100


@functools.cache
def _with_context_parallelism(cls: type, mixin: type) -> type:
    return type(f"ContextParallel{cls.__name__}", (mixin, cls), {})


def make_context_parallel(mixer: nn.Module, ctx: CPContext) -> nn.Module:
    """The mixer, in place, with its CP mixin (an MLP reads one token at a time: unchanged)."""
    for kind, mixin in ((Mamba2Mixer, ContextParallelMamba), (Attention, ContextParallelAttention)):
        if isinstance(mixer, kind) and not isinstance(mixer, mixin):
            mixer.__class__ = _with_context_parallelism(type(mixer), mixin)
            mixer.cp = ctx
    return mixer


class ContextParallelLM(nn.Module):
    """forward(input_ids, labels=None, position_ids=None) as HybridLM's, on this rank's two pieces
    of each row (CPContext.shard): the loss of the whole sequence, or this rank's tokens' logits."""

    def __init__(self, model: HybridLM, ctx: CPContext):
        super().__init__()
        self.cfg, self.ctx = model.cfg, ctx
        self.embed, self.blocks = model.embed, model.blocks
        self.final_norm, self.lm_head = model.final_norm, model.lm_head

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids, position_ids=None):
        """Each block reads this rank's tokens, their position ids, and the whole sequence's documents."""
        x = self.embed(input_ids)
        seq_idx = None
        if position_ids is not None:
            seq_idx = document_index(self.ctx.whole_sequence(position_ids, dim=-1), input_ids.shape[0])
        for block in self.blocks:
            x = block(x, position_ids=position_ids, seq_idx=seq_idx)
        return self.final_norm(x).to(self.final_norm.weight.dtype)

    def forward(self, input_ids, labels=None, position_ids=None, caches=None):
        no_cache(caches)
        self.ctx.piece_length(input_ids.shape[1] * self.ctx.size)
        h = self.hidden_states(input_ids, position_ids)
        if labels is None:
            return torch.nn.functional.linear(h, self.head_weight)
        return self.sequence_loss(h, labels)

    def sequence_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over the whole sequence's labels != -100: every CP rank's summed
        loss over the tokens of every rank (each token counts once, wherever it is)."""
        local = ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head_weight, labels.reshape(-1),
                                         reduction="sum")
        counted = (labels != IGNORE_INDEX).sum().to(local.dtype)
        torch.distributed.all_reduce(counted, group=self.ctx.group)
        return self.ctx.sum_over_ranks(local) / counted


def context_parallel(model: HybridLM, ctx: CPContext) -> ContextParallelLM:
    """`model` (identical on every CP rank) as this rank's CP form; its modules are shared, not copied."""
    for block in model.blocks:
        make_context_parallel(block.mixer, ctx)
    return ContextParallelLM(model, ctx)
