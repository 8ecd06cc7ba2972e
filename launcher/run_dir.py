"""What a run directory must be before a run starts or resumes in it, each mistake one line that names the
cause and the fix (before, a run directory that is a file was "tokenizer.sha256 is unreadable", and a
resume with another model.d_model a 72-line state_dict error with 37 size mismatches).

    check_run_dir(Path(cfg.train.run_dir))        # before anything is read or written there
    check_shared_run_dir(run_dir, info.is_main)   # collective: every rank sees what rank 0 writes there
    check_same_model(newest_checkpoint, cfg.model) # before the checkpoint's weights are loaded
"""
from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import torch

from strata.launcher.config import ConfigError, load_run_config
from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.parallel.distributed import decided_by_rank0, long_wait_group, on_every_rank

PROBE = ".strata-shared-probe"


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir: {run_dir} is a file, not a directory; give a directory (it is "
                          "created if absent), or move the file away")


def check_shared_run_dir(run_dir: Path, is_main: bool) -> None:
    """Collective. Every rank must see the run directory rank 0 writes: rank 0 alone commits, renames and
    rotates checkpoints, and every rank resumes from what it finds there. Rank 0 writes a file with a
    random token; a rank that does not read the same token stops the run, on every rank, in one line
    (node-local storage is refused, not half-supported: docs/OPERATIONS.md)."""
    if long_wait_group() is None:
        return
    probe = run_dir / PROBE

    def write_token() -> str:
        token = secrets.token_hex(16)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
        return token

    token = decided_by_rank0(write_token)
    try:
        on_every_rank(lambda: _sees(probe, token))
    finally:
        if is_main:
            probe.unlink(missing_ok=True)


def _sees(probe: Path, token: str) -> None:
    try:
        seen = probe.read_text()
    except OSError:
        seen = None
    if seen != token:
        raise ConfigError(f"train.run_dir: {probe.parent} is not shared with rank 0 (this rank does not see the file "
                          "rank 0 just wrote there: node-local storage?); put train.run_dir on a filesystem every "
                          "node mounts: rank 0 alone commits checkpoints, and every rank resumes from them")


def parameter_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in HybridLM(model).named_parameters()}


def model_differences(saved: ModelConfig, now: ModelConfig, prefix: str = "model") -> list[str]:
    """'key: saved -> now' for every model key whose value differs, nested sections included."""
    changes = []
    for field in dataclasses.fields(saved):
        was, is_ = getattr(saved, field.name), getattr(now, field.name)
        if dataclasses.is_dataclass(was):
            changes += model_differences(was, is_, f"{prefix}.{field.name}")
        elif was != is_:
            changes.append(f"{prefix}.{field.name}: {was!r} -> {is_!r}")
    return changes


def check_same_model(checkpoint: Path | None, model: ModelConfig) -> None:
    """A resume loads the checkpoint's parameters into the model this config builds: where their shapes
    differ, one line naming the keys that changed and both values. Changes that keep every shape (a
    chunk size, a dt limit) resume as asked."""
    if checkpoint is None or not (checkpoint.parent.parent / "config.yaml").is_file():
        return  # no record of the model to compare: the weights' own checks apply
    saved = load_run_config(checkpoint).model
    if parameter_shapes(saved) == parameter_shapes(model):
        return
    changes = model_differences(saved, model)
    raise ConfigError(f"{'; '.join(changes) or 'the model'} (checkpoint {checkpoint.name} was trained with the "
                      "first value): its weights do not fit this model; resume with the checkpoint's values, or give "
                      "a new train.run_dir to start another run")
