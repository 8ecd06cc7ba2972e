"""Resume a checkpoint on another layout: another number of data-parallel ranks under
ZeRO, another ZeRO stage, another tensor- or pipeline-parallel degree.

DeepSpeed can only reload its partitions onto the layout that wrote them. Here every
rank reads the checkpoint's per-parameter training state in full (fp32 master weights,
AdamW's exp_avg and exp_avg_sq, the step), in HybridLM names, and takes its own part:

    full = read_full_state(ckpt, model_cfg, saved_layout)   # every rank, from the files
    load_full_weights(model, full)                           # before parallel_model()
    ... parallel_model, build_engine ...
    apply_optimizer_state(engine, full, tp_rank, tp, pp, model_cfg)   # this rank's slices

What the checkpoint files hold, per model-parallel index m = stage x tp + tp_rank (DeepSpeed's
pipeline grid order; m = tp_rank without PP) and data-parallel rank d:
- ZeRO 0: mp_rank_<m>_model_states.pt: torch's AdamW state, keyed by position in the
  optimizer's param groups, named by the writing rank's rank_XXXXX.pt record; the module
  there (pp = 1) or in the per-layer files layer_XX-model_<tp_rank> (pp > 1);
- ZeRO 1-2: zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt: flat fp32 partitions of each
  parameter group, their AdamW states, and where each named parameter's fragment lies
  (param_slice_mappings); a parameter is its fragments over d, in rank order;
- ZeRO-3 (pp = 1): the same files, per-parameter partitions padded to equal size; weights and
  each AdamW state (laid out like the fp32 partitions) are gathered by DeepSpeed's
  zero_to_fp32 merge (Zero3Files below).
Pipeline stage names map back to HybridLM names (pipeline.model_parameter_name; the tied
embedding appears on the first and last stage with the same state), tensor-parallel pieces
are merged by parallel/tensor/splits.py, the split that built them, and cut again for the new
degree the same way. The LR schedule, DeepSpeed's step counters, the data cursor (global,
so any DP size continues at the next sample) and self-guided training's state are
layout-free and carry over as they are.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from strata.parallel.checkpoint.files import (MODEL_STATES, RANK_FILE, ZERO3_MODEL, ZERO3_MODEL_FILE, CheckpointError,
                                              need, pipeline_layer_files, safe_load, zero_optim_file)
from strata.parallel.checkpoint.rebuild import (ADAM_STATES, has_bf16_masters, restore_schedule, write_master_weights,
                                                write_optimizer_states)
from strata.parallel.layout import Layout

COUNTERS = ("global_steps", "global_samples", "skipped_steps")


Lazy = Callable[[], torch.Tensor]
"""A tensor read from the checkpoint when called: fragments are cut from memory-mapped files
and joined only then, so no rank ever holds a whole optimizer state at once."""


@dataclass
class FullState:
    """A checkpoint's training state in full (TP = 1) tensors, keyed by HybridLM names."""

    layout: Layout
    """The layout that wrote it."""
    weights: dict[str, Lazy]
    optimizer: dict[str, dict[str, Lazy]] = field(default_factory=dict)
    """name -> {"exp_avg", "exp_avg_sq"}; empty before the first optimizer step."""
    adam_step: torch.Tensor | None = None
    lr_scheduler: dict | None = None
    counters: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

