"""Resume a checkpoint on another layout: a different number of data-parallel ranks under
ZeRO, another ZeRO stage, or another tensor-parallel degree.

DeepSpeed can only reload its partitions onto the layout that wrote them. Here every
rank reads the checkpoint's per-parameter training state in full (fp32 master weights,
AdamW's exp_avg and exp_avg_sq, the step), in HybridLM names, and takes its own part:

    full = read_full_state(ckpt, model_cfg, saved_layout)   # every rank, from the files
    model.load_state_dict(full.weights)                       # before parallel_model()
    ... parallel_model, build_engine ...
    apply_optimizer_state(engine, full, topo)                  # this rank's slices, any ZeRO stage 0-2

What the checkpoint files hold, per (tensor-parallel rank t, data-parallel rank d):
- ZeRO 0: mp_rank_<t>_model_states.pt: the module and torch's AdamW state, indexed in the
  order of parallel/engine.param_groups (decayed matrices, then the rest);
- ZeRO 1-2: zero_pp_rank_<d>_mp_rank_<t>_optim_states.pt: flat fp32 partitions of each
  parameter group, their AdamW states, and where each named parameter's fragment lies
  (param_slice_mappings); a parameter is its fragments over d, in rank order.
Tensor-parallel pieces are merged by parallel/tp_splits.py, the split that built them, and
cut again for the new degree the same way. The LR schedule, DeepSpeed's step counters,
the data cursor (global, so any DP size continues at the next sample) and self-guided
training's state are layout-free and carry over as they are.

Not resharded (refused in one line by `reshard_refusal`): ZeRO-3 checkpoints or targets,
and a pipeline-parallel degree change or pipeline-parallel checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallel.checkpoint import CheckpointError

ADAM_STATES = ("exp_avg", "exp_avg_sq")
ZERO_OPTIM = "zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"
MODEL_STATES = "mp_rank_{t:02d}_model_states.pt"
COUNTERS = ("global_steps", "global_samples", "skipped_steps")


@dataclass
class FullState:
    """A checkpoint's training state in full (TP = 1) tensors, keyed by HybridLM names."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """name -> {"exp_avg", "exp_avg_sq"}; empty before the first optimizer step."""
    adam_step: torch.Tensor | None = None
    lr_scheduler: dict | None = None
    counters: dict = field(default_factory=dict)


def same_layout(saved: dict, now: dict) -> bool:
    """DeepSpeed reloads its own files: same TP, PP and ZeRO stage, and the same world size
    unless nothing is partitioned over data-parallel ranks (ZeRO 0)."""
    if (saved.get("tp", 1), saved.get("pp", 1), saved.get("zero_stage", 0)) != (now["tp"], now["pp"], now["zero_stage"]):
        return False
    return now["zero_stage"] == 0 or saved.get("world_size") == now["world_size"]


def reshard_refusal(ckpt: Path, saved: dict, now: dict) -> str | None:
    """Why this layout change cannot be resharded (one line with the way out), else None."""
    how = (f"resume with parallel.tp={saved.get('tp', 1)} parallel.pp={saved.get('pp', 1)} "
           f"parallel.zero_stage={saved.get('zero_stage', 0)} on {saved.get('world_size')} ranks")
    if saved.get("pp", 1) != 1 or now["pp"] != 1:
        return (f"checkpoint {ckpt} was written with pp={saved.get('pp', 1)} and this run has pp={now['pp']}: "
                f"resharding covers data and tensor parallelism, not pipeline stages; {how}")
    if saved.get("zero_stage", 0) == 3 or now["zero_stage"] == 3:
        return (f"checkpoint {ckpt} (ZeRO {saved.get('zero_stage', 0)}) cannot be resharded to ZeRO {now['zero_stage']}: "
                f"ZeRO-3 partitions are not resharded; {how}")
    return None


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

def read_full_state(ckpt: Path, model_cfg, saved: dict) -> FullState:
    """Every rank calls it on the same files; tensors are memory-mapped until used."""
    from model.hybrid import HybridLM
    from parallel.consolidate import safe_load
    from parallel.tp_splits import gather_state_dicts, parameter_splits

    tp = saved.get("tp", 1)
    dp = saved["world_size"] // tp
    with torch.device("meta"):
        meta = HybridLM(model_cfg)
    no_decay_names = {n for n, p in meta.named_parameters() if getattr(p, "_no_weight_decay", False)}
    pieces = []
    for t in range(tp):
        states = safe_load(_need(ckpt / MODEL_STATES.format(t=t)))
        if saved.get("zero_stage", 0) == 0:
            pieces.append(_read_zero0(states, no_decay_names))
        else:
            optim = [safe_load(_need(ckpt / ZERO_OPTIM.format(d=d, t=t)), zero_optimizer=True)["optimizer_state_dict"]
                     for d in range(dp)]
            pieces.append(_read_zero12(ckpt, states, optim))
    head = safe_load(ckpt / MODEL_STATES.format(t=0))
    splits = parameter_splits(meta, tp)
    weights = gather_state_dicts([p["weights"] for p in pieces], splits)
    optimizer = {}
    if pieces[0]["step"] is not None:
        merged = {k: gather_state_dicts([p[k] for p in pieces], splits) for k in ADAM_STATES}
        optimizer = {name: {k: merged[k][name] for k in ADAM_STATES} for name in merged["exp_avg"]}
    return FullState(weights={k: v.contiguous() for k, v in weights.items()}, optimizer=optimizer,
                     adam_step=pieces[0]["step"], lr_scheduler=head.get("lr_scheduler"),
                     counters={k: head[k] for k in COUNTERS if k in head})


