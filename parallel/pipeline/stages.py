"""Pipeline parallelism: the model as DeepSpeed's PipelineModule, its stages balanced by
each layer's FLOPs (model/counting.py), trained by DeepSpeed's 1F1B pipeline engine.

    pipe = pipeline_model(HybridLM(cfg), topo, seq_len)     # this rank's stage, TP-sharded if tp > 1
    engine = deepspeed.initialize(model=pipe, ...)           # PipelineEngine
    loss = engine.train_batch(iter(batches))                 # grad_accum micro-batches, each
                                                             # (input_ids, labels) or ((input_ids, position_ids), labels)

Layers, in order: the embedding (first stage), the blocks, the final norm, the LM head
(last stage; its output and weight go to the loss, so TP=1 keeps the fused head + loss of
kernels.ops). With tied embeddings the embedding is a TiedLayerSpec on the first and last
stage and DeepSpeed all-reduces its gradient between them. The loss is computed on the last
stage; the engine broadcasts the step's mean loss to every stage, so rank 0 logs it.

Why DeepSpeed's engine and not torch.distributed.pipelining: it composes with the ZeRO-1
optimizer and DeepSpeed's checkpoints that the rest of Strata uses. Its limits: 1F1B only
(no interleaved schedule), ZeRO stage <= 1. megatron-core's schedules need CUDA.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.utils import partition_balanced
from torch import nn

from strata.kernels import ops
from strata.model.config import ModelConfig
from strata.model.counting import block_forward_flops
from strata.model.hybrid import Block, HybridLM, document_index
from strata.parallel.context.blocks import IGNORE_INDEX, make_context_parallel
from strata.parallel.context.pieces import CPContext
from strata.parallel.guard import poison_non_finite
from strata.parallel.tensor.blocks import Sharder, vocab_parallel_loss
from strata.parallel.tensor.mappings import TPContext
from strata.parallel.topology import Topology


def layer_costs(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each pipeline layer: embedding, blocks, final norm, head."""
    return [0.0, *block_forward_flops(cfg, seq_len), 0.0, 2.0 * cfg.d_model * cfg.vocab_size]


def stage_bounds(cfg: ModelConfig, seq_len: int, pp: int) -> list[int]:
    """pp + 1 layer indices: stage s holds layers [bounds[s], bounds[s+1]), contiguous and
    balanced by cost (DeepSpeed's partition_balanced minimises the costliest stage)."""
    return partition_balanced(layer_costs(cfg, seq_len), pp)


def layer_prefix(index: int, n_blocks: int) -> str:
    """The HybridLM name prefix of pipeline layer `index`'s parameters (checkpoint code
    maps PipelineModule names back with it)."""
    if index == 0 or index == n_blocks + 2:
        return ""  # EmbeddingStage.embed / HeadStage.lm_head carry the model's names
    if index == n_blocks + 1:
        return "final_norm."
    return f"blocks.{index - 1}."


class EmbeddingStage(nn.Module):
    """input_ids, or (input_ids, position_ids) when the data resets positions at document
    boundaries; the positions then travel with the activations to every block."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        if isinstance(inputs, tuple):
            input_ids, position_ids = inputs
            return self.embed(input_ids), position_ids
        return self.embed(inputs)


class BlockStage(Block):
    """A block as a pipeline layer: takes and returns x or (x, position_ids); the last block
    hands x alone to the final norm. Built by Block's own constructor from an existing block's
    spec and parts (its parameter names stay the block's). The documents of
    packed rows (seq_idx) are derived from the position ids once per micro-batch and stage:
    every block of a stage receives the same position_ids tensor. Under context parallelism
    (`cp`) the position ids are this rank's pieces', and the documents the whole sequence's."""

    _documents: tuple = (None, -1, None)
    """(position_ids, their version, their seq_idx): the last derivation, shared by the blocks
    of a stage (held by reference, so no other tensor can take that identity)."""

    def __init__(self, block: Block, cfg: ModelConfig, last: bool, cp: CPContext | None = None):
        super().__init__(block.spec, cfg, norm=block.norm, mixer=block.mixer)
        self.last, self.cp = last, cp

    def forward(self, inputs):
        x, position_ids = inputs if isinstance(inputs, tuple) else (inputs, None)
        x = super().forward(x, position_ids=position_ids, seq_idx=self.documents(position_ids, x.shape[0]))
        return x if position_ids is None or self.last else (x, position_ids)

    def documents(self, position_ids, batch_size: int):
        if position_ids is None:
            return None
        seen, version, seq_idx = BlockStage._documents
        if seen is not position_ids or version != position_ids._version:
            whole = position_ids if self.cp is None else self.cp.whole_sequence(position_ids, dim=-1)
            seq_idx = document_index(whole, batch_size)
            BlockStage._documents = (position_ids, position_ids._version, seq_idx)
        return seq_idx


def tied_head(stage: EmbeddingStage, h: torch.Tensor):
    """The last stage's use of the tied embedding: hand the hidden states and the head
    weight to the loss."""
    return h, stage.embed.weight


class HeadStage(nn.Module):
    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor):
        return h, self.lm_head.weight


