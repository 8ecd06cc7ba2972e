"""Activation memory: the tensors a training forward keeps for the backward, per block kind.

    shape = Shape(batch=4, seq_len=4096, tp=2, kernels="triton", act_bytes=2)   # one rank's micro-batch, bf16
    kept_bytes(block_activations(cfg, "M", shape), "selective")   # one Mamba2 block under selective recompute
    loss_activations(cfg, shape).saved                            # the final norm's and the loss's tensors

The list of each kind is read off the forward's code: what every op saves (autograd's saved
tensors, a Triton Function's save_for_backward), views of one storage counted once. The tests
(tests/model/test_memory.py, tests/kernels/test_memory_triton.py) check the lists byte for byte
against the saved tensors of a real forward (torch.autograd.graph.saved_tensors_hooks) for both
kernel paths and every recompute mode, so a forward that starts keeping more fails there.
parallel/plan.py adds the rest of a rank's memory (weights, gradients, optimizer, pipeline).

Two kernel paths keep different tensors:
- "triton" (CUDA): the fused kernels keep their inputs and a few fp32 statistics; the SSD scan keeps
  its inputs, dt after softplus and its cumulative sum, and recomputes the chunk states in the backward.
- "reference" (CPU, STRATA_KERNELS=reference): the PyTorch references, whose autograd keeps every
  intermediate of the chunked SSD (padded fp32 copies, the (L, Q) decay and score matrices, chunk
  states) and of the norms.

Dtypes: the residual stream and statistics are fp32 (the weights are fp32 and a block adds its bf16
output to an fp32 residual; with bf16 parameters the residual is bf16 unless
model.residual_in_fp32); matmul and kernel outputs are in the compute dtype, `act_bytes` (2 under
bf16 autocast, 4 in fp32). Autocast's bf16 copy of a norm's fp32 output is what the next linear
keeps. Under tensor parallelism (`tp`) each rank keeps its heads', groups' and channels' share;
sequence parallelism splits the residual stream and the norms along the sequence.

Recompute (train.recompute, model/recompute.py): each tensor says in which modes it is kept:
'none' keeps all; 'selective' keeps the block input, the norm, and the matmul outputs around the
mixer's core (Mamba2's in_proj output and out_proj input; attention's q, k, v projections and
o_proj input; the MLP's up and gate outputs), and recomputes the core (conv + SSD + gated norm,
RoPE + GQA + SDPA, the activation); 'full' keeps only the block's input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from strata.model.config import ATTENTION_BLOCK, MAMBA_BLOCK, ModelConfig

FP32, INT64 = 4, 8
ALL, NONE_SEL, NONE, SEL = "nsf", "ns", "n", "s"
"""Recompute modes a tensor is kept in, by first letter: none, selective, full."""


@dataclass(frozen=True)
class Saved:
    """One tensor (or a group of same-sized ones) kept for the backward."""

    name: str
    bytes: float
    modes: str = NONE_SEL
    """First letters of the recompute modes that keep it."""

    def kept(self, mode: str) -> bool:
        return mode[0] in self.modes


def kept_bytes(terms: list[Saved], mode: str) -> float:
    return sum(t.bytes for t in terms if t.kept(mode))


@dataclass(frozen=True)
class Shape:
    """The micro-batch as one rank holds it."""

    batch: int
    seq_len: int
    tp: int = 1
    sequence_parallel: bool = False
    kernels: str = "triton"
    act_bytes: int = 2
    documents: bool = False
    """Packed rows whose position ids restart (data.doc_boundaries): attention keeps a block-causal
    mask (not on CUDA's variable-length kernel) and per-row RoPE tables. (Mamba2's document-aware
    conv and scan are counted as without.)"""
    param_bytes: int = 4
    """4: fp32 parameters (bf16 copies under autocast); 2: bf16 parameters (train.param_dtype)."""
    residual_bytes: int = 4
    """The residual stream's: fp32 with fp32 parameters or model.residual_in_fp32, else bf16."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def residual_tokens(self) -> float:
        """Tokens of the residual stream on this rank: split along the sequence under SP."""
        return self.tokens / self.tp if self.sequence_parallel and self.tp > 1 else self.tokens


def norm_terms(d: int, s: Shape, what: str = "block") -> list[Saved]:
    """A pre-norm: its input (the residual), its statistics, and its output as the linears after it
    keep it (gathered over the sequence under SP; autocast's bf16 copy)."""
    n, a = s.residual_tokens, s.act_bytes
    kind = "fp32" if s.residual_bytes == FP32 else "bf16"
    terms = [Saved(f"{what} input ({kind} residual)", n * d * s.residual_bytes, ALL),
             Saved("norm statistics", n * FP32)]
    if s.kernels == "reference":
        terms.append(Saved("norm: normalised input before the weight (reference)", n * d * FP32))
    return terms + [Saved("norm output (input of the projections)", s.tokens * d * a)]