def read_full_state(ckpt: Path, model_cfg, saved: Layout, optimizer: bool = True) -> FullState:
    """Every rank calls it on the same (verified) files; tensors are memory-mapped until used.
    optimizer=False (export, generate) skips the optimizer's files where they are apart from the
    weights (ZeRO 0); at ZeRO 1-3 the fp32 weights are the optimizer's partitions, and the moments
    beside them come back unread (lazy). model_cfg may be None when the checkpoint is neither
    tensor- nor pipeline-parallel."""
    from strata.model.hybrid import HybridLM
    from strata.parallel.tensor.splits import parameter_splits

    tp, pp = saved.tp, saved.pp
    naming = stage_naming(pp, model_cfg.n_blocks if pp > 1 else 0)
    pieces = []  # per TP rank, every pipeline stage's parameters
    for t in range(tp):
        piece = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": None}
        for stage in range(pp):
            part = _read_stage(ckpt, saved, t, stage, naming, optimizer)
            for key in ("weights", *ADAM_STATES):
                for name, lazy in part[key].items():
                    piece[key].setdefault(name, lazy)  # a tied embedding: both stages hold the same
            piece["step"] = piece["step"] if piece["step"] is not None else part["step"]
        pieces.append(piece)
    if saved.zero_stage == 0 and pp > 1:  # the pipeline keeps its modules in per-layer files
        for piece, layers in zip(pieces, _read_pipeline_modules(ckpt, tp, model_cfg.n_blocks)):
            piece["weights"] = {name: as_lazy(tensor) for name, tensor in layers.items()}
    splits = None
    if tp > 1:
        with torch.device("meta"):
            splits = parameter_splits(HybridLM(model_cfg), tp)
    weights = _gather_lazily([p["weights"] for p in pieces], splits)
    optimizer = {}
    if pieces[0]["step"] is not None:
        merged = {k: _gather_lazily([p[k] for p in pieces], splits) for k in ADAM_STATES}
        optimizer = {name: {k: merged[k][name] for k in ADAM_STATES} for name in merged["exp_avg"]}
    head = safe_load(ckpt / (MODEL_STATES if saved.zero_stage < 3 else ZERO3_MODEL).format(dp=0, mp=0))
    return FullState(layout=saved, weights=weights, optimizer=optimizer, adam_step=pieces[0]["step"],
                     lr_scheduler=head.get("lr_scheduler"), counters={k: head[k] for k in COUNTERS if k in head})


def _read_stage(ckpt: Path, saved: Layout, t: int, stage: int, naming, optimizer: bool) -> dict:
    """TP rank t of pipeline stage `stage`, gathered over its data-parallel ranks."""
    tp, dp, zero = saved.tp, saved.dp, saved.zero_stage
    if zero == 3:  # pp = 1: ZeRO-3 runs on the plain engine only
        return _read_zero3(ckpt, saved, t)
    mp = stage * tp + t  # DeepSpeed's model-parallel file index (pipeline grid order)
    states = safe_load(need(ckpt / MODEL_STATES.format(mp=mp)))
    if zero == 0:
        writer = t + tp * dp * stage  # the rank of data-parallel index 0, which wrote file mp
        return _read_zero0(ckpt, states, writer, naming, optimizer)
    optim = [safe_load(need(ckpt / zero_optim_file(saved, d, mp)), zero_optimizer=True)["optimizer_state_dict"]
             for d in range(dp)]
    return _read_zero12(ckpt, states, optim, naming)


def as_lazy(tensor) -> Lazy:
    """A tensor already at hand (memory-mapped), or a ZeRO-3 GatheredTensor, as a Lazy."""
    return lambda: tensor.contiguous()


def _gather_lazily(pieces: list[dict[str, Lazy]], splits: dict | None) -> dict[str, Lazy]:
    """Each name's TP pieces joined (tp_splits.gather) when it is read; one piece is itself."""
    from strata.parallel.tensor.splits import split_of

    if len(pieces) == 1:
        return {name: lazy for name, lazy in pieces[0].items() if not name.endswith("_extra_state")}

    def joined(name: str) -> Lazy:
        return lambda: split_of(splits, name).gather([piece[name]() for piece in pieces])

    return {name: joined(name) for name in pieces[0] if not name.endswith("_extra_state")}


def stage_naming(pp: int, n_blocks: int):
    """Engine parameter name -> HybridLM name: the same with pp = 1, a PipelineModule's
    ('3.mixer.in_proj.weight', 'tied_modules.embed.embed.weight') mapped back with pp > 1."""
    if pp == 1:
        return lambda name: name
    from strata.parallel.pipeline.stages import model_parameter_name

    return lambda name: model_parameter_name(name, n_blocks)


