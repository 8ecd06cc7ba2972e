"""A HybridLM's tensor-parallel form, built from outside: model/ has no process groups.

    topo = init_topology(tp=2, pp=1)
    model = HybridLM(cfg)                                   # the same init on every rank
    tp_model = tensor_parallel(model, TPContext.from_parallel_state(sequence_parallel=False))
    loss = tp_model(input_ids, labels=labels)               # the TP=1 loss, to rounding

What is split (megatron-core's layers and mappings; see tp_linears.py for the MLP linears):
  attention  query heads split; KV heads split when tp divides them, else replicated with
             each rank using the one head its query heads share; o_proj row-parallel.
  Mamba2     heads and groups split as Megatron's MambaMixer: in_proj column-parallel with
             each of z, x, B, C, dt split per rank; conv, A_log, D, dt_bias local; the gated
             norm per local group; out_proj row-parallel.
  MLP        dense: column then row; structured: each linear its own split.
  vocab      VocabParallelEmbedding; LM head column-parallel over the vocabulary (tied: the
             embedding's shard); the loss is kernels.ops' fused head + cross-entropy, vocab-
             parallel (megatron's vocab_parallel_cross_entropy runs on CPU too, but holds the
             fp32 logits and their exponentials for every token: the fused op never does).
The TP mixers are the model's own classes, built by their own constructors with this rank's
projections (TPProjections; model/linear.py Projections), so they run the model's forward code
(rope, SSD, caches, the activation, the recompute seams) with local sizes; they add only the
region entry. Parameter names stay the HybridLM's.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from strata.kernels import ops
from strata.model.attention import Attention
from strata.model.config import BlockSpec, ModelConfig
from strata.model.hybrid import HybridLM, document_index
from strata.model.linear import Projections
from strata.model.mamba2 import Mamba2Mixer
from strata.model.mlp import MLP
from strata.model.norm import RMSNorm
from strata.model.structured import carry_guidance
from strata.parallel.tensor.linears import ColumnLinear, ReplicatedHead, RowLinear, _no_init, column_linear, row_linear
from strata.parallel.tensor.mappings import TPContext
from strata.parallel.tensor.splits import REPLICATED, kv_heads_split, parameter_splits, shard_state_dict, split_of


class TPProjections(Projections):
    """This rank's projections (model/linear.py Projections): megatron-core's column and row
    parallel linears; k and v split with the KV heads, or one replicated head where the ranks
    outnumber them; an MLP linear, dense or structured, as its TP shell (tp_linears.py). Weights
    are copied in afterwards (Sharder), so the whole MLP linears the shells are made from are
    built on the meta device."""

    def __init__(self, ctx: TPContext):
        self.ctx, self.ranks = ctx, ctx.size

    def column(self, in_features, out_features, bias):
        return ColumnLinear(in_features, out_features, bias, self.ctx)

    def row(self, in_features, out_features, bias):
        return RowLinear(in_features, out_features, bias, self.ctx)

    def kv(self, in_features, n_kv_heads, head_dim, bias):
        if kv_heads_split(n_kv_heads, self.ranks):
            return ColumnLinear(in_features, n_kv_heads * head_dim, bias, self.ctx), n_kv_heads // self.ranks
        head = self.ctx.rank * n_kv_heads // self.ranks  # the KV head this rank's query heads share
        return ReplicatedHead(in_features, n_kv_heads * head_dim, bias, head_dim, head, self.ctx), 1

    def column_of(self, build):
        return column_linear(_on_meta(build), self.ctx)

    def row_of(self, build):
        return row_linear(_on_meta(build), self.ctx)


def _on_meta(build):
    """The whole linear a TP shell is shaped after: no memory, no init (its shard is copied in)."""
    with torch.device("meta"):
        return build()


class TPMixer:
    """What the TP mixers add to the model's: the region entry before the mixer (its input
    enters the tensor-parallel region once; under sequence parallelism it is gathered)."""

    ctx: TPContext

    def forward(self, x, position_ids=None, cache=None, seq_idx=None):
        _no_cache_with_sequence_parallel(self.ctx, cache)
        return super().forward(self.enter(x), position_ids=position_ids, cache=cache, seq_idx=seq_idx)

    def enter(self, x):
        return self.ctx.enter(x)


class TPAttention(TPMixer, Attention):
    """Attention over this rank's query heads (and their KV heads): the model's Attention built
    with this rank's projections."""

    def __init__(self, cfg: ModelConfig, ctx: TPContext):
        Attention.__init__(self, cfg.attention, cfg.d_model, TPProjections(ctx))
        self.ctx = ctx


