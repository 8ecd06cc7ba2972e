"""Per-rank memory and step time of a training layout, before any GPU is used (`strata plan`).

    spec = RunSpec(model_cfg, seq_len=4096, global_batch=256, micro_batch=4, zero_stage=1)
    plan = plan_layout(spec, Layout(tp=2, pp=2, dp=16, zero_stage=1))
    plan.peak, plan.terms, plan.over(80 * GIB)           # bytes of the fullest rank, by term
    plans = plan_layouts(spec, world_size=64)           # every layout of parallel/layout.py's valid_layouts

No process group and no GPU: parameters come from a HybridLM on the meta device split by
parallel/tensor/splits.py (the TP model's own rules), pipeline stages from the same FLOP-balanced
partition as parallel/pipeline/stages.py, FLOPs from model/counting.py and activations from
model/memory.py. What a rank holds (fp32 weights, torch AdamW, DeepSpeed 0.19's ZeRO):

- weights: 4 bytes per local parameter (ZeRO-3: 1/dp of them, except the small ones it keeps whole);
  2 with bf16 parameters (train.param_dtype=bf16), whose gradients are bf16 too (reduced in fp32) and
  whose optimizer step makes the fp32 gradient of the rank's master partition.
- bf16 weight copies: under autocast each matmul keeps the bf16 copy of its weight for the
  backward, 2 bytes per matmul parameter, ZeRO-3 included (it gathers, autocast copies); none with
  bf16 parameters.
- gradients: 4 bytes per local parameter (ZeRO 2: 1/dp of them; ZeRO-3 holds its partition and the
  optimizer's copy of it throughout). With one micro-batch a step they come into being during the
  backward: the peak holds only those made by then.
- optimizer: AdamW's two fp32 moments, 8 bytes per parameter (ZeRO >= 1: 1/dp), and from ZeRO 1 on
  DeepSpeed's fp32 master copy of the rank's partition (4 bytes / dp), even of fp32 weights.
- DeepSpeed's buffers: at ZeRO 1-3 its reduce bucket, allocated whole (reduce_bucket_size elements
  of fp32 gradients, which parallel/engine/build.py sets to reduce_bucket_elements: DeepSpeed's 5e8,
  1.86 GiB, or the rank's parameters where fewer); at ZeRO-0 the flattened gradients
  of its all-reduce; ZeRO-3's gathered parameters of the running layers (two blocks); under PP the
  pipe buffers (each micro-batch's output until its backward, the gradient received).
- activations: model/memory.py's tensors of this stage's blocks for one micro-batch, times the
  micro-batches in flight (1F1B: pp - stage on stage `stage`, at most the accumulation steps).
- checkpoint.async's snapshot: a copy of what the rank's checkpoint files hold (its weights and
  optimizer states) in host memory, from a save until its background write ends: a term of the peak
  on CPU, and on GPU pinned host memory beside it (Plan.host_snapshot).
- the backward's high point (backward_moments): at the loss (the final norm's and loss's tensors and
  its transient buffers), or inside a recomputed block's backward (its activations are back).

The peak is the higher of the backward and the optimizer step (weights, all gradients, optimizer
states and AdamW's temporaries).

Context parallelism (layout.cp > 1, parallel/context/): a rank's activations are those of its
seq_len / cp tokens, plus per attention block the K and V of the other ranks' tokens that it
gathers (kept for the backward, GQA-repeated as SDPA reads them) and SDPA's boolean mask of its
queries against every key; the CP ranks reduce gradients with the data-parallel ones.
`context_parallel_bytes` is what a rank sends per layer and block kind (bench/ and the step time).

Step time is an estimate for ranking layouts, not a promise: compute at ASSUMED_MFU of the GPU's
peak, the 1F1B bubble, and the TP all-reduces, DP gradient reduction and ZeRO-3 gathers at ring
bandwidth, none of it overlapped.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from strata.model.config import ATTENTION_BLOCK, MAMBA_BLOCK, MLP_BLOCK, ModelConfig
from strata.model.counting import block_core_flops, block_forward_flops, count_parameters, training_flops_per_token
from strata.model.memory import (FP32, NONE, LossMemory, Saved, Shape, block_activations, core_input_bytes, kept_bytes,
                                 loss_activations, recompute_working_set)
from strata.parallel.layout import Layout, layout_problems, valid_layouts

GIB = 2**30
REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size: the most Strata asks for (reduce_bucket_elements)."""
BUCKET = "ZeRO reduce bucket (reduce_bucket_size x fp32)"
BASELINE = "process baseline (CPU: interpreter, libraries, data, DeepSpeed's set-up)"
AT_ENGINE_START = ("weights", "optimizer: fp32 master partition", "ZeRO-3 gradient partition")
"""The plan's terms a rank already holds once its engine is built (AdamW's moments come at the first step)."""
SNAPSHOT = "checkpoint.async host snapshot (weights + optimizer states)"
ZERO3_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's stage3_param_persistence_threshold: smaller parameters stay whole on every rank."""
ASSUMED_MFU = 0.45
"""Share of the GPU's peak that the compute estimate assumes."""