def mamba_terms(cfg: ModelConfig, s: Shape) -> list[Saved]:
    m, d, a, t = cfg.mamba, cfg.d_model, s.act_bytes, s.tp
    E, P, N = m.d_inner(d) // t, m.headdim, m.d_state
    h, g = m.nheads(d) // t, m.ngroups // t
    C, proj = E + 2 * g * N, 2 * E + 2 * g * N + h
    b, l, n = s.batch, s.seq_len, s.tokens
    Q = m.chunk_size
    L = math.ceil(l / Q) * Q
    c = L // Q
    terms = norm_terms(d, s) + [
        Saved("in_proj output (z, x, B, C, dt)", n * proj * a),
        Saved("gated norm output (out_proj input)", n * E * a),
        Saved("A = -exp(A_log)", 2 * h * FP32, NONE)]
    if s.kernels != "reference":
        return terms + [
            Saved("conv output (x, B, C after SiLU)", n * C * a, NONE),
            Saved("SSD output", n * E * a, NONE),
            Saved("SSD dt after softplus and its chunk cumsum (fp32)", 2 * b * h * L * FP32, NONE),
            Saved("gated norm statistics", n * g * FP32, NONE)]
    clamps = tuple(m.dt_limit) != (0.0, math.inf) if hasattr(m, "dt_limit") else False
    return terms + [
        Saved("conv before SiLU (padded) and after", (b * C * (l + m.d_conv - 1) + n * C) * a, NONE),
        Saved("SSD x and x*dt, fp32, padded, and einsum copies (reference)", 4 * b * L * E * FP32, NONE),
        Saved("SSD B and C per head, padded, and einsum copies (reference)", 5 * b * L * h * N * FP32, NONE),
        Saved("SSD intra-chunk decay and scores, (L, Q) per head (reference)", 3 * b * h * L * Q * FP32, NONE),
        Saved("SSD chunk states, before and after passing (reference)", (2 * c + 1) * b * h * P * N * FP32, NONE),
        Saved("SSD dt, decays, masks (reference)",
              ((1 + clamps) * n * h + 3 * b * L * h + b * h * (c + 1) ** 2) * FP32 + 2 * (Q * Q + (c + 1) ** 2),
              NONE),
        Saved("SSD output, D skip, gated norm intermediates (reference)", (4 * n * E + n * g) * FP32, NONE)]


def attention_terms(cfg: ModelConfig, s: Shape) -> list[Saved]:
    att, d, a, t, n = cfg.attention, cfg.d_model, s.act_bytes, s.tp, s.tokens
    H, K, D = att.n_heads // t, att.resolved_kv_heads(), att.resolved_head_dim(d)
    K = K // t if K % t == 0 else 1  # KV heads split, or one replicated head per rank
    terms = norm_terms(d, s) + [
        Saved("q, k, v projections", n * (H + 2 * K) * D * a, SEL),
        Saved("q, k, v as SDPA reads them (after RoPE, GQA repeat)", 3 * n * H * D * a, NONE),
        Saved("attention output (o_proj input)", n * H * D * a),
        Saved("softmax log-sum-exp (fp32)", n * H * FP32, NONE)]
    rows = s.batch if s.documents else 1
    if att.rope:
        terms.append(Saved("RoPE tables (fp32)", 2 * rows * s.seq_len * D * FP32, NONE))
    if s.documents and not (s.kernels == "triton" and a == 2):  # kernels/attention/varlen.py keeps no mask
        terms.append(Saved("block-causal document mask (as SDPA's additive bias)", s.batch * s.seq_len ** 2 * a, NONE))
    return terms


def mlp_terms(cfg: ModelConfig, s: Shape, dense: bool) -> list[Saved]:
    mlp, d, a, t, n = cfg.mlp, cfg.d_model, s.act_bytes, s.tp, s.tokens
    f = mlp.resolved_d_ff(d) // t
    if mlp.activation == "swiglu":
        terms = [Saved("gate and up outputs", 2 * n * f * a), Saved("SiLU(gate)", n * f * a, NONE),
                 Saved("SiLU(gate) * up (down_proj input)", n * f * a, NONE)]
    else:
        terms = [Saved("up output", n * f * a, SEL), Saved("ReLU(up)", n * f * a, NONE),
                 Saved("ReLU(up)^2 (down_proj input)", n * f * a, NONE)]
    if not dense and mlp.structure != "dense":
        sizes = mlp.structured_sizes(d)
        inner = sizes.rank if mlp.structure != "blockshuffle" else min(d, mlp.resolved_d_ff(d)) // t
        linears = len(mlp.linear_shapes(d))
        terms.append(Saved(f"{mlp.structure} inner factor outputs", linears * n * inner * a))
    return norm_terms(d, s) + terms


