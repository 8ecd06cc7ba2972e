"""Sharded checkpoints: every rank writes only its own shard, and a checkpoint counts
only once it is complete.

Layout under <run_dir>/checkpoints:
    step_00000100/          DeepSpeed's files (model, optimizer and ZeRO partitions per rank)
        rank_00000.pt       this rank's RNG states (plain tensors and ints) and, under ZeRO 0,
                            the names of its optimizer's parameters in state order
        trainer.json        step, data cursor, self-guided state, layout (written last)
    latest                  the name of the newest complete checkpoint
Each checkpoint is written as step_XXXXXXXX.tmp and renamed once every rank has
finished; `latest` is replaced atomically afterwards. A directory without
trainer.json, or still named .tmp, is never loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# DeepSpeed's own plain records inside ZeRO optimizer shards: the only classes a load may build.
DEEPSPEED_RECORDS = [fragment_address, LossScaler, ZeroStageEnum]
STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "trainer.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; str() is one line naming it and the fix."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": np.random.get_state()[1].copy(),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["numpy"] = torch.from_numpy(state["numpy"].astype(np.int64))
    state["python"] = torch.tensor(state["python"], dtype=torch.int64)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: `latest` when it names one, else the highest step."""
    latest = root / "latest"
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / MANIFEST).is_file():
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = root / step_name(step)
    tmp_tag = step_name(step) + ".tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left by a crash mid-save
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save({**rng_state(), "optimizer_param_names": optimizer_param_names(engine)},
               root / tmp_tag / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write_text(root / tmp_tag / MANIFEST, json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        atomic_write_text(root / "latest", final.name + "\n")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def optimizer_param_names(engine) -> list[list[str]]:
    """Under ZeRO 0 torch's optimizer state is keyed by position in its param groups; these
    names, in that order, let parallel/reshard.py read it on another layout. Empty under
    ZeRO 1-3, whose files name every parameter's fragment themselves."""
    if engine.zero_optimization_stage() > 0:
        return []
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def read_manifest(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {MANIFEST} ({e.__class__.__name__}); "
                              "it is incomplete: delete it, or use an earlier complete checkpoint") from None


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, but loading never unpickles arbitrary objects: a
    checkpoint from an untrusted source cannot run code in every rank of the job."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_RECORDS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises UnpicklingError for disallowed globals, others for damage
            raise CheckpointError(f"checkpoint file {path} cannot be loaded safely "
                                  f"({str(e).splitlines()[0][:200]}); it is damaged or not a Strata checkpoint") from None


def load_checkpoint(engine, ckpt: Path, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a checkpoint written by
    this same layout (parallel/reshard.py handles another); returns the trainer state."""
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"checkpoint {ckpt}: DeepSpeed found no model states for this rank; "
                              "the directory is damaged: delete it to resume from the previous one")
    return load_trainer_state(ckpt, rank)


def load_trainer_state(ckpt: Path, rank: int) -> dict:
    """The manifest, and this rank's RNG where the checkpoint has a file for it (a resharded
    resume on more ranks than wrote it leaves the new ranks' RNG as seeded)."""
    state = read_manifest(ckpt)
    rng_file = ckpt / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
