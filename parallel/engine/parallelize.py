"""The model as a layout trains it, torchtitan's parallelize step: what the training loop
imports (cheaply: megatron-core and DeepSpeed's pipeline load only when a layout needs them).

    topo = init_topology(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    module = parallel_model(HybridLM(cfg.model), topo, seq_len, sequence_parallel,
                            recompute=cfg.train.block_recompute(cfg.model.blocks()),
                            fp8=cfg.train.block_fp8(len(cfg.model.blocks())))
    engine = build_engine(module, ..., mpu=topo.engine_mpu)
    batch = rank_batch(loader_batch, topo)      # cp > 1: this rank's pieces of the rows
    pp > 1:  loss = engine.train_batch(pipeline_item(batch) for batch in micro_batches)
"""
from __future__ import annotations

from torch import nn

from strata.kernels.fp8.recipe import aligned
from strata.model.hybrid import Block
from strata.parallel.config import RECOMPUTE_MODES
from strata.parallel.topology import Topology


def parallel_model(model: nn.Module, topo: Topology, seq_len: int, sequence_parallel: bool = False,
                   recompute: list[str] | None = None, fp8: list[str | None] | None = None) -> nn.Module:
    """The model itself (tp = cp = pp = 1), its tensor-parallel form (pp = 1) or this rank's
    pipeline stage, TP-sharded when tp > 1 (pp > 1: DeepSpeed then builds its PipelineEngine);
    with cp > 1 each of them context-parallel; with activation recompute and FP8 per block as
    `recompute` and `fp8` say (apply_recompute, apply_fp8).
    `model` is a HybridLM built with the same seed on every rank."""
    if topo.pp > 1:
        from strata.parallel.pipeline.stages import pipeline_model

        model = pipeline_model(model, topo, seq_len, sequence_parallel, context_of(topo) if topo.cp > 1 else None)
        return apply_fp8(apply_recompute(model, recompute or []), fp8 or [])
    if topo.tp > 1:
        from strata.parallel.tensor.blocks import tensor_parallel
        from strata.parallel.tensor.mappings import TPContext

        model = tensor_parallel(model, TPContext.from_parallel_state(sequence_parallel))
    if topo.cp > 1:
        from strata.parallel.context.blocks import context_parallel

        model = context_parallel(model, context_of(topo))
    return apply_fp8(apply_recompute(model, recompute or []), fp8 or [])


def fp8_linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears of `module` that can run FP8 (they declare an `fp8_recipe`: model/linear.py,
    model/structured.py, parallel/tensor/linears.py), with their names."""
    return [(name, m) for name, m in module.named_modules() if hasattr(m, "fp8_recipe")]


def apply_fp8(module: nn.Module, fp8: list[str | None]) -> nn.Module:
    """FP8 (train.fp8), set on the big linears of every block `module` holds, whatever its form:
    fp8[i] is block i's recipe, None for bf16 (an empty list: none anywhere; TrainConfig.block_fp8
    makes the list). The LM head is no block's: it stays as it is."""
    for block in module.modules():
        if isinstance(block, Block):
            recipe = fp8[block.layer_idx] if fp8 else None
            for _, linear in fp8_linears(block):
                linear.fp8_recipe = recipe
    return module


def describe_fp8(recipes: list[str | None], module: nn.Module, tokens: int) -> str:
    """The run's line on FP8: its recipe, the blocks in FP8 and those in bf16, and the products that
    stay bf16 for their sizes (`module`'s, this rank's form: a TP shard's own sizes; `tokens` per
    micro-batch). Model FLOPs do not change with it (model/counting.py)."""
    recipe = next(r for r in recipes if r is not None) if any(recipes) else None
    fp8_blocks = [i for i, r in enumerate(recipes) if r is not None]
    bf16_blocks = [i for i, r in enumerate(recipes) if r is None]
    if recipe is None:
        return f"strata: FP8 on no block: train.fp8_keep_bf16 keeps all {len(recipes)} in bf16"
    line = (f"strata: FP8 {recipe} on blocks {_spans(fp8_blocks)} of {len(recipes)}; bf16: "
            + (f"blocks {_spans(bf16_blocks)} and " if bf16_blocks else "") + "the LM head")
    if not aligned(tokens):
        return line + f"; all products stay bf16: {tokens} tokens per micro-batch is not a multiple of 16"
    unaligned = fp8_unaligned(module)
    if unaligned:
        line += "; bf16 for sizes not multiples of 16: " + ", ".join(unaligned)
    return line


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans, start = [], None
    for i, index in enumerate(indices):
        start = index if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ", ".join(spans)


def fp8_unaligned(module: nn.Module) -> list[str]:
    """'name (out, in)' of every matrix an FP8 linear of `module` multiplies by whose sizes FP8 cannot
    take (kernels.ops.fp8_applies: not multiples of 16): its products stay bf16."""
    return [f"{name}.{p_name} {tuple(p.shape)}" for name, m in fp8_linears(module) if m.fp8_recipe is not None
            for p_name, p in m.named_parameters(recurse=False) if p.dim() == 2 and not aligned(*p.shape)]


def apply_recompute(module: nn.Module, recompute: list[str]) -> nn.Module:
    """Activation recompute (train.recompute), set on every block `module` holds, whatever its
    form (HybridLM, its TP form, a pipeline stage): recompute[i] is block i's mode, one of
    RECOMPUTE_MODES (an empty list: 'none' everywhere; TrainConfig.block_recompute makes the
    list). 'selective' recomputes its mixer's core (model/recompute.py: Mamba2's conv, SSD scan
    and gated norm, attention's RoPE + GQA + SDPA, the MLP's activation) and keeps the matmul
    outputs around it; 'full' recomputes the whole block and keeps only its input."""
    for block in module.modules():
        if isinstance(block, Block):
            mode = recompute[block.layer_idx] if recompute else "none"
            if mode not in RECOMPUTE_MODES:
                raise ValueError(f"recompute: {mode!r} is not one of {', '.join(map(repr, RECOMPUTE_MODES))}")
            block.recompute = mode == "full"
            block.mixer.recompute_core = mode == "selective"
    return module


def context_of(topo: Topology):
    from strata.parallel.context.pieces import CPContext

    return CPContext(topo.get_context_parallel_group(), topo.cp_rank, topo.cp)


def rank_batch(batch: dict, topo: Topology) -> dict:
    """What this rank feeds the model of a loader batch: the rows themselves, or under context
    parallelism this rank's two pieces of every row (input ids, labels, position ids); every CP rank
    of a data-parallel rank reads the same rows (the loader is given the data-parallel rank)."""
    if topo.cp == 1:
        return batch
    ctx = context_of(topo)
    return {key: None if t is None else ctx.shard(t) for key, t in batch.items()}


def pipeline_item(batch: dict) -> tuple:
    """A loader batch as the pipeline engine reads it: (inputs, labels), the inputs
    carrying the position ids when the data has them."""
    positions = batch.get("position_ids")
    inputs = batch["input_ids"] if positions is None else (batch["input_ids"], positions)
    return inputs, batch["labels"]


def deepspeed_pipeline_section(sequence_parallel: bool) -> dict:
    """The "pipeline" section of the DeepSpeed config. DeepSpeed splits the activations sent
    between stages over the TP ranks and gathers them on arrival, which is only right while
    they are replicated over those ranks, i.e. not under sequence parallelism."""
    return {"pipe_partitioned": not sequence_parallel, "grad_partitioned": not sequence_parallel}