def block_activations(cfg: ModelConfig, kind: str, s: Shape, dense_mlp: bool = False) -> list[Saved]:
    """What one block of `kind` keeps for one micro-batch on one rank, by tensor."""
    if kind == MAMBA_BLOCK:
        return mamba_terms(cfg, s)
    if kind == ATTENTION_BLOCK:
        return attention_terms(cfg, s)
    return mlp_terms(cfg, s, dense_mlp)


def core_input_bytes(cfg: ModelConfig, kind: str, s: Shape) -> float:
    """The tensors entering a mixer's core (Mamba2: in_proj's output; attention: q, k, v; MLP: up and
    gate): their gradient is made while a recomputed core's activations are back."""
    d, t, n, a = cfg.d_model, s.tp, s.tokens, s.act_bytes
    if kind == MAMBA_BLOCK:
        m = cfg.mamba
        return n * m.in_proj_dim(d) // t * a  # z, x, B, C and dt: each split over the TP ranks
    if kind == ATTENTION_BLOCK:
        att = cfg.attention
        K = att.resolved_kv_heads()
        K = K // t if K % t == 0 else 1
        return n * (att.n_heads // t + 2 * K) * att.resolved_head_dim(d) * a
    return n * cfg.mlp.resolved_d_ff(d) // t * (2 if cfg.mlp.activation == "swiglu" else 1) * a


def recompute_working_set(terms: list[Saved], mode: str, core_input: float = 0.0) -> float:
    """Bytes a recomputed block brings back during its own backward: what its mode dropped, and the
    gradient of its core's input (`core_input`, see core_input_bytes) made meanwhile."""
    return sum(t.bytes for t in terms if not t.kept(mode)) + core_input if mode != "none" else 0.0


@dataclass(frozen=True)
class LossMemory:
    saved: list[Saved]
    """Final norm and loss tensors kept from the forward to the backward."""
    forward_peak: float
    """Extra bytes at the loss's highest point in the forward (logits of a chunk, or all of them)."""
    backward_peak: float
    """Extra bytes at the highest point of the backward (the loss's and the residual's gradients)."""


def loss_activations(cfg: ModelConfig, s: Shape, vocab_size: int | None = None) -> LossMemory:
    """The final norm, the LM head and the cross-entropy, on the last pipeline stage.

    Triton (kernels/cross_entropy): the loss computes its gradients in the forward, chunk by chunk,
    and keeps them (the hidden states' in the compute dtype, the head weight's in the parameters'
    dtype); a chunk's logits are the only vocabulary-wide tensor. Reference: all logits in fp32, the
    log-softmax kept, two more logits-sized gradients at its backward."""
    d, a, n = cfg.d_model, s.act_bytes, s.tokens
    V = (vocab_size or cfg.vocab_size) // s.tp
    norm = norm_terms(d, s, "final norm")
    residual_grads = 3 * s.residual_tokens * d * s.residual_bytes  # the residual's gradient and a norm's two temporaries
    if s.kernels == "reference":
        saved = norm + [Saved("loss: labels (int64)", n * INT64, ALL),
                        Saved("loss: log-softmax of all logits (fp32)", n * V * FP32, ALL)]
        return LossMemory(saved, n * V * FP32, max(2 * n * V * FP32, residual_grads))
    chunk = _cross_entropy_chunk(n, V, d)
    saved = [t for t in norm if not t.name.startswith("norm output")]  # the loss keeps its gradients instead
    saved += [Saved("loss: gradient of the hidden states (computed in the forward)", n * d * a, ALL),
              Saved("loss: gradient of the head weight (computed in the forward)", V * d * s.param_bytes, ALL)]
    # the hidden states and head weight in bf16 under autocast (bf16 parameters need no copy)
    copies = (n * d + V * d) * a if a != s.param_bytes else 0
    return LossMemory(saved, chunk * V * a + copies, residual_grads)


def _cross_entropy_chunk(n: int, vocab: int, dim: int) -> int:
    """Token rows per chunk of the Triton loss (kernels/cross_entropy/kernel.py _default_chunk)."""
    def next_pow2(x: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, x))))
    return max(16, min(next_pow2(n), next_pow2(4 * math.ceil(n / math.ceil(vocab / dim)))))


def saved_bytes(fn, *args, exclude=()) -> int:
    """What the lists above are checked against: bytes of the distinct storages autograd keeps
    for the backward of fn(*args) (torch.autograd.graph.saved_tensors_hooks), those of the
    tensors in `exclude` (the parameters) left out."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(kept.values())
