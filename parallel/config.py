"""The parallel layout and checkpoint sections of the config schema, and what the engine reads of
the training section (OptimizerConfig: launcher/config.py TrainConfig.optimizer() makes it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerConfig:
    """The batch, AdamW, clipping and LR schedule the engine is built with (parallel/engine/build.py);
    the fields mean what train.<field> of the same name means."""

    global_batch_size: int
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    warmup_steps: int
    max_steps: int
    schedule: str
    decay_fraction: float
    min_lr_ratio: float
    param_dtype: str = "fp32"

RECOMPUTE_MODES = ("none", "selective", "full")
"""Activation recompute per block (train.recompute; parallel/engine/parallelize.py applies it): 'none' keeps
every activation; 'selective' recomputes the mixer's core (Mamba2: conv + SSD scan + gated norm;
attention: RoPE + GQA + SDPA; MLP: the activation) and keeps the matmul outputs around it; 'full'
recomputes the whole block and keeps only its input."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: ranks that split each layer's heads / channels."""
    pp: int = 1
    """Pipeline-parallel size: ranks that split the blocks into stages."""
    cp: int = 1
    """Context-parallel size: ranks that split each sequence, in 2 x cp load-balanced pieces
    (parallel/context/; docs/PARALLEL.md). They hold the same parameters and reduce gradients with
    the data-parallel ranks; the world is tp x cp x pp x dp. Needs train.seq_len divisible by 2 x cp
    (and seq_len / cp by tp under sequence parallelism)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage over the data-parallel ranks: 0 none, 1 optimizer states,
    2 + gradients, 3 + parameters."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward; gradient accumulation makes up the
    rest of train.global_batch_size (so a resume on another world size keeps the batch)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (NCCL on GPU, gloo on CPU), 'nccl' or 'gloo'."""
    sequence_parallel: bool = False
    """With tp > 1: split norms and residuals along the sequence between tensor-parallel
    regions (all-gather in, reduce-scatter out, as Megatron), dividing their activation
    memory by tp. Needs train.seq_len divisible by tp; no effect at tp = 1."""
    timeout_s: int = 1800
    """Seconds a collective may wait for the other ranks before the job stops (init_process_group's
    timeout; NCCL's own default is 600, gloo's 1800). Covers every step's collectives and DeepSpeed's
    checkpoint save and load, whose slowest rank writes a whole optimizer state at ZeRO 0."""
    long_timeout_s: int = 86400
    """Seconds for the waits that are meant to be long, on a separate gloo group: every rank waiting
    for rank 0 to prepare the corpus, and for rank 0 to commit a checkpoint (rename, rotation)."""

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "micro_batch_size", "timeout_s", "long_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: {self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend: {self.backend!r} is not one of 'auto', 'nccl', 'gloo'")


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save a checkpoint every this many optimizer steps (and at the end); 0 only at the end."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a new one is complete."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory when there is one."""
    on_corrupt: str = "fail"
    """When the newest checkpoint fails verification (a file missing, truncated or damaged):
    'fail' stops in one line naming the file and the newest earlier checkpoint that verifies;
    'previous' sets the damaged one aside (renamed step_XXXXXXXX.damaged) and resumes from that one."""
    async_: bool = False
    """The step waits only for a copy of each rank's state in host memory (pinned on
    GPU; as much host memory as the rank's checkpoint files); a thread writes, hashes and commits it
    while training goes on, with the guarantees of a synchronous save. A kill during the write leaves
    the previous checkpoint the newest complete one; a stop signal and the end of training wait for it."""
    async_busy: str = "wait"
    """With checkpoint.async, a save due while the previous one is still being written: 'wait' for it
    (the step blocks until it is written), or 'skip' this save (the final and preemption saves always wait)."""

    def validate(self) -> None:
        if self.async_busy not in ("wait", "skip"):
            raise ValueError(f"async_busy: {self.async_busy!r} is not one of 'wait', 'skip'")
        if self.every < 0:
            raise ValueError(f"every: must be >= 0, got {self.every}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")
        if self.on_corrupt not in ("fail", "previous"):
            raise ValueError(f"on_corrupt: {self.on_corrupt!r} is not one of 'fail', 'previous'")
