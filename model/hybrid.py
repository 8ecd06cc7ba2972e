"""The hybrid language model, built from a layer pattern (Megatron's / NemotronH's letters).

Each letter is one pre-norm residual block, x + mixer(rmsnorm(x)): 'M' a Mamba2
mixer, '*' attention, '-' an MLP. Embedding in, final RMSNorm, LM head out
(optionally tied). With labels, forward returns the mean cross-entropy through
the fused LM-head loss, never needing the logits.

Packed rows: where position_ids restart at 0, a new document starts (transformers'
padding-free convention; the loader's data.doc_boundaries). forward derives each token's
document once (document_index) and every block keeps documents apart: no conv input, SSM
state or attention crosses a restart. Without a restart nothing changes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from strata.kernels import ops
from strata.model.attention import Attention
from strata.model.config import ATTENTION_BLOCK, MAMBA_BLOCK, BlockSpec, ModelConfig
from strata.model.linear import WHOLE, Projections
from strata.model.mamba2 import Mamba2Mixer
from strata.model.mlp import MLP
from strata.model.norm import RMSNorm
from strata.model.recompute import checkpoint_if
from strata.model.structured import StructuredLinear


def document_index(position_ids: torch.Tensor | None, batch_size: int = 1) -> torch.Tensor | None:
    """seq_idx (b, l) int32, the document of each token (0, 1, ... along each row, a new one where
    position_ids restart at 0), as mamba_ssm's kernels take it; None when no row restarts (or
    without position ids): then every op takes its one-document path."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    restarts = position_ids[..., 1:] == 0
    if not restarts.any():
        return None
    seq_idx = torch.nn.functional.pad(restarts.cumsum(-1, dtype=torch.int32), (1, 0))
    return seq_idx.expand(batch_size, -1) if seq_idx.dim() == 1 else seq_idx


class Block(nn.Module):
    recompute = False
    """Recompute the whole block in the backward, keeping only its input (full recompute;
    model/recompute.py)."""

    def __init__(self, spec: BlockSpec, cfg: ModelConfig, norm: nn.Module | None = None,
                 mixer: nn.Module | None = None):
        """The block `spec` of cfg.pattern. A parallel form passes its own `norm` and `mixer`
        (built with the mixers' own constructors, split) instead of the whole ones."""
        super().__init__()
        self.spec = spec
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = norm if norm is not None else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer if mixer is not None else build_mixer(spec, cfg)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def layer_idx(self) -> int:
        return self.spec.index

    def forward(self, x, position_ids=None, cache=None, seq_idx=None):
        return checkpoint_if(self.recompute and cache is None, self.body, x, position_ids, cache, seq_idx)

    def body(self, x, position_ids=None, cache=None, seq_idx=None):
        """x + mixer(norm(x)); seq_idx: the documents of packed rows (document_index)."""
        # residual_in_fp32: the sum in fp32, the norm reading x in the weights' dtype (as mamba_ssm)
        residual = x.to(torch.promote_types(x.dtype, torch.float32)) if self.residual_in_fp32 else x
        h = self.norm(x.to(self.norm.weight.dtype))
        return residual + self.mixer(h, position_ids=position_ids, cache=cache, seq_idx=seq_idx)

    def allocate_cache(self, batch_size, max_len, device=None, dtype=None):
        return self.mixer.allocate_cache(batch_size, max_len, device, dtype)


def build_mixer(spec: BlockSpec, cfg: ModelConfig, projections: Projections = WHOLE) -> nn.Module:
    """The mixer of block `spec`: the one place a block's kind picks its class."""
    if spec.kind == MAMBA_BLOCK:
        return Mamba2Mixer(cfg.mamba, cfg.d_model, cfg.norm_eps, projections)
    if spec.kind == ATTENTION_BLOCK:
        return Attention(cfg.attention, cfg.d_model, projections)
    return MLP(cfg.mlp, cfg.d_model, spec.index, spec.dense_mlp, projections)


RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj")


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved (>= 1) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(spec, cfg) for spec in cfg.blocks())
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self.declare_no_weight_decay()

    @classmethod
    @torch.no_grad()
    def from_state(cls, cfg: ModelConfig, state: dict, guide_alpha: float | None = None) -> "HybridLM":
        """A model holding `state`'s tensors (built on the meta device and assigned: one copy in
        memory), computing what training computed with them: each structured linear whose dense
        path `state` holds mixes it in at `guide_alpha`; one without it has none (the self-guided
        phase ended before `state` was saved)."""
        with torch.device("meta"):
            model = cls(cfg)
        for name, module in model.named_modules():
            if isinstance(module, StructuredLinear):
                if f"{name}.guide" in state:
                    module.guide_alpha = guide_alpha
                else:
                    module.drop_guide()
        model.load_state_dict(state, assign=True)
        return model

    def declare_no_weight_decay(self) -> None:
        """Marks the parameters weight decay leaves alone (the optimizer reads the mark:
        parallel/engine/build.py; a split form carries it over): the embedding, and every vector (norm
        weights, biases, Mamba2's A_log, D and dt_bias)."""
        for name, p in self.named_parameters():
            if p.dim() < 2 or name == "embed.weight":
                p._no_weight_decay = True

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-style init: N(0, init_std) for embeddings and linears, the residual output
        projections scaled by 1/sqrt(2 * n_blocks) so that the residual stream's variance
        does not grow with depth. Mamba2's own parameters keep their init (conv, dt, A, D)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * len(self.blocks))
        nn.init.normal_(self.embed.weight, std=std)
        for name, module in self.named_modules():
            is_output = name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, StructuredLinear):
                module.reset_parameters(out_std if is_output else std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def documents(self, position_ids, batch_size: int):
        """seq_idx of the rows (document_index); a parallel form that holds part of each row overrides it."""
        return document_index(position_ids, batch_size)

    def hidden_states(self, input_ids, position_ids=None, caches=None):
        x = self.embed(input_ids)
        seq_idx = self.documents(position_ids, input_ids.shape[0])
        for i, block in enumerate(self.blocks):
            x = block(x, position_ids=position_ids, cache=None if caches is None else caches[i], seq_idx=seq_idx)
        return self.final_norm(x).to(self.final_norm.weight.dtype)  # an fp32 residual back to the weights' dtype

    def forward(self, input_ids, labels=None, position_ids=None, caches=None):
        """Returns the mean loss over labels != -100 when labels are given, else the logits (b, l, vocab)."""
        h = self.hidden_states(input_ids, position_ids, caches)
        if labels is None:
            return self.logits(h)
        return self.loss(h, labels)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.head_weight)

    def loss(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The cross-entropy over labels != -100 (mean or sum), through the fused LM-head loss."""
        return ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head_weight, labels.reshape(-1),
                                        reduction=reduction)

    def allocate_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """Per-block decoding state: conv + SSM state for 'M', a KV cache for '*', None for '-'."""
        return [b.allocate_cache(batch_size, max_len, device, dtype) for b in self.blocks]