def _read_zero0(ckpt: Path, states: dict, writer: int, naming, optimizer: bool) -> dict:
    """The module (pp = 1) and torch's AdamW state, its integer keys named by the writer's record
    of its param groups."""
    module = states.get("module") or {}
    out = {"weights": {naming(n): as_lazy(t) for n, t in module.items()}, "step": None, "exp_avg": {}, "exp_avg_sq": {}}
    opt = states["optimizer"]["state"] if optimizer else {}
    if not opt:
        return out
    record = ckpt / RANK_FILE.format(rank=writer)
    names = safe_load(need(record), mmap=False).get("optimizer_param_names")
    if not names:
        raise CheckpointError(f"checkpoint {ckpt}: {record.name} does not name the optimizer's parameters "
                              "(written before resharding existed); resume it on the layout that wrote it")
    ordered = [naming(n) for group in names for n in group]
    for index, name in enumerate(ordered):
        for k in ADAM_STATES:
            out[k][name] = as_lazy(opt[index][k])
    out["step"] = opt[0]["step"].clone()
    return out


def _read_zero3(ckpt: Path, saved: Layout, t: int) -> dict:
    """Weights and AdamW states of TP rank t, each gathered from the ZeRO-3 partitions."""
    files = open_zero3(ckpt, saved, t)

    def lazy(state: str | None) -> dict[str, Lazy]:
        return {name: as_lazy(gathered) for name, gathered in files.gather(state, materialize=False).items()}

    step = files.adam_step()
    out = {"weights": lazy(None), "step": step, "exp_avg": {}, "exp_avg_sq": {}}
    if step is not None:
        out.update({k: lazy(k) for k in ADAM_STATES})
    return out


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


def open_zero3(ckpt: Path, saved: Layout, mp: int = 0) -> Zero3Files:
    from deepspeed.utils import zero_to_fp32

    ranks = sorted(int(m.group(1)) for p in ckpt.iterdir() if (m := ZERO3_MODEL_FILE.match(p.name)) and int(m.group(2)) == mp)
    world = len(ranks)
    missing = [zero_optim_file(saved, r, mp) for r in range(world) if not (ckpt / zero_optim_file(saved, r, mp)).is_file()]
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
        optim = safe_load(ckpt / zero_optim_file(saved, r, mp), zero_optimizer=True)["optimizer_state_dict"]
        if optim.get("partition_count") not in (world, [world]):
            raise CheckpointError(f"ZeRO-3 checkpoint {ckpt}: rank {r} was partitioned over "
                                  f"{optim.get('partition_count')} ranks but {world} shards are present")
        optimizers.append(optim)
    return Zero3Files(ckpt, model_states, optimizers)


def _read_pipeline_modules(ckpt: Path, tp: int, n_blocks: int) -> list[dict[str, torch.Tensor]]:
    """pp > 1, ZeRO 0: per TP rank, every pipeline layer's module in Strata's names. DeepSpeed's
    pipeline writes one file per layer and TP rank (layer_XX-model_YY), renamed through
    parallel/pipeline/stages.py's layer_prefix."""
    from strata.parallel.pipeline.stages import layer_prefix

    parts = [{} for _ in range(tp)]
    for layer, rank, path in pipeline_layer_files(ckpt):
        parts[rank].update({layer_prefix(layer, n_blocks) + k: v for k, v in safe_load(path).items()})
    if not all(parts):
        raise CheckpointError(f"checkpoint {ckpt} (tp={tp}) lacks pipeline layer files; "
                              "a rank did not finish saving: use an earlier complete checkpoint")
    return parts


def _read_zero12(ckpt: Path, states: dict, optim: list[dict], naming) -> dict:
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
                if source is None or source in flats[0][1]:
                    out[key][naming(name)] = _fragments(optim, flats, g, name, shape, source)
        if out["step"] is None and "step" in flats[0][1]:
            out["step"] = flats[0][1]["step"].clone()
    return out


