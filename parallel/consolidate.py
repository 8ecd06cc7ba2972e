"""Read a sharded training checkpoint into one full state dict, shard by shard.

    ckpt = resolve_checkpoint("runs/tiny")          # a run dir, its checkpoints/ dir, or a step dir,
                                                    # verified (parallel/checkpoint.py)
    state_dict = consolidate(ckpt)                  # {name: full fp32 tensor}, Strata's names
    model_cfg = load_run_config(ckpt).model          # launcher.config: the run's config.yaml
    state_dict = consolidate(ckpt, model_cfg)       # the model config is needed for TP / PP merges

Layouts read (what parallel/checkpoint.py writes through DeepSpeed, and what `strata import`
writes):
- ZeRO 0-2: mp_rank_00_model_states.pt holds the full module (DeepSpeed gathers it there).
- ZeRO-3: parameters are flat fp32 partitions, one per data-parallel rank, in
  zero_pp_rank_<r>_mp_rank_<t>_optim_states.pt; each parameter is cut out of every rank's
  partition and concatenated (DeepSpeed's zero_to_fp32 merge, on memory-mapped files, so
  only the model itself is ever held in memory, never the optimizer states).
- weights only (`strata import`): model.safetensors and a manifest with "weights_only".
- Tensor / pipeline parallel (tp or pp > 1): per TP rank, the module files (mp_rank_YY) or
  DeepSpeed's per-layer pipeline files (layer_XX-model_YY), merged over TP by
  parallel/tp_splits.py; with ZeRO-3, each TP rank's partitions (mp_rank_YY) are merged first.

File names and safe loading come from parallel/checkpoint.py, the one module that knows the
format; loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel.checkpoint import (MODEL_STATES, PIPELINE_LAYER, WEIGHTS_FILE, ZERO3_MODEL,
                                 ZERO3_MODEL_FILE, ZERO_OPTIM, CheckpointError, read_manifest,
                                 resolve_checkpoint, safe_load, saved_layout)

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
    """The full state dict of a complete checkpoint, in Strata's parameter names. `model_cfg`
    (the run's ModelConfig) is needed to merge tensor / pipeline-parallel shards."""
    ckpt = Path(ckpt)
    if is_weights_only(ckpt):
        return read_weights_only(ckpt)
    layout = saved_layout(read_manifest(ckpt))
    tp, pp = layout.tp, layout.pp
    if tp * pp == 1:
        return read_data_parallel(ckpt)
    if model_cfg is None:
        raise CheckpointError(f"checkpoint {ckpt} is split tp={tp} pp={pp}; merging it needs the run's model "
                              "config (launcher.config.load_run_config)")
    return merge_model_parallel(read_model_parallel_ranks(ckpt, tp, pp, len(model_cfg.pattern)), model_cfg)


def read_data_parallel(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model of one (tp, pp) rank, gathered over its data-parallel (ZeRO) ranks."""
    if (ckpt / MODEL_STATES.format(mp=0)).is_file():
        module = safe_load(ckpt / MODEL_STATES.format(mp=0))["module"]
        return {name: t.contiguous() for name, t in module.items()}
    if any(ZERO3_MODEL_FILE.match(p.name) for p in ckpt.iterdir()):
        return read_zero3(ckpt)
    raise CheckpointError(f"checkpoint {ckpt} has no model states (mp_rank_00_model_states.pt or ZeRO-3 "
                          "zero_pp_rank_*_model_states.pt); it is damaged or not a Strata checkpoint")


@dataclass
class Zero3Files:
    """Model-parallel rank `mp`'s ZeRO-3 files, opened once (memory-mapped)."""

    ckpt: Path
    model_states: list
    """DeepSpeed's zero_model_state per data-parallel rank: shapes and buffers."""
    optimizers: list[dict]
    """Each data-parallel rank's optimizer_state_dict: fp32 partitions and AdamW state."""

    def adam_step(self) -> torch.Tensor | None:
        state = self.optimizers[0]["optimizer_state_dict"]["state"]
        return state[0]["step"].clone() if state else None

    def gather(self, state: str | None = None, materialize: bool = True) -> dict:
        """Every parameter in full: the fp32 weights (with the buffers), or with `state`
        ('exp_avg', 'exp_avg_sq') that AdamW state, which ZeRO-3 lays out exactly like the
        fp32 partitions (one flat tensor per sub-group and rank). materialize=False leaves
        each parameter as DeepSpeed's GatheredTensor, joined on .contiguous()."""
        from deepspeed.utils import zero_to_fp32

        flat_groups = []
        for optim in self.optimizers:
            groups = optim["fp32_flat_groups"]
            if state is not None:
                groups = [optim["optimizer_state_dict"]["state"][i][state] for i in range(len(groups))]
            flat_groups.append(groups)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            lazy = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(len(flat_groups), flat_groups,
                                                                          self.model_states, False)
        out = {name: t.contiguous() for name, t in lazy.items()} if materialize else dict(lazy)
        if state is not None:  # buffers ride along with the weights only
            out = {k: v for k, v in out.items() if k not in self.model_states[0].buffers}
        return out


def open_zero3(ckpt: Path, mp: int = 0) -> Zero3Files:
    from deepspeed.utils import zero_to_fp32

    ranks = sorted(int(m.group(1)) for p in ckpt.iterdir() if (m := ZERO3_MODEL_FILE.match(p.name)) and int(m.group(2)) == mp)
    world = len(ranks)
    missing = [ZERO_OPTIM.format(dp=r, mp=mp) for r in range(world) if not (ckpt / ZERO_OPTIM.format(dp=r, mp=mp)).is_file()]
    if not world or ranks != list(range(world)) or missing:
        raise CheckpointError(f"ZeRO-3 checkpoint {ckpt} lacks shards ({', '.join(missing) or 'model states'}); "
                              "a rank did not finish saving: use an earlier complete checkpoint")
    model_states = []
    for r in ranks:
        sd = safe_load(ckpt / ZERO3_MODEL.format(dp=r, mp=mp))
        model_states.append(zero_to_fp32.zero_model_state(
            buffers={k: v for k, v in sd["module"].items() if k in sd["buffer_names"]},
            param_shapes=sd["param_shapes"], shared_params=list(map(list, (sd.get("shared_params") or {}).items())),
            ds_version=sd.get("ds_version"), frozen_param_shapes=sd.get("frozen_param_shapes"),
            frozen_param_fragments=sd.get("frozen_param_fragments")))
    optimizers = []
    for r in ranks:
        optim = safe_load(ckpt / ZERO_OPTIM.format(dp=r, mp=mp), zero_optimizer=True)["optimizer_state_dict"]
        if optim.get("partition_count") not in (world, [world]):
            raise CheckpointError(f"ZeRO-3 checkpoint {ckpt}: rank {r} was partitioned over "
                                  f"{optim.get('partition_count')} ranks but {world} shards are present")
        optimizers.append(optim)
    return Zero3Files(ckpt, model_states, optimizers)


def read_zero3(ckpt: Path, mp: int = 0) -> dict[str, torch.Tensor]:
    """Model-parallel rank `mp`'s fp32 weights, gathered from its ZeRO-3 partitions."""
    return open_zero3(ckpt, mp).gather()


def read_model_parallel_ranks(ckpt: Path, tp: int, pp: int, n_blocks: int) -> list[dict[str, torch.Tensor]]:
    """Per tensor-parallel rank, its shards of every parameter in Strata's names. pp > 1:
    DeepSpeed's pipeline writes one file per layer and TP rank (layer_XX-model_YY), renamed
    through parallel/pipeline.py's layer_prefix; pp = 1: one module file per TP rank
    (mp_rank_YY, ZeRO 0-2)."""
    if pp > 1:
        from parallel.pipeline import layer_prefix

        parts = [{} for _ in range(tp)]
        for path in sorted(ckpt.glob("layer_*-model_*-model_states.pt")):
            layer, rank = map(int, PIPELINE_LAYER.match(path.name).groups())
            parts[rank].update({layer_prefix(layer, n_blocks) + k: v for k, v in safe_load(path).items()})
        if not all(parts):
            raise CheckpointError(f"checkpoint {ckpt} (tp={tp}, pp={pp}) lacks pipeline layer files; "
                                  "a rank did not finish saving: use an earlier complete checkpoint")
        return parts
    files = [ckpt / MODEL_STATES.format(mp=t) for t in range(tp)]
    if all(f.is_file() for f in files):
        return [safe_load(f)["module"] for f in files]
    if any(ZERO3_MODEL_FILE.match(p.name) for p in ckpt.iterdir()):
        return [read_zero3(ckpt, t) for t in range(tp)]
    raise CheckpointError(f"checkpoint {ckpt} (tp={tp}) lacks mp_rank_XX_model_states.pt files and ZeRO-3 "
                          "partitions; a rank did not finish saving: use an earlier complete checkpoint")


def merge_model_parallel(parts: list[dict[str, torch.Tensor]], model_cfg) -> dict:
    """One full state dict from every TP rank's shards (parallel/tp_splits.py's inverse of
    the split that built the TP model; the model is built on the meta device to read it)."""
    from model.hybrid import HybridLM
    from parallel.tp_splits import gather_state_dicts, parameter_splits

    with torch.device("meta"):
        model = HybridLM(model_cfg)
    merged = gather_state_dicts(parts, parameter_splits(model, len(parts)))
    return {name: t.contiguous() for name, t in merged.items()}


def read_weights_only(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = ckpt / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"weights-only checkpoint {ckpt} has no {WEIGHTS_FILE}; re-run strata import")
    return load_file(path)
