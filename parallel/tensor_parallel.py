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
The TP mixers reuse the model's own forward code (rope, SSD, caches, the activation, the
recompute seams) with local sizes; only their projections and the region entry differ.
Parameter names stay the HybridLM's.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from kernels import ops
from model.attention import Attention
from model.hybrid import HybridLM, document_index
from model.mamba2 import Mamba2Mixer
from model.mlp import MLP
from model.norm import RMSNorm
from parallel.tp_linears import ColumnLinear, ReplicatedHead, RowLinear, _no_init, column_linear, row_linear
from parallel.tp_mappings import TPContext
from parallel.tp_splits import REPLICATED, kv_heads_split, parameter_splits, shard_state_dict, split_of


class TPAttention(Attention):
    """Attention over this rank's query heads (and their KV heads). Attention.__init__
    builds full-size projections, so the TP form sets its local sizes itself."""

    def __init__(self, full: Attention, ctx: TPContext):
        nn.Module.__init__(self)
        self.cfg, self.ctx, self.head_dim = full.cfg, ctx, full.head_dim
        self.n_heads = full.n_heads // ctx.size
        d_model = full.q_proj.in_features
        self.q_proj = ColumnLinear(d_model, full.n_heads * full.head_dim, full.q_proj.bias is not None, ctx)
        if kv_heads_split(full.n_kv_heads, ctx.size):
            self.n_kv_heads = full.n_kv_heads // ctx.size
            self.k_proj, self.v_proj = (ColumnLinear(d_model, full.n_kv_heads * full.head_dim, p.bias is not None, ctx)
                                        for p in (full.k_proj, full.v_proj))
        else:
            self.n_kv_heads = 1
            kv_index = ctx.rank * full.n_kv_heads // ctx.size
            self.k_proj, self.v_proj = (ReplicatedHead(p, full.head_dim, kv_index, ctx)
                                        for p in (full.k_proj, full.v_proj))
        self.o_proj = RowLinear(full.n_heads * full.head_dim, d_model, False, ctx)

    def forward(self, x, position_ids=None, cache=None, seq_idx=None):
        _no_cache_with_sequence_parallel(self.ctx, cache)
        return super().forward(self.ctx.enter(x), position_ids=position_ids, cache=cache, seq_idx=seq_idx)


class TPMamba2(Mamba2Mixer):
    """The Mamba2 mixer over this rank's heads and groups. Mamba2Mixer.__init__ builds
    full-size layers, so the TP form sets its local sizes itself."""

    def __init__(self, full: Mamba2Mixer, ctx: TPContext):
        nn.Module.__init__(self)
        tp, c = ctx.size, full.cfg
        self.ctx = ctx
        self.cfg = dataclasses.replace(c, ngroups=c.ngroups // tp)
        self.d_inner, self.nheads = full.d_inner // tp, full.nheads // tp
        self.bc_dim = self.cfg.ngroups * c.d_state
        self.conv_dim = self.d_inner + 2 * self.bc_dim
        d_model = full.in_proj.in_features
        self.in_proj = ColumnLinear(d_model, full.in_proj.out_features, full.in_proj.bias is not None, ctx)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim,
                                padding=c.d_conv - 1, bias=full.conv1d.bias is not None)
        self.dt_bias, self.A_log, self.D = (nn.Parameter(torch.empty(self.nheads)) for _ in range(3))
        self.norm = RMSNorm(self.d_inner, full.norm.eps, group_size=full.norm.group_size)
        self.out_proj = RowLinear(full.d_inner, d_model, full.out_proj.bias is not None, ctx)

    def forward(self, u, cache=None, seq_idx=None):
        _no_cache_with_sequence_parallel(self.ctx, cache)
        return super().forward(self.ctx.enter(u), cache=cache, seq_idx=seq_idx)


class TPMLP(MLP):
    """The MLP with split linears. Dense column linears share one region entry; structured
    ones enter the region where their split puts it (e.g. after LowRank's first factor)."""

    def __init__(self, full: MLP, ctx: TPContext):
        nn.Module.__init__(self)
        self.ctx, self.activation = ctx, full.activation
        if self.activation == "swiglu":
            self.gate_proj = column_linear(full.gate_proj, ctx)
        self.up_proj = column_linear(full.up_proj, ctx)
        self.down_proj = row_linear(full.down_proj, ctx)
        self.dense_columns = isinstance(full.up_proj, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.ctx.enter(x) if self.dense_columns else x)


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

    def hidden_states(self, input_ids, position_ids=None, caches=None):
        x = self.embed(input_ids)
        seq_idx = document_index(position_ids, input_ids.shape[0])  # the full sequence's: SP gathers it for the mixers
        for i, block in enumerate(self.blocks):
            x = block(x, position_ids=position_ids, cache=None if caches is None else caches[i], seq_idx=seq_idx)
        return self.final_norm(x)

    def vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the vocabulary's logits, for every token."""
        return self.lm_head(self.ctx.enter(h), weight=self.head_weight if self.lm_head.weight is None else None)

    def forward(self, input_ids, labels=None, position_ids=None, caches=None):
        h = self.hidden_states(input_ids, position_ids, caches)
        if labels is None:
            return self.ctx.gather_last_dim(self.vocab_logits(h))
        return vocab_parallel_loss(self.ctx, h, self.head_weight, labels)

    def allocate_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        return [b.allocate_cache(batch_size, max_len, device, dtype) for b in self.blocks]


def vocab_parallel_loss(ctx: TPContext, h: torch.Tensor, head_shard: torch.Tensor, labels: torch.Tensor):
    """Mean cross-entropy over labels != -100 (as HybridLM's) with the head's vocabulary rows
    split over TP: kernels.ops' fused head + loss (chunked Triton on GPU, never holding all
    logits), which sums the hidden states' gradient over the group itself."""
    h = ctx.full_sequence(h)
    return ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), head_shard, labels.reshape(-1),
                                    process_group=ctx.group)


def _no_cache_with_sequence_parallel(ctx: TPContext, cache) -> None:
    if cache is not None and ctx.sequence_parallel:
        raise ValueError("decoding with caches runs without sequence parallelism; "
                         "build the TP model with sequence_parallel=False to generate")


def _tp_mixer(block, ctx: TPContext) -> nn.Module:
    if block.kind == "M":
        return TPMamba2(block.mixer, ctx)
    if block.kind == "*":
        return TPAttention(block.mixer, ctx)
    return TPMLP(block.mixer, ctx)


class Sharder:
    """Turns the parts of a HybridLM (identical on every rank of the TP group) into this
    rank's TP forms, weights copied in through parallel/tp_splits.py. Each part is
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
        block.mixer = _tp_mixer(block, self.ctx)
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
