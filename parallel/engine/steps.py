"""A training step's micro-batches and an evaluation batch through the engine, whichever engine
the layout built: the one place that knows DeepSpeed's pipeline engine runs a step's micro-batches
itself (1F1B) and returns the loss to every stage, while the plain engine runs forward, backward and
step per micro-batch. The training loop (launcher/train.py) calls these and nothing else of it.

    losses, own_norm = train_micro_batches(engine, topo, batches, gate=spikes.gate, autocast=ctx)
    loss = eval_loss(engine, topo, batch)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from strata.parallel.engine.parallelize import pipeline_item
from strata.parallel.guard import poison_non_finite
from strata.parallel.topology import Topology, model_parallel_grad_norm


def train_micro_batches(engine, topo: Topology, batches: Iterable[dict],
                        gate: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                        ) -> tuple[list[torch.Tensor], float]:
    """One optimizer step over `batches` (engine.gradient_accumulation_steps() of them, drawn as
    the engine needs them). Returns the losses, detached and on the device (read once per step by
    the caller: no host synchronisation per micro-batch), and the gradient norm where the engine
    records none (ZeRO stage 0; else NaN). `gate` may poison a micro-batch's loss (the spike
    guard); a non-finite loss is poisoned always (parallel/guard.py). `autocast` is entered where
    the engine's forward does not enter it itself (the pipeline's stages)."""
    if topo.pp > 1:
        with autocast():
            return [engine.train_batch(pipeline_item(batch) for batch in batches).detach()], float("nan")
    losses, own_norm = [], float("nan")
    for batch in batches:
        loss = engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))
        engine.backward(poison_non_finite(gate(loss)))
        own_norm = grad_norm_if_engine_has_none(engine, topo)
        engine.step()
        losses.append(loss.detach())
    return losses, own_norm


def eval_loss(engine, topo: Topology, batch: dict) -> torch.Tensor:
    """The mean loss of one held-out batch, on every rank (the pipeline sends it to every stage)."""
    if topo.pp > 1:
        return engine.eval_batch(iter([pipeline_item(batch)]), num_micro_batches=1)
    return engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))


def grad_norm_if_engine_has_none(engine, topo: Topology) -> float:
    """ZeRO stage 0 clips without recording the norm; at the accumulation boundary
    (after backward, gradients already all-reduced) it is the norm of the full grads,
    every tensor-parallel shard counted once."""
    if engine.zero_optimization_stage() > 0 or not engine.is_gradient_accumulation_boundary():
        return float("nan")
    return model_parallel_grad_norm(engine.module, topo)
