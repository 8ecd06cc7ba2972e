"""Exact parameter counts and training FLOPs per token, per block kind, from the config alone.

    print(format_counts(cfg, seq_len=2048))
    counts = count_parameters(cfg)            # {"embedding": .., "M": .., "*": .., "-": .., ...}
    flops = training_flops_per_token(cfg, seq_len)

The one place these numbers are computed (MFU in TensorBoard and the run's log use them).

Notation: d = d_model, V = vocab_size, T = training sequence length; Mamba2: E = d_inner =
expand*d, P = headdim, h = E/P heads, N = d_state, g = ngroups, w = d_conv, Q = chunk_size,
C = conv_dim = E + 2gN; attention: H query heads, K key/value heads, D = head_dim; MLP:
f = d_ff. Biases add their output width where enabled.

Parameters (equal to sum(p.numel()) of HybridLM(cfg), which the tests check):
- embedding V d; LM head V d when untied (0 when tied); final norm d; every block's norm d.
- M: in_proj d(2E + 2gN + h), conv C w (+ C bias), dt_bias, A_log, D: h each, gated norm E,
  out_proj E d.
- *: q d H D, k and v d K D each, o H D d.
- -: per linear n -> m (gate and up d -> f for SwiGLU, up only for relu2; down f -> d):
  dense n m; lowrank (n + m) R; blockdense R (m + n/B); blockshuffle min(n, m)(n + m)/B,
  plus the self-guided dense path n m while it exists. The first MLP stays dense when
  mlp.dense_first_layer.

FLOPs: a multiply-add is 2 FLOPs; forward FLOPs per token are counted below, and training
is 3 x forward (the backward pass computes two products, for inputs and weights, per
forward product). Elementwise work (norms, activations, gates, softplus, exp, RoPE, the
D skip, softmax) is left out. Causal masks are counted as half the square, Megatron's
convention (torchtitan/PaLM count the full square: 2x our attention-score term).
- any linear n -> m: 2 n m (structured: 2 x its structured parameters; the guide 2 n m).
- M: projections 2d(2E + 2gN + h) + 2Ed; conv 2Cw; the SSD terms of the chunked algorithm:
  intra-chunk scores C_i.B_j per group 2gN(Q/2), scores times x 2hP(Q/2),
  chunk states B^T x 2hPN, state passing across chunks 2hPN/Q, state to output C.s 2hPN.
- *: projections 2d(HD + 2KD) + 2HDd; scores Q K^T 2HD(T/2) and scores times V 2HD(T/2).
- LM head 2dV (the embedding lookup costs nothing).
"""
from __future__ import annotations

from strata.model.config import ATTENTION_BLOCK, BLOCK_KINDS, MAMBA_BLOCK, MLP_BLOCK, BlockSpec, ModelConfig

KIND_NAMES = {MAMBA_BLOCK: "mamba2", ATTENTION_BLOCK: "attention", MLP_BLOCK: "mlp"}


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------

def mamba_block_parameters(cfg: ModelConfig) -> dict[str, int]:
    m, d = cfg.mamba, cfg.d_model
    E, h = m.d_inner(d), m.nheads(d)
    conv_dim, proj_out = m.conv_dim(d), m.in_proj_dim(d)
    bias = int(m.proj_bias)
    return {"norm": d, "in_proj": d * proj_out + bias * proj_out,
            "conv": conv_dim * m.d_conv + int(m.conv_bias) * conv_dim,
            "ssm (dt_bias, A_log, D)": 3 * h, "gated_norm": E, "out_proj": E * d + bias * d}


def attention_block_parameters(cfg: ModelConfig) -> dict[str, int]:
    a, d = cfg.attention, cfg.d_model
    H, K, D = a.n_heads, a.resolved_kv_heads(), a.resolved_head_dim(d)
    bias = int(a.qkv_bias)
    return {"norm": d, "q_proj": d * H * D + bias * H * D, "kv_proj": 2 * (d * K * D + bias * K * D),
            "o_proj": H * D * d}


