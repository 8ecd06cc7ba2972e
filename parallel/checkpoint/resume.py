"""How a run starts from what its run directory holds, decided once (torchtitan's checkpointer
and Megatron's load_checkpoint make the same four-way choice inline):

  fresh       no checkpoint: the model as initialised;
  weights     a weights-only checkpoint (`strata import`): its weights, a fresh optimizer, step 0;
  as_written  a checkpoint of this very layout: DeepSpeed reloads its own files;
  resharded   another layout (DP size under ZeRO, ZeRO stage, TP or PP degree): the full state is
              read once (reshard.read_full_state) and each rank takes its part.

The training loop asks the plan to prepare the whole model before it is split, and to restore the
engine once it exists; it does not know which case it is in:

    plan = ResumePlan.decide(newest, cfg.model, layout)
    plan.prepare(model)                       # weights, before parallel_model splits the model
    engine = build_engine(parallel_model(model, ...), ...)
    state = plan.restore(engine, rank, topo, lr)   # None, or the trainer state (step, data)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from strata.model.config import ModelConfig
from strata.parallel.checkpoint import consolidate, files as ckpt, reshard
from strata.parallel.checkpoint.rebuild import has_bf16_masters
from strata.parallel.engine.build import apply_schedule_now
from strata.parallel.layout import Layout
from strata.parallel.topology import Topology

FRESH, WEIGHTS, AS_WRITTEN, RESHARDED = "fresh", "weights", "as_written", "resharded"


@dataclass(frozen=True)
class ResumePlan:
    kind: str
    """FRESH, WEIGHTS, AS_WRITTEN or RESHARDED."""
    checkpoint: Path | None
    model_cfg: ModelConfig
    full: reshard.FullState | None = None
    """RESHARDED: the checkpoint's training state in full tensors."""

    @classmethod
    def decide(cls, checkpoint: Path | None, model_cfg: ModelConfig, layout: Layout) -> "ResumePlan":
        """`checkpoint`: the verified one to start from (checkpoint.checkpoint_to_resume), or None."""
        if checkpoint is None:
            return cls(FRESH, None, model_cfg)
        if consolidate.is_weights_only(checkpoint):
            return cls(WEIGHTS, checkpoint, model_cfg)
        saved = ckpt.saved_layout(ckpt.read_manifest(checkpoint))
        if layout.reloads_as_written(saved):
            return cls(AS_WRITTEN, checkpoint, model_cfg)
        return cls(RESHARDED, checkpoint, model_cfg, reshard.read_full_state(checkpoint, model_cfg, saved))

    @property
    def continues_training(self) -> bool:
        """Whether the run goes on from a checkpoint's step, optimizer and schedule (not a fresh
        start, not imported weights)."""
        return self.kind in (AS_WRITTEN, RESHARDED)

    def prepare(self, model: torch.nn.Module) -> None:
        """The checkpoint's weights into the whole model (identical on every rank), before it is
        split; nothing for a fresh start or a checkpoint DeepSpeed reloads itself."""
        if self.kind == WEIGHTS:
            model.load_state_dict(consolidate.consolidate(self.checkpoint, self.model_cfg))
        elif self.kind == RESHARDED:
            reshard.load_full_weights(model, self.full)

    def restore(self, engine, rank: int, topo: Topology, lr: float) -> dict | None:
        """Collective. The optimizer, LR schedule and counters into a built engine, the schedule
        moved to this run's (peak `lr`, train.max_steps...), and the trainer state returned (step,
        data position, the manifest's records); None when the run starts at step 0."""
        if self.kind == WEIGHTS and has_bf16_masters(engine):  # which it rounded from its bf16 module
            weights = consolidate.consolidate(self.checkpoint, self.model_cfg)
            reshard.apply_master_weights(engine, {n: reshard.as_lazy(t) for n, t in weights.items()}, topo.tp_rank,
                                         topo.tp, topo.pp, self.model_cfg)
        if self.kind == AS_WRITTEN:
            state = ckpt.load_checkpoint(engine, self.checkpoint, rank)
        elif self.kind == RESHARDED:
            reshard.apply_optimizer_state(engine, self.full, topo.tp_rank, topo.tp, topo.pp, self.model_cfg)
            state = ckpt.load_trainer_state(self.checkpoint, rank)
        else:
            return None
        apply_schedule_now(engine, lr)
        return state

    def describe(self, step: int) -> str:
        """For the run's first log line."""
        if self.kind == FRESH:
            return f"fresh start at step {step}"
        if self.kind == WEIGHTS:  # strata import: weights only, a fresh optimizer
            return f"started from the weights of {self.checkpoint.name} (imported), fresh optimizer, at step {step}"
        resharded = f" (resharded from {self.full.layout.describe()})" if self.kind == RESHARDED else ""
        return f"resumed from {self.checkpoint.name} at step {step}{resharded}"