@dataclass(frozen=True)
class Hardware:
    gpu_memory: float = 80 * GIB
    gpus_per_node: int = 8
    tflops: float = 989.4
    """Dense bf16 peak of one GPU (H100 SXM)."""
    intra_node_gbps: float = 300.0
    """All-reduce bus bandwidth between GPUs of a node (NVLink), GB/s."""
    inter_node_gbps: float = 40.0
    """All-reduce bus bandwidth per GPU across nodes (a 400 Gb/s NIC per GPU), GB/s."""


@dataclass(frozen=True)
class RunSpec:
    """What the plan needs of a run besides its layout."""

    model: ModelConfig
    seq_len: int
    global_batch: int
    micro_batch: int
    zero_stage: int = 0
    sequence_parallel: bool = False
    recompute: tuple[str, ...] = ()
    """Each block's mode (TrainConfig.block_recompute); empty: 'none' everywhere."""
    kernels: str = "triton"
    act_bytes: int = 2
    """2 under bf16 autocast (GPU), 4 in fp32."""
    vocab_size: int = 0
    """The vocabulary the model trains (model.vocab_size, or the tokenizer's); 0: model.vocab_size."""
    documents: bool = False
    """data.doc_boundaries: packed rows keep documents apart (model/memory.py Shape.documents)."""
    param_bytes: int = 4
    """4: fp32 parameters (under autocast with act_bytes 2); 2: bf16 parameters with fp32 masters in
    ZeRO's partitions (train.param_dtype=bf16, DeepSpeed's bf16 mode)."""
    async_snapshot: bool = False
    """checkpoint.async: a save keeps a copy of the rank's checkpoint shard in host memory."""

    @property
    def vocab(self) -> int:
        return self.vocab_size or self.model.vocab_size

    def mode(self, block: int) -> str:
        return self.recompute[block] if self.recompute else "none"

    def resolved_model(self) -> ModelConfig:
        return self.model if self.model.vocab_size else replace(self.model, vocab_size=self.vocab)


@dataclass
class Plan:
    spec: RunSpec
    layout: Layout
    stage: int
    """The pipeline stage whose ranks peak highest (0 when pp = 1)."""
    terms: dict[str, float]
    """Bytes per rank at the peak, by term."""
    peak: float
    phase: str
    """'backward' or 'optimizer step': when the peak happens."""
    accumulation: int
    in_flight: int
    activations_by_kind: dict[str, float] = field(default_factory=dict)
    """One micro-batch's kept activations on the peak stage, by block kind."""
    flops_per_token: float = 0.0
    step_time: float = 0.0
    problems: list[str] = field(default_factory=list)
    """Why the layout cannot run at all (e.g. the batch does not divide); empty when it can."""
    host_snapshot: float = 0.0
    """checkpoint.async: host memory of the snapshot a save makes, bytes per rank (on CPU also a term)."""

    def over(self, memory: float) -> bool:
        return bool(self.problems) or self.peak > memory


# ----------------------------------------------------------------------------------------
# Parameters per rank
# ----------------------------------------------------------------------------------------

_LAYERS: dict[tuple[str, int], tuple] = {}