def _structured_linear_parameters(n: int, m: int, sizes) -> int:
    R, B = sizes.rank, sizes.nblocks
    if sizes.structure == "lowrank":
        return (n + m) * R
    if sizes.structure == "blockdense":
        return R * (m + n // B)
    return min(n, m) * (n + m) // B  # blockshuffle


def mlp_block_parameters(cfg: ModelConfig, dense: bool) -> dict[str, int]:
    """One MLP block; `dense` for the first MLP kept dense (mlp.dense_first_layer)."""
    mlp, d = cfg.mlp, cfg.d_model
    shapes = mlp.linear_shapes(d)
    biases = sum(m for _, m in shapes) if mlp.bias else 0
    if dense or mlp.structure == "dense":
        return {"norm": d, "linears": sum(n * m for n, m in shapes) + biases}
    sizes = mlp.structured_sizes(d)
    counts = {"norm": d, "linears": sum(_structured_linear_parameters(n, m, sizes) for n, m in shapes) + biases}
    if mlp.self_guided:
        counts["guide (dense path, dropped after the guided phase)"] = sum(n * m for n, m in shapes)
    return counts


def block_parameters(cfg: ModelConfig) -> list[dict[str, int]]:
    """Per block of the pattern, its parameters by term."""
    out = []
    for block in cfg.blocks():
        if block.kind == MAMBA_BLOCK:
            out.append(mamba_block_parameters(cfg))
        elif block.kind == ATTENTION_BLOCK:
            out.append(attention_block_parameters(cfg))
        else:
            out.append(mlp_block_parameters(cfg, dense=block.dense_mlp))
    return out


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """{'embedding', 'M', '*', '-', 'final_norm', 'lm_head', 'total'}: block kinds summed over the pattern."""
    counts = {"embedding": cfg.vocab_size * cfg.d_model, **dict.fromkeys(BLOCK_KINDS, 0)}
    for block, terms in zip(cfg.blocks(), block_parameters(cfg)):
        counts[block.kind] += sum(terms.values())
    counts["final_norm"] = cfg.d_model
    counts["lm_head"] = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    counts["total"] = sum(counts.values())
    return counts


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------

def mamba_block_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of one Mamba2 block, by term."""
    m, d = cfg.mamba, cfg.d_model
    E, h = m.d_inner(d), m.nheads(d)
    P, N, g, Q = m.headdim, m.d_state, m.ngroups, m.chunk_size
    return {"projections": 2 * d * m.in_proj_dim(d) + 2 * E * d,
            "conv": 2 * m.conv_dim(d) * m.d_conv,
            "ssd_scores": 2 * g * N * Q / 2, "ssd_scores_x": 2 * h * P * Q / 2,
            "ssd_chunk_states": 2 * h * P * N, "ssd_state_passing": 2 * h * P * N / Q,
            "ssd_state_output": 2 * h * P * N}


def attention_block_flops(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one attention block at training length `seq_len`, by term."""
    a, d = cfg.attention, cfg.d_model
    H, K, D = a.n_heads, a.resolved_kv_heads(), a.resolved_head_dim(d)
    return {"projections": 2 * d * (H * D + 2 * K * D) + 2 * H * D * d,
            "scores": 2 * H * D * seq_len / 2, "scores_v": 2 * H * D * seq_len / 2}


def mlp_block_flops(cfg: ModelConfig, dense: bool) -> dict[str, float]:
    params = mlp_block_parameters(cfg, dense)
    biases = sum(m for _, m in cfg.mlp.linear_shapes(cfg.d_model)) if cfg.mlp.bias else 0
    flops = {"linears": 2 * (params["linears"] - biases)}
    for term, count in params.items():
        if term.startswith("guide"):
            flops[term] = 2 * count
    return flops


def block_forward_flops(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each block of the pattern, in order."""
    return [float(sum(block_flop_terms(cfg, block, seq_len).values())) for block in cfg.blocks()]


def block_flop_terms(cfg: ModelConfig, block: BlockSpec, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block, by term."""
    if block.kind == MAMBA_BLOCK:
        return mamba_block_flops(cfg)
    if block.kind == ATTENTION_BLOCK:
        return attention_block_flops(cfg, seq_len)
    return mlp_block_flops(cfg, dense=block.dense_mlp)


def block_core_flops(cfg: ModelConfig, block: BlockSpec, seq_len: int) -> float:
    """Forward FLOPs per token of the block's mixer core (model/recompute.py), what selective
    recompute runs again: all but its projections (an MLP's activation counts as none)."""
    if block.kind == MLP_BLOCK:
        return 0.0
    return float(sum(v for k, v in block_flop_terms(cfg, block, seq_len).items() if k != "projections"))


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """{'M', '*', '-', 'lm_head', 'total'}: forward FLOPs per token, block kinds summed."""
    flops = dict.fromkeys(BLOCK_KINDS, 0.0)
    for block, cost in zip(cfg.blocks(), block_forward_flops(cfg, seq_len)):
        flops[block.kind] += cost
    flops["lm_head"] = 2 * cfg.d_model * cfg.vocab_size
    flops["total"] = sum(flops.values())
    return flops


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward + backward = 3 x forward, per key of forward_flops_per_token."""
    return {k: 3 * v for k, v in forward_flops_per_token(cfg, seq_len).items()}


# ----------------------------------------------------------------------------------------
# The run's log
# ----------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _blocks(n: int) -> str:
    return f"{n} block" + ("s" if n != 1 else "")


def format_counts(cfg: ModelConfig, seq_len: int | None = None) -> str:
    """Two log lines: parameters (total and per block kind) and training FLOPs per token."""
    seq_len = seq_len or cfg.max_seq_len
    params, flops = count_parameters(cfg), training_flops_per_token(cfg, seq_len)
    present = [k for k in BLOCK_KINDS if cfg.has(k)]
    head = "tied" if cfg.tie_embeddings else _human(params["lm_head"])
    kinds = ", ".join(f"{KIND_NAMES[k]} {_human(params[k])} ({_blocks(cfg.count(k))})" for k in present)
    line1 = (f"parameters: {_human(params['total'])} ({params['total']:,}) = embedding {_human(params['embedding'])}"
             f", {kinds}, lm_head {head}")
    shares = ", ".join(f"{KIND_NAMES[k]} {100 * flops[k] / flops['total']:.0f}%" for k in present)
    line2 = (f"training FLOPs/token at seq_len {seq_len}: {_human(flops['total'])} (3 x forward; "
             f"{shares}, lm_head {100 * flops['lm_head'] / flops['total']:.0f}%)")
    return line1 + "\n" + line2