class TPMamba2(TPMixer, Mamba2Mixer):
    """The Mamba2 mixer over this rank's heads and groups: the model's Mamba2Mixer built with
    this rank's projections."""

    def __init__(self, cfg: ModelConfig, ctx: TPContext):
        Mamba2Mixer.__init__(self, cfg.mamba, cfg.d_model, cfg.norm_eps, TPProjections(ctx))
        self.ctx = ctx


class TPMLP(TPMixer, MLP):
    """The MLP with split linears: the model's MLP built with this rank's projections. Dense
    column linears share one region entry; structured ones enter the region where their split
    puts it (e.g. after LowRank's first factor)."""

    def __init__(self, cfg: ModelConfig, spec: BlockSpec, ctx: TPContext):
        MLP.__init__(self, cfg.mlp, cfg.d_model, spec.index, spec.dense_mlp, TPProjections(ctx))
        self.ctx = ctx

    def enter(self, x):
        return self.ctx.enter(x) if isinstance(self.up_proj, ColumnLinear) else x


class TPEmbedding(VocabParallelEmbedding):
    """Megatron's VocabParallelEmbedding; under sequence parallelism each rank keeps its
    part of the sequence."""

    def __init__(self, full: nn.Embedding, ctx: TPContext):
        super().__init__(full.num_embeddings, full.embedding_dim, init_method=_no_init,
                         config=ctx.megatron_config(), tp_group=ctx.group)
        self.ctx = ctx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ctx.split_sequence(super().forward(input_ids))


class SequenceParallelNorm(RMSNorm):
    """A block's (or the final) RMSNorm under sequence parallelism: each rank normalises its
    own tokens, so the weight's gradient is summed over the TP ranks."""

    def __init__(self, full: RMSNorm, ctx: TPContext):
        super().__init__(full.weight.shape[0], full.eps, full.group_size)
        self.ctx = ctx

    def forward(self, x, z=None):
        return ops.rmsnorm(x, self.ctx.sequence_summed(self.weight), self.eps, z=z, group_size=self.group_size)


class TensorParallelLM(nn.Module):
    """The TP model: forward(input_ids, labels=None, position_ids=None, caches=None) as
    HybridLM's, returning the mean loss (vocab-parallel cross-entropy) or the full logits."""

    def __init__(self, cfg, embed: TPEmbedding, blocks: nn.ModuleList, final_norm: nn.Module,
                 lm_head: ColumnLinear, ctx: TPContext):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.embed, self.blocks, self.final_norm, self.lm_head = embed, blocks, final_norm, lm_head

    @property
    def head_weight(self) -> torch.Tensor:
        """This rank's rows of the LM head (the embedding's when tied)."""
        return self.embed.weight if self.lm_head.weight is None else self.lm_head.weight

    def documents(self, position_ids, batch_size: int):
        """seq_idx of the rows, the full sequence's: SP gathers the sequence for the mixers."""
        return document_index(position_ids, batch_size)

    def hidden_states(self, input_ids, position_ids=None, caches=None):
        x = self.embed(input_ids)
        seq_idx = self.documents(position_ids, input_ids.shape[0])
        for i, block in enumerate(self.blocks):
            x = block(x, position_ids=position_ids, cache=None if caches is None else caches[i], seq_idx=seq_idx)
        return self.final_norm(x)

    def vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the vocabulary's logits, for every token."""
        return self.lm_head(self.ctx.enter(h), weight=self.head_weight if self.lm_head.weight is None else None)

    def forward(self, input_ids, labels=None, position_ids=None, caches=None):
        h = self.hidden_states(input_ids, position_ids, caches)
        if labels is None:
            return self.logits(h)
        return self.loss(h, labels)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits of every token (gathered over the TP ranks)."""
        return self.ctx.gather_last_dim(self.vocab_logits(h))

    def loss(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return vocab_parallel_loss(self.ctx, h, self.head_weight, labels, reduction)

    def allocate_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        return [b.allocate_cache(batch_size, max_len, device, dtype) for b in self.blocks]


def vocab_parallel_loss(ctx: TPContext, h: torch.Tensor, head_shard: torch.Tensor, labels: torch.Tensor,
                        reduction: str = "mean"):
    """Mean (or summed) cross-entropy over labels != -100 (as HybridLM's) with the head's vocabulary rows
    split over TP: kernels.ops' fused head + loss (chunked Triton on GPU, never holding all
    logits), which sums the hidden states' gradient over the group itself."""
    h = ctx.full_sequence(h)
    return ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), head_shard, labels.reshape(-1),
                                    reduction=reduction, process_group=ctx.group)


