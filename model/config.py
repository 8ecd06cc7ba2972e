"""The model's part of the config schema. Every field has a docstring; the loader
in launcher/config.py reads YAML into these and calls `validate()`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAMBA_BLOCK, ATTENTION_BLOCK, MLP_BLOCK = "M", "*", "-"
"""The letters of ModelConfig.pattern. Only this module reads a pattern: everything else asks
ModelConfig.blocks() and compares a BlockSpec's kind with these names."""
BLOCK_KINDS = {MAMBA_BLOCK: "Mamba2 mixer", ATTENTION_BLOCK: "attention", MLP_BLOCK: "MLP"}


@dataclass(frozen=True)
class BlockSpec:
    """One block of the pattern, as the model builds it."""

    index: int
    """Position in the pattern (0-based; the model's blocks.<index>)."""
    kind: str
    """MAMBA_BLOCK, ATTENTION_BLOCK or MLP_BLOCK."""
    dense_mlp: bool = False
    """An MLP block whose linears are dense: mlp.structure is dense, or it is the first MLP and
    mlp.dense_first_layer keeps it dense."""


@dataclass
class MambaConfig:
    d_state: int = 64
    """SSM state size N per head."""
    d_conv: int = 4
    """Width of the causal depthwise convolution over x, B and C."""
    expand: int = 2
    """d_inner = expand * d_model."""
    headdim: int = 32
    """Channels per SSM head P; nheads = d_inner / headdim."""
    ngroups: int = 1
    """Groups sharing B and C (like GQA for SSMs); must divide nheads."""
    chunk_size: int = 64
    """Chunk length of the SSD algorithm (training and prompt processing)."""
    dt_min: float = 0.001
    """Lower end of the log-uniform draw of the initial dt."""
    dt_max: float = 0.1
    """Upper end of the log-uniform draw of the initial dt."""
    dt_init_floor: float = 1e-4
    """Smallest initial dt after the draw."""
    dt_limit: list[float] = field(default_factory=lambda: [0.0, math.inf])
    """[low, high]: every dt = softplus(dt + dt_bias) is clamped to it, in training, prompts and
    decoding alike (mamba_ssm's dt_limit, transformers' time_step_limit; NemotronH's is
    [time_step_min, .inf] before transformers 5.25). [0.0, .inf] clamps nothing."""
    A_init_min: float = 1.0
    """Lower end of the uniform draw of -A at init (A = -exp(A_log))."""
    A_init_max: float = 16.0
    """Upper end of the uniform draw of -A at init."""
    conv_bias: bool = True
    """Bias in the causal conv."""
    proj_bias: bool = False
    """Bias in in_proj and out_proj."""

    def d_inner(self, d_model: int) -> int:
        """Width of x (and z, and the gated norm): expand * d_model."""
        return self.expand * d_model

    def nheads(self, d_model: int) -> int:
        """SSM heads: d_inner / headdim."""
        return self.d_inner(d_model) // self.headdim

    def bc_dim(self) -> int:
        """Width of B (and of C): ngroups * d_state."""
        return self.ngroups * self.d_state

    def conv_dim(self, d_model: int) -> int:
        """Channels of the causal conv: x, B and C."""
        return self.d_inner(d_model) + 2 * self.bc_dim()

    def in_proj_dim(self, d_model: int) -> int:
        """Outputs of in_proj: z, x, B, C and dt."""
        return 2 * self.d_inner(d_model) + 2 * self.bc_dim() + self.nheads(d_model)

    def validate(self, d_model: int) -> None:
        d_inner = self.d_inner(d_model)
        if d_inner % self.headdim:
            raise ValueError(f"headdim: {self.headdim} does not divide d_inner = expand*d_model = {d_inner}; "
                             f"try headdim={_nearest_divisor(d_inner, self.headdim)}")
        nheads = self.nheads(d_model)
        if nheads % self.ngroups:
            raise ValueError(f"ngroups: {self.ngroups} does not divide the {nheads} SSM heads; "
                             f"try ngroups={_nearest_divisor(nheads, self.ngroups)}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min: need 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] < self.dt_limit[1]:
            raise ValueError(f"dt_limit: need [low, high] with 0 <= low < high (high may be .inf), "
                             f"got {self.dt_limit}")
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ValueError(f"A_init_min: need 0 < A_init_min <= A_init_max, got {self.A_init_min}, {self.A_init_max}")
        for name in ("d_state", "d_conv", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")


@dataclass
class AttentionConfig:
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int = 0
    """Key/value heads (GQA); 0 means n_heads (MHA). Must divide n_heads."""
    head_dim: int = 0
    """Channels per head; 0 means d_model / n_heads."""
    rope: bool = True
    """Rotary position embeddings on queries and keys (hybrids often drop them)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_fraction: float = 1.0
    """Share of each head's channels that RoPE rotates (transformers' partial_rotary_factor; Bamba-9B
    uses 0.5): the first int(head_dim * rope_fraction) channels, rotate-half within them and
    frequencies theta^(-2i / rotary channels); the rest pass unrotated. Must give an even number > 0."""
    qkv_bias: bool = False
    """Bias in the q, k, v projections."""

    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def rotary_dim(self, d_model: int) -> int:
        """Channels RoPE rotates in each head: the first int(head_dim * rope_fraction), as transformers
        truncates; 0 without RoPE."""
        return int(self.resolved_head_dim(d_model) * self.rope_fraction) if self.rope else 0

    def validate(self, d_model: int) -> None:
        if self.n_heads < 1:
            raise ValueError(f"n_heads: must be positive, got {self.n_heads}")
        if not self.head_dim and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model={d_model}; "
                             f"try n_heads={_nearest_divisor(d_model, self.n_heads)} or set head_dim")
        if self.n_heads % self.resolved_kv_heads():
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                             f"try n_kv_heads={_nearest_divisor(self.n_heads, self.n_kv_heads)}")
        head_dim = self.resolved_head_dim(d_model)
        if self.rope and self.rope_fraction == 1.0 and head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
        rotary = self.rotary_dim(d_model)
        if self.rope and not (0 < self.rope_fraction <= 1 and rotary > 0 and rotary % 2 == 0):
            near = min(max(2, 2 * round(head_dim * self.rope_fraction / 2)), head_dim - head_dim % 2)
            raise ValueError(f"rope_fraction: {self.rope_fraction} of head_dim {head_dim} rotates {rotary} "
                             f"channels; RoPE needs an even number > 0; try rope_fraction={near / head_dim:g}")


STRUCTURES = ("dense", "lowrank", "blockdense", "blockshuffle")
GUIDE_SCHEDULES = ("cosine", "linear")
FRACTION_TOLERANCE = 0.01
"""How far (absolute) the parameter fraction reached by integer sizes may be from the target."""


@dataclass
class StructuredSizes:
    """Sizes derived from MLPConfig for one MLP (shared by its linears, as in the paper)."""
    structure: str
    rank: int
    nblocks: int
    fraction: float
    """Structured parameters / dense parameters of the whole MLP (biases excluded)."""


@dataclass
class MLPConfig:
    d_ff: int = 0
    """Hidden width; 0 means 4*d_model for relu2 and 8/3*d_model (rounded up to 64) for swiglu."""
    activation: str = "swiglu"
    """'swiglu' (gate, up, down) or 'relu2' (squared ReLU: up, down; as NemotronH)."""
    bias: bool = False
    """Bias in the MLP linears."""
    structure: str = "dense"
    """'dense', or a structured MLP (Wei et al., NeurIPS 2024) whose every linear is 'lowrank'
    (U V x), 'blockdense' (U blockdiag(V_1..V_B) x) or 'blockshuffle' (two block-diagonal
    factors with a stride-B shuffle between them, Monarch-like)."""
    param_fraction: float = 0.0
    """Target share of the dense MLP's parameters (e.g. 0.63, 0.32); derives rank (lowrank,
    blockdense) or nblocks (blockshuffle). 0 means rank / nblocks are given explicitly."""
    rank: int = 0
    """Inner width R of lowrank and blockdense when param_fraction is 0."""
    nblocks: int = 0
    """Blocks B of blockdense and blockshuffle; must divide d_model and d_ff. For blockdense
    with param_fraction, 0 means 4; for blockshuffle it is derived from param_fraction."""
    dense_first_layer: bool = True
    """Keep the first MLP block of the pattern dense, as the paper does."""
    self_guided: bool = False
    """Self-guided training: o = a W x + (1 - a) S(x) with a dense W initialised to the
    structured product; a decays from 1 to 0 over the guided phase, then W is dropped."""
    guide_ratio: float = 0.5
    """The guided phase ends (a = 0, dense path dropped) at step guide_ratio * total steps."""
    guide_schedule: str = "cosine"
    """Decay of a over the guided phase: 'cosine' or 'linear'."""
    guide_stochastic: bool = True
    """Per MLP layer and step, skip the dense path with probability 1 - a (the paper's runs;
    about halves the guided phase's extra FLOPs). Drawn from (seed, step, layer): exact on resume."""
    equal_flops: bool = False
    """Extend training by the steps that bring this run's FLOPs (guided phase included) to the
    dense model's budget over the configured steps (the paper's equal-FLOPs protocol)."""

    def resolved_d_ff(self, d_model: int) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation == "relu2":
            return 4 * d_model
        return 64 * math.ceil(8 * d_model / 3 / 64)

    def linear_shapes(self, d_model: int) -> list[tuple[int, int]]:
        """(in, out) of the MLP's linears: gate and up (swiglu) or up, then down."""
        d_ff = self.resolved_d_ff(d_model)
        ups = 2 if self.activation == "swiglu" else 1
        return [(d_model, d_ff)] * ups + [(d_ff, d_model)]

    def structured_sizes(self, d_model: int) -> StructuredSizes:
        """The rank / nblocks each structured linear uses; raises ValueError('field: ...')
        when the config cannot be met (the message names the nearest valid values)."""
        if self.structure == "lowrank":
            return _lowrank_sizes(self, d_model)
        if self.structure == "blockdense":
            return _blockdense_sizes(self, d_model)
        if self.structure == "blockshuffle":
            return _blockshuffle_sizes(self, d_model)
        return StructuredSizes("dense", 0, 0, 1.0)

    def validate(self, d_model: int) -> None:
        if self.activation not in ("swiglu", "relu2"):
            raise ValueError(f"activation: {self.activation!r} is not one of 'swiglu', 'relu2'")
        if self.d_ff < 0:
            raise ValueError(f"d_ff: must be >= 0, got {self.d_ff}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure: {self.structure!r} is not one of {', '.join(map(repr, STRUCTURES))}")
        if not 0 <= self.param_fraction < 1:
            raise ValueError(f"param_fraction: must be in [0, 1), got {self.param_fraction}")
        if self.rank < 0 or self.nblocks < 0:
            raise ValueError(f"{'rank' if self.rank < 0 else 'nblocks'}: must be >= 0")
        if self.structure == "dense":
            for name in ("param_fraction", "rank", "nblocks", "self_guided", "equal_flops"):
                if getattr(self, name):
                    raise ValueError(f"{name}: set, but structure is 'dense'; choose one of "
                                     f"{', '.join(map(repr, STRUCTURES[1:]))} or unset it")
        if not 0 < self.guide_ratio <= 1:
            raise ValueError(f"guide_ratio: must be in (0, 1], got {self.guide_ratio}")
        if self.guide_schedule not in GUIDE_SCHEDULES:
            raise ValueError(f"guide_schedule: {self.guide_schedule!r} is not one of "
                             f"{', '.join(map(repr, GUIDE_SCHEDULES))}")
        self.structured_sizes(d_model)


def _dense_params(cfg: MLPConfig, d_model: int) -> int:
    return sum(n * m for n, m in cfg.linear_shapes(d_model))


def _check_nblocks(cfg: MLPConfig, d_model: int, nblocks: int) -> None:
    g = math.gcd(d_model, cfg.resolved_d_ff(d_model))
    if nblocks < 1 or g % nblocks:
        raise ValueError(f"nblocks: {nblocks} does not divide d_model={d_model} and d_ff="
                         f"{cfg.resolved_d_ff(d_model)}; nearest valid: {_nearest_divisors(g, nblocks)}")


def _lowrank_sizes(cfg: MLPConfig, d_model: int) -> StructuredSizes:
    per_rank = sum(n + m for n, m in cfg.linear_shapes(d_model))
    dense = _dense_params(cfg, d_model)
    rank = cfg.rank
    if cfg.param_fraction:
        rank = _rank_for_fraction(cfg, per_rank / dense, step=1, sizes="rank={}")
    elif rank < 1:
        raise ValueError("rank: lowrank needs rank >= 1 or param_fraction > 0")
    return StructuredSizes("lowrank", rank, 0, rank * per_rank / dense)


def _blockdense_sizes(cfg: MLPConfig, d_model: int) -> StructuredSizes:
    nblocks = cfg.nblocks or (4 if cfg.param_fraction else 0)
    if nblocks < 1:
        raise ValueError("nblocks: blockdense needs nblocks >= 1 (or param_fraction > 0, which defaults it to 4)")
    _check_nblocks(cfg, d_model, nblocks)
    per_rank = sum(m + n / nblocks for n, m in cfg.linear_shapes(d_model))
    dense = _dense_params(cfg, d_model)
    rank = cfg.rank
    if cfg.param_fraction:
        rank = _rank_for_fraction(cfg, per_rank / dense, step=nblocks, sizes=f"rank={{}}, nblocks={nblocks}")
    elif rank < 1 or rank % nblocks:
        near = sorted({max(nblocks, nblocks * (rank // nblocks)), nblocks * (rank // nblocks + 1)})
        raise ValueError(f"rank: {rank} is not a positive multiple of nblocks={nblocks}; "
                         f"nearest valid: {' or '.join(map(str, near))}")
    return StructuredSizes("blockdense", rank, nblocks, rank * per_rank / dense)


def _blockshuffle_fraction(cfg: MLPConfig, d_model: int, nblocks: int) -> float:
    structured = sum(min(n, m) * (n + m) / nblocks for n, m in cfg.linear_shapes(d_model))
    return structured / _dense_params(cfg, d_model)


def _blockshuffle_sizes(cfg: MLPConfig, d_model: int) -> StructuredSizes:
    if cfg.param_fraction and cfg.nblocks:
        raise ValueError("nblocks: blockshuffle derives nblocks from param_fraction; set only one of them")
    if not cfg.param_fraction:
        if cfg.nblocks < 1:
            raise ValueError("nblocks: blockshuffle needs nblocks >= 1 or param_fraction > 0")
        _check_nblocks(cfg, d_model, cfg.nblocks)
        return StructuredSizes("blockshuffle", 0, cfg.nblocks,
                               _blockshuffle_fraction(cfg, d_model, cfg.nblocks))
    g = math.gcd(d_model, cfg.resolved_d_ff(d_model))
    valid = {b: _blockshuffle_fraction(cfg, d_model, b) for b in range(1, g + 1) if g % b == 0}
    nblocks = min(valid, key=lambda b: abs(valid[b] - cfg.param_fraction))
    if abs(valid[nblocks] - cfg.param_fraction) > FRACTION_TOLERANCE:
        below = [b for b in valid if valid[b] < cfg.param_fraction]
        above = [b for b in valid if valid[b] > cfg.param_fraction]
        near = ([min(below)] if below else []) + ([max(above)] if above else [])
        raise ValueError(f"param_fraction: {cfg.param_fraction} is not reachable by blockshuffle at d_model="
                         f"{d_model}, d_ff={cfg.resolved_d_ff(d_model)}; nearest valid: "
                         + " or ".join(f"{valid[b]:.4g} (nblocks={b})" for b in near))
    return StructuredSizes("blockshuffle", 0, nblocks, valid[nblocks])


ALIGNMENTS = (64, 32, 16, 8, 1)
"""Rank granularities tried in turn when a rank is derived from param_fraction: GPU matmuls
on widths that are not multiples of 8 (16 bytes in bf16) run several times slower."""


def _rank_for_fraction(cfg: MLPConfig, share_per_rank: float, step: int, sizes: str) -> int:
    """The rank nearest the target share, on the coarsest granularity (a multiple of `step`
    times one of ALIGNMENTS) that still lands within FRACTION_TOLERANCE; otherwise an error
    naming the ranks on either side."""
    for align in ALIGNMENTS:
        unit = step * align
        exact = cfg.param_fraction / share_per_rank / unit
        candidates = sorted({max(1, math.floor(exact)), max(1, math.ceil(exact))})
        rank = unit * min(candidates, key=lambda c: abs(c * unit * share_per_rank - cfg.param_fraction))
        if abs(rank * share_per_rank - cfg.param_fraction) <= FRACTION_TOLERANCE:
            return rank
    raise ValueError(f"param_fraction: {cfg.param_fraction} is not reachable by {cfg.structure} at these "
                     "widths; nearest valid: " + " or ".join(
                         f"{c * unit * share_per_rank:.4g} ({sizes.format(c * unit)})" for c in candidates))


@dataclass
class ModelConfig:
    pattern: str = "M-*-M-"
    """Layer pattern, one letter a block: 'M' Mamba2 mixer, '*' attention, '-' MLP."""
    d_model: int = 256
    """Residual stream width."""
    vocab_size: int = 0
    """Vocabulary size; 0 means the tokenizer's. Must be >= the tokenizer's."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts (training windows, prompts plus generated tokens)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share the input embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and linears; residual output projections get init_std/sqrt(2*n_blocks)."""
    residual_in_fp32: bool = False
    """Keep the residual stream in fp32 whatever the weights' dtype (mamba_ssm's and transformers'
    residual_in_fp32): each block adds its output to an fp32 residual and reads it in the weights'
    dtype. Training (fp32 weights under bf16 autocast) keeps an fp32 stream either way; this
    matters for a model whose weights are bf16 or fp16."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """Mamba2 mixer settings (for 'M' blocks)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention settings (for '*' blocks)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """MLP settings (for '-' blocks)."""

    def blocks(self) -> list[BlockSpec]:
        """The pattern read: each block's kind, and which MLP is dense."""
        first_mlp = self.pattern.find(MLP_BLOCK)
        return [BlockSpec(i, kind, kind == MLP_BLOCK and (self.mlp.structure == "dense" or
                                                    (self.mlp.dense_first_layer and i == first_mlp)))
                for i, kind in enumerate(self.pattern)]

    def has(self, kind: str) -> bool:
        """Whether any block is of `kind`."""
        return kind in self.pattern

    def count(self, kind: str) -> int:
        return self.pattern.count(kind)

    @property
    def n_blocks(self) -> int:
        return len(self.pattern)

    def validate(self) -> None:
        bad = sorted(set(self.pattern) - set(BLOCK_KINDS))
        if not self.pattern or bad:
            raise ValueError(f"pattern: {self.pattern!r} has letters {bad or 'none'}; use only "
                             + ", ".join(f"'{k}' ({v})" for k, v in BLOCK_KINDS.items()))
        if self.d_model < 1:
            raise ValueError(f"d_model: must be positive, got {self.d_model}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size: must be >= 0, got {self.vocab_size}")
        for name, sub in (("mamba", self.mamba), ("attention", self.attention), ("mlp", self.mlp)):
            try:
                sub.validate(self.d_model)
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from None


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), d))


def _nearest_divisors(n: int, near: int) -> str:
    """The divisors of n just below and above `near`, as 'a or b'."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < near]
    above = [d for d in divisors if d > near]
    return " or ".join(str(d) for d in ([max(below)] if below else []) + ([min(above)] if above else []))
