"""A model's context-parallel form, built from outside: model/ has no process groups.

    ctx = CPContext.of_group(cp_group)
    cp_model = context_parallel(HybridLM(cfg), ctx)          # the same init on every CP rank
    cp_model = context_parallel(tensor_parallel(HybridLM(cfg), tp_ctx), ctx)   # or its TP form
    loss = cp_model(ctx.shard(input_ids), labels=ctx.shard(labels), position_ids=ctx.shard(positions))

No parameter is split: every CP rank holds the whole model (or its TP shard) and its own two
pieces of each sequence (pieces.py). Token-wise parts (embedding, norms, MLPs, the LM head) run as
they are; Mamba2 and attention mixers, and the model itself, get the CP mixins of this package,
their class swapped for a subclass in place (as FSDP2's fully_shard does), so parameters, their
names and marks, and the recompute flags stay the model's. Under tensor parallelism the CP
mixers see what the TP mixers see: the rank's heads of the rank's pieces (gathered over the TP
ranks under sequence parallelism). The loss is the whole sequence's mean, the same on every CP
rank, with gradients to be averaged over the CP ranks with data parallelism's.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from strata.model.attention import Attention
from strata.model.hybrid import document_index
from strata.model.mamba2 import Mamba2Mixer
from strata.parallel.context.attention import ContextParallelAttention
from strata.parallel.context.mamba import ContextParallelMamba, no_cache
from strata.parallel.context.pieces import CPContext

IGNORE_INDEX = -100


@functools.cache
def _with_context_parallelism(cls: type, mixin: type) -> type:
    return type(f"ContextParallel{cls.__name__}", (mixin, cls), {})


def _swap_in(module: nn.Module, mixin: type, ctx: CPContext) -> nn.Module:
    if not isinstance(module, mixin):
        module.__class__ = _with_context_parallelism(type(module), mixin)
        module.cp = ctx
    return module


def make_context_parallel(mixer: nn.Module, ctx: CPContext) -> nn.Module:
    """The mixer, in place, with its CP mixin (an MLP reads one token at a time: unchanged)."""
    for kind, mixin in ((Mamba2Mixer, ContextParallelMamba), (Attention, ContextParallelAttention)):
        if isinstance(mixer, kind):
            _swap_in(mixer, mixin, ctx)
    return mixer


class ContextParallelModel:
    """What the model adds under CP (a mixin before HybridLM's or TensorParallelLM's class):
    forward(input_ids, labels=None, position_ids=None) on this rank's two pieces of each row
    (CPContext.shard): the whole sequence's loss, or this rank's tokens' logits."""

    cp: CPContext

    def documents(self, position_ids, batch_size: int):
        """Every block reads the whole sequence's documents (from every rank's position ids)."""
        if position_ids is None:
            return None
        return document_index(self.cp.whole_sequence(position_ids, dim=-1), batch_size)

    def forward(self, input_ids, labels=None, position_ids=None, caches=None):
        no_cache(caches)
        self.cp.piece_length(input_ids.shape[1] * self.cp.size)
        h = self.hidden_states(input_ids, position_ids)
        if labels is None:
            return self.logits(h)
        return self.sequence_loss(h, labels)

    def sequence_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy over the whole sequence's labels != -100: every CP rank's summed
        loss over the tokens of every rank (each token counts once, wherever it is)."""
        local = self.loss(h, labels, reduction="sum")
        counted = (labels != IGNORE_INDEX).sum().to(local.dtype)
        torch.distributed.all_reduce(counted, group=self.cp.group)
        return self.cp.sum_over_ranks(local) / counted


def context_parallel(model: nn.Module, ctx: CPContext) -> nn.Module:
    """`model` (a HybridLM or its TP form, identical on every CP rank) as this rank's CP form, in place."""
    for block in model.blocks:
        make_context_parallel(block.mixer, ctx)
    return _swap_in(model, ContextParallelModel, ctx)