def layer_of(name: str, n_blocks: int) -> int:
    """The pipeline layer (parallel/pipeline/stages.py's order) a HybridLM parameter belongs to."""
    if name.startswith("embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1 if name.startswith("final_norm.") else n_blocks + 2


def _layer_parameters(model: ModelConfig, tp: int) -> tuple[tuple[int, int, int, int], ...]:
    """Per pipeline layer: (parameters on one TP rank, of which matmul weights, the largest one, of
    which in tensors ZeRO-3 never partitions),
    from a HybridLM on the meta device (no memory) split by parallel/tensor/splits.py."""
    key = (repr(model), tp)
    if key not in _LAYERS:
        _LAYERS[key] = _count_layer_parameters(model, tp)
    return _LAYERS[key]


_META: dict[str, torch.nn.Module] = {}


def meta_model(model: ModelConfig) -> torch.nn.Module:
    """HybridLM(model) on the meta device: shapes, no memory. Its init draws nothing there, and
    skipping nn.init.normal_ saves that op's one-time import on meta tensors (a second)."""
    from unittest import mock

    from strata.model.hybrid import HybridLM

    if repr(model) not in _META:
        with torch.device("meta"), mock.patch.object(torch.nn.init, "normal_", lambda t, *args, **kwargs: t):
            _META[repr(model)] = HybridLM(model)
    return _META[repr(model)]


def _count_layer_parameters(model: ModelConfig, tp: int) -> tuple[tuple[int, int, int, int], ...]:
    from strata.parallel.tensor.splits import parameter_splits, split_of

    net = meta_model(model)
    splits = parameter_splits(net, tp)
    n = model.n_blocks
    layers = [[0, 0, 0, 0] for _ in range(n + 3)]
    for name, p in net.named_parameters():
        local = p.numel() if split_of(splits, name).dim is None else p.numel() // tp
        layer = layers[layer_of(name, n)]
        layer[0] += local
        layer[1] += local if p.dim() >= 2 and not name.startswith("embed.") else 0
        layer[2] = max(layer[2], local)
        layer[3] += local if local < ZERO3_PERSISTENCE_THRESHOLD else 0
    if model.tie_embeddings:  # the last stage's head is the embedding: a matmul weight there
        layers[n + 2] = [0, layers[0][0], layers[0][0], 0]
    return tuple(map(tuple, layers))


def stage_bounds(model: ModelConfig, seq_len: int, pp: int) -> list[int]:
    """parallel/pipeline/stages.py's stage_bounds without importing the pipeline (and megatron-core):
    DeepSpeed's partition_balanced over each layer's forward FLOPs (the tests check they agree)."""
    if pp == 1:
        return [0, model.n_blocks + 3]
    key = (repr(model), seq_len, pp)
    if key not in _BOUNDS:  # every TP degree of a world size asks again
        from deepspeed.runtime.utils import partition_balanced

        costs = [0.0, *block_forward_flops(model, seq_len), 0.0, 2.0 * model.d_model * model.vocab_size]
        _BOUNDS[key] = list(partition_balanced(costs, pp))
    return list(_BOUNDS[key])


_BOUNDS: dict[tuple[str, int, int], list[int]] = {}


def stage_parameters(model: ModelConfig, tp: int, pp: int, seq_len: int) -> list[dict]:
    """Per pipeline stage: 'params' one rank holds, 'matmul' of them (bf16 copies under autocast),
    'largest' single parameter, and 'layers' (pipeline layer indices). With tied embeddings and
    pp > 1 the last stage holds the embedding too (DeepSpeed's TiedLayerSpec)."""
    layers = _layer_parameters(model, tp)
    bounds = stage_bounds(model, seq_len, pp)
    n = model.n_blocks
    out = []
    for s in range(pp):
        idx = list(range(bounds[s], bounds[s + 1]))
        held = [layers[i] for i in idx]
        if model.tie_embeddings and n + 2 in idx and 0 not in idx:
            held.append(layers[0])
        out.append({"params": sum(h[0] for h in held), "matmul": sum(h[1] for h in held),
                    "largest": max((h[2] for h in held), default=0), "persistent": sum(h[3] for h in held),
                    "layers": idx})
    return out


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------

def held_at_engine_start(plan: "Plan") -> float:
    """What of the plan exists as soon as the engine is built: the process's size then, less these, is the
    part of a CPU process's RSS that the plan does not model (launcher/plan.py log_memory_plan)."""
    return sum(v for k, v in plan.terms.items() if k.startswith(AT_ENGINE_START))


def reduce_bucket_elements(local_params: int) -> int:
    """The reduce_bucket_size Strata gives DeepSpeed: its default, or the rank's own parameters where they are
    fewer. ZeRO 1-3 allocate the bucket whole at their first backward whatever the model's size (1.86 GiB
    of fp32 for a 4M-parameter model); a bucket larger than every gradient of the rank is never filled."""
    return max(1, min(REDUCE_BUCKET_ELEMENTS, int(local_params)))


def optimizer_terms(info: dict, spec: RunSpec, layout: Layout, cuda: bool, gathered: int,
                    accumulation: int) -> tuple[dict[str, float], dict[str, float], float]:
    """(held through the step, gradients at the backward's peak, extra at the optimizer step) for a
    stage `info` (stage_parameters); `gathered`: parameters of the largest block (ZeRO-3 gathers it)."""
    z, params = spec.zero_stage, info["params"]
    dp = layout.dp * layout.cp  # ZeRO partitions over the context-parallel ranks too
    part = params / dp
    if z == 3:  # small parameters stay whole (stage3_param_persistence_threshold)
        weights = info["persistent"] + (params - info["persistent"]) / dp
    else:
        weights = params
    bf16_params = spec.param_bytes == 2
    held = {f"weights ({'bf16' if bf16_params else 'fp32'})": spec.param_bytes * weights}
    if spec.act_bytes == 2 and not bf16_params:
        held["bf16 weight copies kept by the matmuls (autocast)"] = 2 * info["matmul"]
    held["optimizer: AdamW moments (fp32)"] = 2 * FP32 * (part if z >= 1 else params)
    if z >= 1:
        held["optimizer: fp32 master partition (DeepSpeed ZeRO)"] = FP32 * part
        held[BUCKET] = FP32 * reduce_bucket_elements(params)  # communication_data_type fp32, bf16 parameters too
    if z == 3:  # its partitioned gradients and the optimizer's gradient buffer: flat, held throughout
        if bf16_params:  # its bf16 gradient partition and the optimizer's fp32 copy
            held["ZeRO-3 gradient partition (bf16) and the optimizer's copy (fp32)"] = (2 + FP32) * part
        else:
            held["ZeRO-3 gradient partition and the optimizer's copy (fp32)"] = 2 * FP32 * part
        held["ZeRO-3 gathered parameters (the running layers)"] = spec.param_bytes * 2 * gathered
    if z == 0 and (dp > 1 or layout.pp > 1):  # DeepSpeed flattens the gradients to all-reduce them (<= 5e8 at a time)
        held["gradient all-reduce buffer (DeepSpeed ZeRO-0)"] = FP32 * min(params, REDUCE_BUCKET_ELEMENTS)
    full_grads = spec.param_bytes * (part if z >= 2 else params)
    # Gradients exist at the backward's peak once a micro-batch has finished its backward
    # (accumulation); a step's only backward peaks before most of them are made (backward_moments).
    grad_term = f"gradients ({'bf16' if bf16_params else 'fp32'})"
    grads = {grad_term: full_grads if accumulation > 1 and z < 3 else 0.0}
    # AdamW's temporaries: foreach (CUDA) makes a tensor-list the size of its parameters; the
    # single-tensor loop (CPU) one of the largest parameter.
    step_extra = FP32 * ((part if z >= 1 else params) if cuda else info["largest"])
    if bf16_params:  # the step's fp32 gradient of the rank's master partition
        step_extra += FP32 * part
    return held, grads, step_extra + (full_grads - grads[grad_term])


def backward_moments(kept: list[float], dropped: list[float], in_flight: int, residual_grads: float,
                     loss: LossMemory | None, bucket: float, made: list[float] | None = None) -> list[dict[str, float]]:
    """The bytes at each candidate high point of a stage's backward, by term: at the loss (all blocks'
    kept tensors, the loss's, its transient buffers), and in each recomputed block's backward (the kept
    tensors of the blocks before it and its own, what it recomputes). Other micro-batches in flight
    keep everything meanwhile. `made`: when gradients come into being during this backward (ZeRO 0,
    one micro-batch a step), the gradient bytes made at the loss and by each block, in block order."""
    flight = f"activations ({in_flight} micro-batch{'es' if in_flight > 1 else ''} in flight)"
    others = (in_flight - 1) * sum(kept)
    transient = "transient buffers (loss, gradients in flight)"
    if loss is None:
        moments = [{flight: others + sum(kept), transient: residual_grads}]
    else:
        # ZeRO 1-3 allocate the reduce bucket when the first gradient arrives, after the loss's
        # own buffers are gone: only what exceeds the bucket adds to the peak.
        extra = max(loss.forward_peak, loss.backward_peak) - bucket
        moments = [{flight: others + sum(kept), "loss: final norm, kept gradients / log-softmax":
                    sum(t.bytes for t in loss.saved), transient: max(residual_grads, extra)}]
    made = made or [0.0] * (len(kept) + 1)
    grads = "gradients made so far (fp32)"
    moments[0][grads] = made[-1]
    alive, done = sum(kept), made[-1]
    for k, d, g in zip(reversed(kept), reversed(dropped), reversed(made[:-1])):
        if d:
            moments.append({flight: others + alive, "a recomputed block's activations (in its backward)": d,
                            transient: residual_grads, grads: done})
        alive -= k
        done += g
    return moments


def plan_stage(spec: RunSpec, layout: Layout, stage: int, stages: list[dict], cuda: bool) -> Plan:
    model = spec.resolved_model()
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    info = stages[stage]
    accumulation = max(1, spec.global_batch // (spec.micro_batch * dp))
    in_flight = min(pp - stage, accumulation) if pp > 1 else 1
    residual = FP32 if spec.param_bytes == FP32 or model.residual_in_fp32 else spec.param_bytes
    shape = Shape(spec.micro_batch, spec.seq_len // layout.cp, tp, spec.sequence_parallel, spec.kernels,
                  spec.act_bytes, spec.documents, spec.param_bytes, residual)
    n_blocks = model.n_blocks
    blocks = model.blocks()
    by_kind: dict[str, float] = {}
    kept, dropped, made = [], [], []
    layers = _layer_parameters(model, tp)
    for layer in info["layers"]:
        if not 1 <= layer <= n_blocks:
            continue
        i = layer - 1
        made.append(FP32 * layers[layer][0])
        block = blocks[i]
        terms = block_activations(model, block.kind, shape, dense_mlp=block.dense_mlp)
        terms += context_parallel_terms(model, block.kind, spec, layout.cp, tp)
        kept.append(kept_bytes(terms, spec.mode(i)))
        dropped.append(recompute_working_set(terms, spec.mode(i), core_input_bytes(model, block.kind, shape)))
        by_kind[block.kind] = by_kind.get(block.kind, 0.0) + kept[-1]
    gathered = max((p - small for i, (p, _, _, small) in enumerate(layers) if 1 <= i <= n_blocks), default=0)
    held, grads, step_extra = optimizer_terms(info, spec, layout, cuda, gathered, accumulation)
    loss = loss_activations(model, shape, spec.vocab) if n_blocks + 2 in info["layers"] else None
    residual_grads = 3 * shape.residual_tokens * model.d_model * shape.residual_bytes
    if spec.zero_stage == 0 and accumulation == 1:  # gradients are made during the peak's backward
        untied_embedding = layers[0][0] if 0 in info["layers"] and not model.tie_embeddings else 0
        made.append(FP32 * (info["params"] - sum(layers[i][0] for i in info["layers"] if 1 <= i <= n_blocks)
                            - untied_embedding))  # the head's (the tied embedding's) and final norm's, at the loss
    else:
        made = None
    moments = backward_moments(kept, dropped, in_flight, residual_grads, loss, held.get(BUCKET, 0.0), made)
    terms = {**held, **max(moments, key=lambda m: sum(m.values())), **grads}
    if pp > 1:  # DeepSpeed's pipe buffers: each micro-batch's output kept for its backward, the gradient received
        buffers = 2 if loss is not None else in_flight + 1
        terms["pipeline send/receive buffers"] = buffers * shape.residual_tokens * model.d_model * shape.residual_bytes
    backward = sum(terms.values())
    step = sum(held.values()) + sum(grads.values()) + step_extra
    if step > backward:
        terms = {**held, **grads, "gradients and AdamW temporaries at the step": step_extra}
    terms = {name: v for name, v in terms.items() if v}
    snapshot = host_snapshot_bytes(held) if spec.async_snapshot else 0.0
    if snapshot and not cuda:  # the same memory as the step's: held through it while the write runs
        terms[SNAPSHOT] = snapshot
    return Plan(spec, layout, stage, terms, max(backward, step) + (0.0 if cuda else snapshot),
                "backward" if backward >= step else "optimizer step", accumulation, in_flight, by_kind,
                host_snapshot=snapshot)


def host_snapshot_bytes(held: dict[str, float]) -> float:
    """What a rank's checkpoint files hold, copied by checkpoint.async: its weights and optimizer states."""
    return sum(v for name, v in held.items() if name.startswith(("weights", "optimizer:")))


def plan_layout(spec: RunSpec, layout: Layout, hardware: Hardware = Hardware(), cuda: bool = True,
                stage: int | None = None) -> Plan:
    """The plan of the layout's fullest stage (or of `stage`), with FLOPs and step time."""
    model = spec.resolved_model()
    layout = Layout(layout.tp, layout.pp, layout.dp, spec.zero_stage, cp=layout.cp)
    stages = stage_parameters(model, layout.tp, layout.pp, spec.seq_len)
    candidates = [plan_stage(spec, layout, s, stages, cuda) for s in (range(layout.pp) if stage is None else [stage])]
    plan = max(candidates, key=lambda p: p.peak)
    plan.problems = run_problems(spec, layout)
    plan.flops_per_token = flops_per_token(spec)
    plan.step_time = step_time(spec, layout, stages, plan.accumulation, hardware)
    return plan


def run_problems(spec: RunSpec, layout: Layout) -> list[str]:
    per_step = spec.micro_batch * layout.dp
    problems = layout_problems(spec.model, layout.tp, layout.pp, layout.world_size, spec.zero_stage,
                               spec.sequence_parallel, spec.seq_len, spec.vocab, layout.cp)
    if spec.global_batch % per_step:
        problems.append(f"train.global_batch_size={spec.global_batch} is not a multiple of micro-batch "
                        f"{spec.micro_batch} x dp {layout.dp}")
    return problems


def plan_layouts(spec: RunSpec, world_size: int, hardware: Hardware = Hardware(), cp: int = 1) -> list[Plan]:
    """A plan for every layout parallel/layout.py accepts on world_size ranks beside `cp`, in its order."""
    layouts = valid_layouts(spec.model, world_size, cp=cp, zero_stage=spec.zero_stage,
                            sequence_parallel=spec.sequence_parallel, seq_len=spec.seq_len, vocab_size=spec.vocab)
    return [plan_layout(spec, layout, hardware) for layout in layouts]


# ----------------------------------------------------------------------------------------
# FLOPs and time
# ----------------------------------------------------------------------------------------

def recompute_flops_per_token(spec: RunSpec) -> float:
    """Forward FLOPs per token that recompute adds (the recomputed parts run twice)."""
    model, extra = spec.model, 0.0
    full = block_forward_flops(model, spec.seq_len)
    for block in model.blocks():
        mode = spec.mode(block.index)
        extra += full[block.index] if mode == "full" else \
            block_core_flops(model, block, spec.seq_len) if mode == "selective" else 0.0
    return extra


def flops_per_token(spec: RunSpec) -> float:
    return training_flops_per_token(spec.resolved_model(), spec.seq_len)["total"] + recompute_flops_per_token(spec)


def _ring(bytes_: float, ranks: int, gbps: float) -> float:
    return 2 * (ranks - 1) / ranks * bytes_ / (gbps * 1e9) if ranks > 1 else 0.0


def step_time(spec: RunSpec, layout: Layout, stages: list[dict], accumulation: int, hw: Hardware) -> float:
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    tokens = spec.global_batch * spec.seq_len
    compute = tokens * flops_per_token(spec) / layout.world_size / (hw.tflops * 1e12 * ASSUMED_MFU)
    compute *= 1 + (pp - 1) / accumulation  # 1F1B: pp - 1 idle micro-batch slots per step
    tp_bw = hw.intra_node_gbps if tp <= hw.gpus_per_node else hw.inter_node_gbps
    dp_bw = hw.intra_node_gbps if layout.world_size <= hw.gpus_per_node else hw.inter_node_gbps
    micro = spec.micro_batch * spec.seq_len * spec.model.d_model * spec.act_bytes
    blocks = max(sum(1 for i in s["layers"] if 1 <= i <= spec.model.n_blocks) for s in stages)
    reruns = sum(1 for i in range(spec.model.n_blocks) if spec.mode(i) == "full") / max(1, pp)
    tp_comm = accumulation * (2 * blocks + reruns) * _ring(micro, tp, tp_bw)
    params = max(s["params"] for s in stages)
    dp_comm = _ring(FP32 * params, dp * layout.cp, dp_bw) * (2.5 if spec.zero_stage == 3 else 1.0)
    pp_comm = 2 * accumulation * micro / (tp_bw * 1e9) if pp > 1 else 0.0
    return compute + tp_comm + dp_comm + pp_comm + context_parallel_time(spec, layout, accumulation, hw)


def context_parallel_bytes(model: ModelConfig, micro_batch: int, seq_len: int, cp: int,
                           act_bytes: int, tp: int = 1) -> dict[str, float]:
    """Bytes one rank sends per layer of each block kind in the forward, as parallel/context/ gathers
    (a ring all-gather sends cp - 1 times a rank's part; the backward's reduce-scatter as much again):
    attention its tokens' K and V; Mamba2 its two pieces' final states (fp32) and decays, and their
    last d_conv - 1 conv inputs; an MLP nothing. Under TP, of the rank's heads (and groups) only."""
    if cp == 1:
        return {}
    m, a = model.mamba, model.attention
    local = seq_len // cp
    head_dim = a.resolved_head_dim(model.d_model)
    kv_heads = max(1, a.resolved_kv_heads() // tp)  # split, or the one replicated head a rank uses
    state = m.nheads(model.d_model) // tp * (m.headdim * m.d_state + 1) * FP32
    halo = (m.d_conv - 1) * m.conv_dim(model.d_model) // tp * act_bytes
    return {MAMBA_BLOCK: (cp - 1) * 2 * micro_batch * (state + halo),
            ATTENTION_BLOCK: (cp - 1) * micro_batch * local * 2 * kv_heads * head_dim * act_bytes,
            MLP_BLOCK: 0.0}


def context_parallel_terms(model: ModelConfig, kind: str, spec: RunSpec, cp: int, tp: int = 1) -> list[Saved]:
    """What CP adds to an attention block's kept tensors: the gathered K and V of the other ranks'
    tokens, repeated to every query head, and SDPA's mask of this rank's queries against every key
    (per row with packed documents). Both are inside the core: recompute drops them."""
    if cp == 1 or kind != ATTENTION_BLOCK:
        return []
    a = model.attention
    local, others = spec.seq_len // cp, spec.seq_len - spec.seq_len // cp
    kv = 2 * spec.micro_batch * others * a.n_heads // tp * a.resolved_head_dim(model.d_model) * spec.act_bytes
    mask = (spec.micro_batch if spec.documents else 1) * local * spec.seq_len
    return [Saved("context parallel: the other ranks' K and V (gathered, GQA-repeated)", kv, NONE),
            Saved("context parallel: SDPA's mask of the local queries against every key (bool)", mask, NONE)]


def context_parallel_time(spec: RunSpec, layout: Layout, accumulation: int, hw: Hardware) -> float:
    """The CP gathers (forward) and reduce-scatters (backward) of a step, not overlapped."""
    sent = context_parallel_bytes(spec.model, spec.micro_batch, spec.seq_len, layout.cp, spec.act_bytes, layout.tp)
    if not sent:
        return 0.0
    per_micro_batch = sum(2 * sent[block.kind] for block in spec.model.blocks()) / layout.pp
    bandwidth = hw.intra_node_gbps if layout.tp * layout.cp <= hw.gpus_per_node else hw.inter_node_gbps
    return accumulation * per_micro_batch / (bandwidth * 1e9)


def total_parameters(spec: RunSpec) -> int:
    return count_parameters(spec.resolved_model())["total"]

