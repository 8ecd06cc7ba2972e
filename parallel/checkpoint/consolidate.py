"""A checkpoint's full weights in one state dict, for the single-process readers (export,
generate, a run started from `strata import`).

    ckpt = resolve_checkpoint("runs/tiny")          # a run dir, its checkpoints/ dir, or a step dir,
                                                    # verified (parallel/checkpoint/files.py)
    model_cfg = load_run_config(ckpt).model         # launcher.config: the run's config.yaml
    state_dict = consolidate(ckpt, model_cfg)       # {name: full fp32 tensor}, Strata's names

Training checkpoints are read by parallel/checkpoint/reshard.py, the one reader of DeepSpeed's files on any
layout (ZeRO 0-3, TP, PP), weights only and lazily (memory-mapped, one parameter at a time); the
model config is needed to merge tensor- or pipeline-parallel shards. A weights-only checkpoint
(`strata import`) is model.safetensors beside its manifest. File names and safe loading come from
parallel/checkpoint/files.py; loading never unpickles arbitrary objects.
"""
from __future__ import annotations

from pathlib import Path

import torch

from strata.parallel.checkpoint.files import (WEIGHTS_FILE, CheckpointError, read_manifest, resolve_checkpoint,
                                              saved_layout)

__all__ = ["CheckpointError", "consolidate", "resolve_checkpoint", "run_dir_of", "is_weights_only"]


# ----------------------------------------------------------------------------------------
# Finding the checkpoint and its config
# ----------------------------------------------------------------------------------------

def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent


def is_weights_only(ckpt: Path) -> bool:
    """A checkpoint of weights alone (from `strata import`): training starts from it with a fresh
    optimizer, schedule and data order instead of resuming DeepSpeed's state."""
    return bool(read_manifest(ckpt).get("weights_only"))


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

def consolidate(ckpt: Path, model_cfg=None) -> dict[str, torch.Tensor]:
    """The full state dict of a complete checkpoint, in Strata's parameter names: the fp32
    weights as parallel/checkpoint/reshard.py reads them for a resume on any layout (the one reader of
    DeepSpeed's files). `model_cfg` (the run's ModelConfig) is needed to merge tensor /
    pipeline-parallel shards."""
    from strata.parallel.checkpoint.reshard import read_full_state

    ckpt = Path(ckpt)
    if is_weights_only(ckpt):
        return read_weights_only(ckpt)
    layout = saved_layout(read_manifest(ckpt))
    if model_cfg is None and layout.tp * layout.pp > 1:
        raise CheckpointError(f"checkpoint {ckpt} is split tp={layout.tp} pp={layout.pp}; merging it needs the "
                              "run's model config (launcher.config.load_run_config)")
    full = read_full_state(ckpt, model_cfg, layout, optimizer=False)
    return {name: read().contiguous() for name, read in full.weights.items()}


def read_weights_only(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = ckpt / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"weights-only checkpoint {ckpt} has no {WEIGHTS_FILE}; re-run strata import")
    return load_file(path)