def _need(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} lacks {path.name}, which resharding it needs; "
                              "a rank did not finish saving: use an earlier complete checkpoint")
    return path


def _read_zero0(states: dict, no_decay_names: set[str]) -> dict:
    """Torch's AdamW state, its integer keys named through parallel/engine.param_groups' order."""
    from parallel.engine import no_decay

    module = states["module"]
    params = [n for n in module if n not in set(states.get("buffer_names") or []) and not n.endswith("_extra_state")]
    decayed = [n for n in params if not (no_decay(n, module[n]) or n in no_decay_names)]
    ordered = decayed + [n for n in params if n not in set(decayed)]
    opt = states["optimizer"]["state"]
    out = {"weights": {n: module[n] for n in params}, "step": None, "exp_avg": {}, "exp_avg_sq": {}}
    if not opt:
        return out
    for index, name in enumerate(ordered):
        for k in ADAM_STATES:
            out[k][name] = opt[index][k]
    out["step"] = opt[0]["step"].clone()
    return out


def _read_zero12(ckpt: Path, states: dict, optim: list[dict]) -> dict:
    """Each named parameter's fragments of the flat fp32 partitions and their AdamW states,
    concatenated over the data-parallel ranks."""
    dp = len(optim)
    for d, o in enumerate(optim):
        if any(c != dp for c in o["partition_count"]):
            raise CheckpointError(f"checkpoint {ckpt}: rank {d}'s ZeRO partitions are over {o['partition_count']} "
                                  f"ranks, but {dp} shards are present; use an earlier complete checkpoint")
    out = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": None}
    for g, shapes in enumerate(states["param_shapes"]):
        flats = [(o["single_partition_of_fp32_groups"][g], o["base_optimizer_state"]["state"].get(g, {}))
                 for o in optim]
        for name, shape in shapes.items():
            for key, source in (("weights", None), *((k, k) for k in ADAM_STATES)):
                if source is not None and source not in flats[0][1]:
                    continue
                parts = []
                for o, (fp32, adam) in zip(optim, flats):
                    frag = o["param_slice_mappings"][g].get(name)
                    if frag is not None and frag.numel > 0:
                        flat = fp32 if source is None else adam[source]
                        parts.append(flat.narrow(0, frag.start, frag.numel))
                out[key][name] = torch.cat(parts).view(shape).clone()
        if out["step"] is None and "step" in flats[0][1]:
            out["step"] = flats[0][1]["step"].clone()
    return out


# ----------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------

def load_full_weights(model: torch.nn.Module, full: FullState) -> None:
    """Into the full HybridLM, before it is parallelised. Self-guided dense paths (`guide`)
    a checkpoint written after the guided phase no longer has are dropped later."""
    missing, unexpected = model.load_state_dict(full.weights, strict=False)
    missing = [m for m in missing if not m.endswith(".guide")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); resume with the run's own config.yaml")


def apply_optimizer_state(engine, full: FullState, tp_rank: int, tp: int, model_cfg) -> None:
    """Collective (ZeRO 1-2 link their flat state on every rank). This rank's slices of each
    parameter's AdamW state, the LR schedule and DeepSpeed's counters."""
    from model.hybrid import HybridLM
    from parallel.rebuild import write_optimizer_states
    from parallel.tp_splits import parameter_splits, split_of

    if full.adam_step is not None:
        with torch.device("meta"):
            splits = parameter_splits(HybridLM(model_cfg), tp)
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        absent = [n for n, _ in named if n not in full.optimizer]
        if absent:
            raise CheckpointError(f"checkpoint holds no optimizer state for {absent[:3]}; "
                                  "resume with the run's own config.yaml")
        states = {p: {"step": full.adam_step.clone(),
                      **{k: split_of(splits, n).shard(full.optimizer[n][k], tp_rank, tp).to(p.device, p.dtype)
                         for k in ADAM_STATES}}
                  for n, p in named}
        write_optimizer_states(engine, [p for _, p in named], states, full.adam_step, engine.zero_optimization_stage())
    if full.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(full.lr_scheduler)
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for k, v in full.counters.items():
        setattr(engine, k, v)