class PipelineLoss:
    """Mean cross-entropy over labels != -100 from (hidden states, head weight): the fused
    head + loss of kernels.ops, vocab-parallel under TP; under CP the whole sequence's, as
    parallel/context/blocks.py's sequence_loss."""

    def __init__(self, ctx: TPContext | None, cp: CPContext | None = None):
        self.ctx, self.cp = ctx, cp

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        h, weight = outputs
        reduction = "mean" if self.cp is None else "sum"
        if self.ctx is None:
            loss = ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1),
                                            reduction=reduction)
        else:
            loss = vocab_parallel_loss(self.ctx, h, weight, labels, reduction)
        if self.cp is not None:
            counted = (labels != IGNORE_INDEX).sum().to(loss.dtype)
            torch.distributed.all_reduce(counted, group=self.cp.group)
            loss = self.cp.sum_over_ranks(loss) / counted
        return poison_non_finite(loss)  # the step is then skipped (parallel/guard.py)


class CostBalancedPipeline(PipelineModule):
    """DeepSpeed's PipelineModule with our stage bounds (its own methods balance parameter
    or layer counts, not FLOPs)."""

    def __init__(self, layers: list, bounds: list[int], **kwargs):
        self.strata_bounds = bounds
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = self.strata_bounds
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def pipeline_model(model: HybridLM, topo: Topology, seq_len: int, sequence_parallel: bool = False,
                   cp: CPContext | None = None) -> PipelineModule:
    """This rank's pipeline stage of `model` (identical on every rank), its blocks
    tensor-parallel when topo.tp > 1 and context-parallel with `cp`. Layers of other stages are
    never converted or kept."""
    cfg, n = model.cfg, len(model.blocks)
    bounds = stage_bounds(cfg, seq_len, topo.pp)
    local = range(bounds[topo.pp_rank], bounds[topo.pp_rank + 1])
    ctx = TPContext.from_parallel_state(sequence_parallel) if topo.tp > 1 else None
    shard = Sharder(model, ctx) if ctx else None
    tied = model.lm_head is None
    layers: list = [None] * (n + 3)
    for i in local:
        if 1 <= i <= n:
            block = shard.block(model.blocks[i - 1], i - 1) if shard else model.blocks[i - 1]
            if cp is not None:
                make_context_parallel(block.mixer, cp)
            layers[i] = BlockStage(block, cfg, last=i == n, cp=cp)
        elif i == n + 1:
            layers[i] = shard.final_norm(model.final_norm) if shard else model.final_norm
        elif i == n + 2 and not tied:
            layers[i] = HeadStage(shard.lm_head(model.lm_head) if shard else model.lm_head)
    needs_embedding = 0 in local or (tied and n + 2 in local)
    embed = (shard.embedding(model.embed) if shard else model.embed) if needs_embedding else None
    if tied:
        layers[0] = TiedLayerSpec("embed", EmbeddingStage, embed, tied_weight_attr="embed.weight")
        layers[n + 2] = TiedLayerSpec("embed", EmbeddingStage, embed, forward_fn=tied_head,
                                      tied_weight_attr="embed.weight")
    elif 0 in local:
        layers[0] = EmbeddingStage(embed)
    pipe = CostBalancedPipeline(layers, bounds, topology=topo.deepspeed_topology(), loss_fn=PipelineLoss(ctx, cp),
                                partition_method="strata-cost")
    count_once_in_zero0_clipping(pipe, topo)
    return pipe


def count_once_in_zero0_clipping(pipe: PipelineModule, topo: Topology) -> None:
    """DeepSpeed's ZeRO-0 gradient clipping (runtime/utils.py clip_grad_norm_) counts a
    parameter only on model-parallel rank 0, the first stage's TP rank 0, unless it is marked
    model-parallel: under PP the other stages would be left out of the global norm, and the
    last stage's copy of a TP-split tied embedding would be counted twice. So: mark this
    stage's parameters on TP rank 0 (TP-split ones are marked already on every TP rank), and
    unmark the tied copies (ds_pipe_replicated), which the first stage counts. Elsewhere in
    DeepSpeed the marks change nothing: its other norms count TP rank 0's parameters and
    skip ds_pipe_replicated ones anyway."""
    for p in pipe.parameters():
        if getattr(p, "ds_pipe_replicated", False):
            p.tensor_model_parallel = p.model_parallel = False
        elif topo.tp_rank == 0:
            p.model_parallel = True


def model_parameter_name(pipeline_name: str, n_blocks: int) -> str:
    """A PipelineModule parameter name as the HybridLM's (e.g. '3.mixer.in_proj.weight' ->
    'blocks.2.mixer.in_proj.weight', 'tied_modules.embed.embed.weight' -> 'embed.weight')."""
    if pipeline_name.startswith("tied_modules."):
        return pipeline_name.split(".", 2)[2]
    index, rest = pipeline_name.split(".", 1)
    return layer_prefix(int(index), n_blocks) + rest