def _no_cache_with_sequence_parallel(ctx: TPContext, cache) -> None:
    if cache is not None and ctx.sequence_parallel:
        raise ValueError("decoding with caches runs without sequence parallelism; "
                         "build the TP model with sequence_parallel=False to generate")


def _tp_mixer(block, cfg: ModelConfig, ctx: TPContext) -> nn.Module:
    """The TP form of a block's mixer, chosen by the mixer's type."""
    if isinstance(block.mixer, Mamba2Mixer):
        return TPMamba2(cfg, ctx)
    if isinstance(block.mixer, Attention):
        return TPAttention(cfg, ctx)
    return TPMLP(cfg, block.spec, ctx)


class Sharder:
    """Turns the parts of a HybridLM (identical on every rank of the TP group) into this
    rank's TP forms, weights copied in through parallel/tensor/splits.py. Each part is
    converted on its own, so a pipeline stage shards only the blocks it holds."""

    def __init__(self, model: HybridLM, ctx: TPContext):
        self.ctx, self.cfg = ctx, model.cfg
        self.splits = parameter_splits(model, ctx.size)
        self.no_decay = {n: p._no_weight_decay for n, p in model.named_parameters() if hasattr(p, "_no_weight_decay")}

    @torch.no_grad()
    def block(self, block, index: int):
        """Converts the block in place (its full mixer is dropped) and returns it."""
        prefix = f"blocks.{index}."
        full = block.state_dict(prefix=prefix)
        whole = block.mixer
        block.mixer = _tp_mixer(block, self.cfg, self.ctx)
        carry_guidance(whole, block.mixer)
        if self.ctx.sequence_parallel:
            block.norm = SequenceParallelNorm(block.norm, self.ctx)
        return self._load(block, prefix, full)

    @torch.no_grad()
    def final_norm(self, norm: RMSNorm) -> nn.Module:
        if not self.ctx.sequence_parallel:
            return norm
        return self._load(SequenceParallelNorm(norm, self.ctx), "final_norm.", norm.state_dict(prefix="final_norm."))

    @torch.no_grad()
    def embedding(self, embed: nn.Embedding) -> TPEmbedding:
        return self._load(TPEmbedding(embed, self.ctx), "embed.", embed.state_dict(prefix="embed."))

    @torch.no_grad()
    def lm_head(self, lm_head: nn.Linear | None) -> ColumnLinear:
        """The vocab-parallel head; weightless when tied (it reads the embedding's shard)."""
        cfg = self.cfg
        head = ColumnLinear(cfg.d_model, cfg.vocab_size, False, self.ctx, shared_weight=lm_head is None)
        return head if lm_head is None else self._load(head, "lm_head.", lm_head.state_dict(prefix="lm_head."))

    def _load(self, module: nn.Module, prefix: str, full: dict) -> nn.Module:
        local = {k[len(prefix):]: v for k, v in shard_state_dict(full, self.splits, self.ctx.rank, self.ctx.size).items()}
        missing, unexpected = module.load_state_dict(local, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"tensor_parallel: the shards of {prefix} do not match its TP form "
                               f"(missing {missing}, unexpected {unexpected})")
        for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
            rule = split_of(self.splits, name)
            if rule is not REPLICATED:  # megatron's attribute names; some of its layers set them already
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, rule.dim, 1
            if name in self.no_decay:
                p._no_weight_decay = self.no_decay[name]
        return module


def tensor_parallel(model: HybridLM, ctx: TPContext) -> TensorParallelLM:
    """Shard `model` (identical on every rank of the TP group) into this rank's TP form.

    The model is converted in place, block by block, so that a block's full weights are
    freed once its shards exist; do not use `model` afterwards."""
    shard = Sharder(model, ctx)
    for i, block in enumerate(model.blocks):
        shard.block(block, i)
    return TensorParallelLM(model.cfg, shard.embedding(model.embed), model.blocks, shard.final_norm(model.final_norm),
                            shard.lm_head(model.lm_head), ctx)
