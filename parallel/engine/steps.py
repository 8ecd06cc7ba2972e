"""A training step's micro-batches and an evaluation batch through the engine, whichever engine
the layout built: the one place that knows DeepSpeed's pipeline engine runs a step's micro-batches
itself (1F1B) and returns the loss to every stage, while the plain engine runs forward, backward and
step per micro-batch. The training loop (launcher/train.py) calls these and nothing else of it.

    losses = train_micro_batches(engine, topo, batches, gate=spikes.gate, autocast=ctx)
    grad_norm = engine.get_global_grad_norm()   # every layout records it (engine.build.record_grad_norm)
    loss = eval_loss(engine, topo, batch)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from strata.parallel.engine.parallelize import pipeline_item
from strata.parallel.guard import poison_non_finite
from strata.parallel.topology import Topology


def train_micro_batches(engine, topo: Topology, batches: Iterable[dict],
                        gate: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                        ) -> list[torch.Tensor]:
    """One optimizer step over `batches` (engine.gradient_accumulation_steps() of them, drawn as
    the engine needs them). Returns the losses, detached and on the device (read once per step by
    the caller: no host synchronisation per micro-batch). `gate` may poison a micro-batch's loss (the spike
    guard); a non-finite loss is poisoned always (parallel/guard.py). `autocast` is entered where
    the engine's forward does not enter it itself (the pipeline's stages)."""
    if topo.pp > 1:
        with autocast():
            return [engine.train_batch(pipeline_item(batch) for batch in batches).detach()]
    losses = []
    for batch in batches:
        loss = engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))
        engine.backward(poison_non_finite(gate(loss)))
        engine.step()
        losses.append(loss.detach())
    return losses


def eval_loss(engine, topo: Topology, batch: dict) -> torch.Tensor:
    """The mean loss of one held-out batch, on every rank (the pipeline sends it to every stage)."""
    if topo.pp > 1:
        return engine.eval_batch(iter([pipeline_item(batch)]), num_micro_batches=1)
    return engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"))