def _fragments(optim: list[dict], flats: list, group: int, name: str, shape, source: str | None) -> Lazy:
    """The parameter `name` of ZeRO-1/2 group `group`: its fragment of every rank's flat fp32
    partition (source None) or AdamW state, in rank order."""
    def read() -> torch.Tensor:
        parts = []
        for o, (fp32, adam) in zip(optim, flats):
            frag = o["param_slice_mappings"][group].get(name)
            if frag is not None and frag.numel > 0:
                parts.append((fp32 if source is None else adam[source]).narrow(0, frag.start, frag.numel))
        return torch.cat(parts).view(shape)

    return read


# ----------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------

def load_full_weights(model: torch.nn.Module, full: FullState) -> None:
    """Into the full HybridLM, before it is parallelised. Self-guided dense paths (`guide`)
    a checkpoint written after the guided phase no longer has are dropped later."""
    own = model.state_dict()
    missing = [n for n in own if n not in full.weights and not n.endswith(".guide")]
    unexpected = [n for n in full.weights if n not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); resume with the run's own config.yaml")
    with torch.no_grad():
        for name, read in full.weights.items():  # one parameter in memory at a time
            value = read()
            if value.shape != own[name].shape:
                raise CheckpointError(f"checkpoint's {name} has shape {tuple(value.shape)}, the model's is "
                                      f"{tuple(own[name].shape)}; resume with the run's own config.yaml")
            own[name].copy_(value)


def _this_rank(engine, model_cfg, tp_rank: int, tp: int, pp: int):
    """name_of: the engine's trained parameters -> their HybridLM names (in the module's order), and
    shard(p, full) -> this rank's TP slice of a full tensor of p, in the optimizer's dtype (fp32 for
    bf16 parameters' masters)."""
    from strata.model.hybrid import HybridLM
    from strata.parallel.tensor.splits import parameter_splits, split_of

    with torch.device("meta"):
        splits = parameter_splits(HybridLM(model_cfg), tp)
    naming = stage_naming(pp, model_cfg.n_blocks)
    name_of = {p: naming(n) for n, p in engine.module.named_parameters() if p.requires_grad}
    dtype = torch.float32 if has_bf16_masters(engine) else None

    def shard(p, tensor: torch.Tensor) -> torch.Tensor:
        return split_of(splits, name_of[p]).shard(tensor, tp_rank, tp).to(p.device, dtype or p.dtype, copy=True)

    return name_of, shard


def apply_master_weights(engine, weights: dict[str, Lazy], tp_rank: int, tp: int, pp: int, model_cfg) -> None:
    """Full fp32 weights as a bf16-parameter engine's masters, this rank's slices (the engine built
    them from its bf16 module, rounded); nothing for an engine of fp32 parameters."""
    if has_bf16_masters(engine):
        _write_masters(engine, weights, *_this_rank(engine, model_cfg, tp_rank, tp, pp))


def _write_masters(engine, weights: dict[str, Lazy], name_of: dict, shard) -> None:
    write_master_weights(engine, list(name_of), lambda p: shard(p, weights[name_of[p]]()))


def apply_optimizer_state(engine, full: FullState, tp_rank: int, tp: int, pp: int, model_cfg) -> None:
    """Collective (ZeRO 1-3 set up their flat state on every rank). This rank's slices of each
    parameter's AdamW state (and, with bf16 parameters, of its fp32 master weight), the LR
    schedule and DeepSpeed's counters."""
    masters = has_bf16_masters(engine)
    if masters or full.adam_step is not None:
        name_of, shard = _this_rank(engine, model_cfg, tp_rank, tp, pp)
    if masters:
        _write_masters(engine, full.weights, name_of, shard)
    if full.adam_step is not None:
        absent = [n for n in name_of.values() if n not in full.optimizer]
        if absent:
            raise CheckpointError(f"checkpoint holds no optimizer state for {absent[:3]}; "
                                  "resume with the run's own config.yaml")

        def state_of(p) -> dict:  # read when the engine takes it
            return {"step": full.adam_step.clone(), **{k: shard(p, full.optimizer[name_of[p]][k]()) for k in ADAM_STATES}}

        write_optimizer_states(engine, list(name_of), state_of, full.adam_step, engine.zero_optimization_stage())
    restore_schedule(engine, full.lr_scheduler, full.counters)
