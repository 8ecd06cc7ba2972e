"""The model as a layout trains it, torchtitan's parallelize step: what the training loop
imports (cheaply: megatron-core and DeepSpeed's pipeline load only when a layout needs them).

    topo = init_topology(cfg.parallel.tp, cfg.parallel.pp)
    module = parallel_model(HybridLM(cfg.model), topo, seq_len, sequence_parallel)
    engine = build_engine(module, ..., mpu=topo.engine_mpu)
    pp > 1:  loss = engine.train_batch(pipeline_item(batch) for batch in micro_batches)
"""
from __future__ import annotations

from torch import nn

from parallel.topology import Topology


def parallel_model(model: nn.Module, topo: Topology, seq_len: int, sequence_parallel: bool = False) -> nn.Module:
    """The model itself (tp = pp = 1), its tensor-parallel form (pp = 1) or this rank's
    pipeline stage, TP-sharded when tp > 1 (pp > 1: DeepSpeed then builds its PipelineEngine).
    `model` is a HybridLM built with the same seed on every rank."""
    if topo.pp > 1:
        from parallel.pipeline import pipeline_model

        return pipeline_model(model, topo, seq_len, sequence_parallel)
    if topo.tp > 1:
        from parallel.tensor_parallel import tensor_parallel
        from parallel.tp_mappings import TPContext

        return tensor_parallel(model, TPContext.from_parallel_state(sequence_parallel))
    return model


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
