"""The readers of checkpoint files (parallel/checkpoint/files.py, reshard.py, consolidate.py), against
tiny training checkpoints written here: a HybridLM (M*-) trained by a one-rank DeepSpeed engine
at each ZeRO stage and saved through save_checkpoint at steps 0 (before any optimizer step), 2
and 4. Every reader must give back exactly what the engine held when it saved: module weights,
AdamW's moments and step, the LR schedule, DeepSpeed's counters, the RNG, the layout. Damage of
any file of such a checkpoint is named, a reader never assembles a model from shards that do
not belong together, and resuming picks the newest checkpoint that verifies.
(tests/parallel/test_checkpoint.py tests the format's rules on weights-only checkpoints.)"""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.utils import safe_get_full_optimizer_state

from strata.launcher.config import TrainConfig
from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.parallel.checkpoint.consolidate import consolidate, is_weights_only
from strata.parallel.checkpoint.files import (MANIFEST, MODEL_STATES, RANK_FILE, WEIGHTS_FILE, ZERO3_MODEL, ZERO_OPTIM,
                                              CheckpointError, checkpoint_to_resume, load_checkpoint,
                                              load_trainer_state, manifest_text, read_manifest, resolve_checkpoint,
                                              save_checkpoint, saved_layout, verify, write_weights_only)
from strata.parallel.checkpoint.reshard import read_full_state
from strata.parallel.config import ParallelConfig
from strata.parallel.engine.build import build_engine
from strata.parallel.layout import Layout
from tests.parallel.test_checkpoint import flip

STAGES = (0, 1, 2, 3)
SAVED_AT = (0, 2, 4)
ADAM = ("exp_avg", "exp_avg_sq")


def model_config() -> ModelConfig:
    cfg = ModelConfig(pattern="M*-", d_model=32, vocab_size=50, max_seq_len=32)
    cfg.attention.n_heads = 4
    cfg.validate()
    return cfg


@dataclass
class Snapshot:
    """What the engine held when it saved one checkpoint (clones)."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]  # name -> exp_avg, exp_avg_sq; {} before the first step
    lr_scheduler: dict
    counters: dict


@dataclass
class Run:
    stage: int
    cfg: ModelConfig
    root: Path  # <run_dir>/checkpoints
    saved: dict[int, Snapshot] = field(default_factory=dict)
    rng_after_last_save: tuple = ()  # torch, python and numpy draws right after the step-4 save

    @property
    def run_dir(self) -> Path:
        return self.root.parent

    def ckpt(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def layout(self) -> Layout:
        return Layout(1, 1, 1, self.stage)

    def copy(self, tmp_path: Path) -> Path:
        """A copy of the run's checkpoints/ dir to damage."""
        return Path(shutil.copytree(self.root, tmp_path / "run" / "checkpoints"))


def draws() -> tuple:
    return torch.rand(4), random.random(), float(np.random.rand())


def moments_of(engine, stage: int) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's moments per parameter name, read from the live optimizer (not from any file)."""
    named = list(engine.module.named_parameters())
    if stage == 0:
        state = engine.optimizer.state
        return {n: {k: state[p][k].clone() for k in ADAM} for n, p in named if p in state}
    if stage == 3:
        if not engine.optimizer.optimizer.state:
            return {}
        return {n: {k: safe_get_full_optimizer_state(p, k).clone() for k in ADAM} for n, p in named}
    # ZeRO 1-2 on one rank: each group's flat fp32 partition is its parameters end to end
    zero, names = engine.optimizer, {id(p): n for n, p in named}
    out = {}
    for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        state, at = zero.optimizer.state.get(flat), 0
        for p in params:
            if state:
                out[names[id(p)]] = {k: state[k].narrow(0, at, p.numel()).view(p.shape).clone() for k in ADAM}
            at += p.numel()
    return out


def module_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: t.detach().clone() for n, t in engine.module.state_dict().items()}


def train_and_save(stage: int, root: Path) -> Run:
    cfg = model_config()
    train = TrainConfig(max_steps=6, warmup_steps=1, lr=1e-2, global_batch_size=2, seq_len=16)
    par = ParallelConfig(zero_stage=stage, micro_batch_size=2)
    torch.manual_seed(0)
    engine = build_engine(HybridLM(cfg), train.optimizer(), par, 1)
    run, data = Run(stage, cfg, root), torch.Generator().manual_seed(0)
    for step in range(max(SAVED_AT) + 1):
        if step in SAVED_AT:
            state = {"step": step, "data": {"cursor": 2 * step}, "layout": run.layout().record()}
            assert save_checkpoint(engine, root, step, state, keep_last=len(SAVED_AT)) == run.ckpt(step)
            run.saved[step] = Snapshot(module_weights(engine), moments_of(engine, stage),
                                       engine.lr_scheduler.state_dict(),
                                       {k: getattr(engine, k) for k in ("global_steps", "global_samples",
                                                                        "skipped_steps")})
        if step == max(SAVED_AT):
            run.rng_after_last_save = draws()
            break
        ids = torch.randint(0, 50, (2, 16), generator=data)
        engine.backward(engine(ids, labels=ids))
        engine.step()
    engine.destroy()
    return run


@pytest.fixture(scope="module")
def runs(one_rank, tmp_path_factory) -> Iterator[dict[int, Run]]:
    linear = torch.nn.functional.linear  # a ZeRO-3 engine replaces it for the whole process
    try:
        yield {stage: train_and_save(stage, tmp_path_factory.mktemp(f"zero{stage}") / "run" / "checkpoints")
               for stage in STAGES}
    finally:
        torch.nn.functional.linear = linear


def assert_equal_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


# ----------------------------------------------------------------------------------------
# reshard.read_full_state: the one reader of DeepSpeed's files
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_read_full_state_gives_back_what_the_engine_held(runs, stage):
    run = runs[stage]
    parameters = sorted(n for n, _ in HybridLM(run.cfg).named_parameters())
    for step in (2, 4):
        ckpt, want = run.ckpt(step), run.saved[step]
        full = read_full_state(ckpt, run.cfg, saved_layout(read_manifest(ckpt)))
        assert full.layout == run.layout()
        assert_equal_tensors({n: read() for n, read in full.weights.items()}, want.weights)
        assert sorted(full.optimizer) == sorted(want.moments) == parameters
        for name, moments in want.moments.items():
            assert moments["exp_avg_sq"].abs().sum() > 0, name  # a real state, not zeros
            assert_equal_tensors({k: full.optimizer[name][k]() for k in ADAM}, moments)
        assert full.adam_step.item() == step
        assert full.counters == want.counters == {"global_steps": step, "global_samples": 2 * step, "skipped_steps": 0}
        assert full.lr_scheduler == want.lr_scheduler and full.lr_scheduler["last_epoch"] == step


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_before_the_first_optimizer_step_has_weights_and_no_optimizer_state(runs, stage):
    run = runs[stage]
    full = read_full_state(run.ckpt(0), run.cfg, run.layout())
    assert run.saved[0].moments == {}
    assert full.optimizer == {} and full.adam_step is None
    assert full.counters["global_steps"] == 0
    assert_equal_tensors({n: read() for n, read in full.weights.items()}, run.saved[0].weights)
    torch.manual_seed(0)
    initial = HybridLM(run.cfg).state_dict()
    assert_equal_tensors({n: read() for n, read in full.weights.items()}, initial)


@pytest.mark.parametrize("stage", STAGES)
def test_reading_the_weights_alone_gives_the_same_weights(runs, stage):
    run = runs[stage]
    full = read_full_state(run.ckpt(4), None, run.layout(), optimizer=False)  # no model config: tp = pp = 1
    assert_equal_tensors({n: read() for n, read in full.weights.items()}, run.saved[4].weights)
    if stage == 0:  # torch's AdamW state is left unread (ZeRO 1-3 keep it beside the fp32 weights)
        assert full.optimizer == {} and full.adam_step is None


@pytest.mark.parametrize("stage, name, named", [
    (0, MODEL_STATES.format(mp=0), MODEL_STATES.format(mp=0)),
    (0, RANK_FILE.format(rank=0), RANK_FILE.format(rank=0)),  # names torch's positional AdamW state
    (1, ZERO_OPTIM.format(dp=0, mp=0), ZERO_OPTIM.format(dp=0, mp=0)),
    (2, MODEL_STATES.format(mp=0), MODEL_STATES.format(mp=0)),
    (3, ZERO_OPTIM.format(dp=0, mp=0), ZERO_OPTIM.format(dp=0, mp=0)),
    (3, ZERO3_MODEL.format(dp=0, mp=0), "lacks shards (model states)"),  # no rank's model states left
])
def test_a_missing_shard_is_refused_in_one_line(runs, tmp_path, stage, name, named):
    ckpt = runs[stage].copy(tmp_path) / "step_00000004"
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError) as e:
        read_full_state(ckpt, runs[stage].cfg, runs[stage].layout())
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_a_truncated_shard_is_one_line_not_a_crash(runs, tmp_path, stage):
    """Readers are given verified files; one that is not (read by hand) still fails in one line."""
    ckpt = runs[stage].copy(tmp_path) / "step_00000004"
    name = MODEL_STATES.format(mp=0) if stage == 0 else ZERO_OPTIM.format(dp=0, mp=0)
    (ckpt / name).write_bytes((ckpt / name).read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=f"cannot read .*{name}.*damaged"):
        read_full_state(ckpt, runs[stage].cfg, runs[stage].layout())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shards_of_another_data_parallel_size_are_never_joined(runs, tmp_path, stage):
    """A rank's file copied in beside another's (two runs' files mixed, or a manifest claiming more
    ranks than wrote the shards): refused, never a model assembled from mismatched partitions."""
    ckpt = runs[stage].copy(tmp_path) / "step_00000004"
    names = [ZERO_OPTIM] + ([ZERO3_MODEL] if stage == 3 else [])
    for name in names:
        shutil.copy(ckpt / name.format(dp=0, mp=0), ckpt / name.format(dp=1, mp=0))
    with pytest.raises(CheckpointError, match="partition.* over .*1.* 2 shards are present"):
        read_full_state(ckpt, runs[stage].cfg, Layout(1, 1, 2, stage))


def test_zero0_state_without_parameter_names_is_refused_but_its_weights_still_read(runs, tmp_path):
    """A ZeRO-0 checkpoint written before rank files named the optimizer's parameters: its AdamW
    state, keyed by position only, is never guessed; export (weights alone) still works."""
    run = runs[0]
    ckpt = run.copy(tmp_path) / "step_00000004"
    record = ckpt / RANK_FILE.format(rank=0)
    old = {k: v for k, v in torch.load(record, weights_only=True).items() if k != "optimizer_param_names"}
    torch.save(old, record)
    with pytest.raises(CheckpointError, match=f"{record.name} does not name the optimizer's parameters"):
        read_full_state(ckpt, run.cfg, run.layout())
    assert_equal_tensors(consolidate(ckpt), run.saved[4].weights)


# ----------------------------------------------------------------------------------------
# consolidate: the single-process readers' (export, generate, a run from `strata import`)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_consolidate_gives_the_module_weights_from_any_way_in(runs, stage):
    run = runs[stage]
    for where in (run.run_dir, run.root, run.ckpt(4)):
        ckpt = resolve_checkpoint(where)
        assert ckpt == run.ckpt(4) and not is_weights_only(ckpt)
        got = consolidate(ckpt)  # tp = pp = 1: no model config needed
        assert_equal_tensors(got, run.saved[4].weights)
        assert all(t.is_contiguous() for t in got.values())
    model = HybridLM(run.cfg)
    model.load_state_dict(consolidate(run.ckpt(2), run.cfg))  # strict: every name, every shape
    assert_equal_tensors({n: t.detach() for n, t in model.state_dict().items()}, run.saved[2].weights)


def test_a_split_checkpoint_needs_the_model_config(runs, tmp_path):
    ckpt = runs[0].copy(tmp_path) / "step_00000004"
    manifest = read_manifest(ckpt)
    manifest["layout"] = Layout(2, 1, 1, 0).record()
    (ckpt / MANIFEST).write_text(manifest_text(manifest))  # a manifest as a tp=2 save writes it
    with pytest.raises(CheckpointError, match="split tp=2 pp=1; merging it needs the run's model config"):
        consolidate(ckpt)


def test_a_weights_only_checkpoint_is_recognised_and_read_back_exactly(runs, tmp_path):
    run = runs[1]
    weights = dict(run.saved[4].weights)
    weights["embed.weight"] = weights["embed.weight"].to(torch.bfloat16)  # dtypes are kept as written
    transposed = next(n for n, t in weights.items() if t.dim() == 2 and t.shape[0] != t.shape[1])
    weights[transposed] = weights[transposed].t().contiguous().t()  # not contiguous: written all the same
    root = tmp_path / "run" / "checkpoints"
    ckpt = write_weights_only(root, weights, step=7)
    assert ckpt == root / "step_00000007" and (root / "latest").read_text().strip() == ckpt.name
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000007"]  # no .tmp left
    assert sorted(p.name for p in ckpt.iterdir()) == [WEIGHTS_FILE, MANIFEST]
    assert is_weights_only(ckpt) and verify(ckpt) == []
    assert saved_layout(read_manifest(ckpt)) == Layout(1, 1, 1, 0)  # `strata import`: one process
    assert resolve_checkpoint(tmp_path / "run") == ckpt
    assert_equal_tensors(consolidate(ckpt), {n: t.contiguous() for n, t in weights.items()})
    (ckpt / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"weights-only checkpoint .* has no {WEIGHTS_FILE}"):
        consolidate(ckpt)


# ----------------------------------------------------------------------------------------
# The manifest and verify, on DeepSpeed's files
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_the_manifest_lists_every_file_and_the_layout(runs, stage):
    run = runs[stage]
    for step in SAVED_AT:
        ckpt = run.ckpt(step)
        manifest = read_manifest(ckpt)
        on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST)
        assert sorted(manifest["files"]) == on_disk and RANK_FILE.format(rank=0) in on_disk
        assert manifest["step"] == step and manifest["data"] == {"cursor": 2 * step}
        assert manifest["layout"] == run.layout().record() and saved_layout(manifest) == run.layout()
        assert verify(ckpt) == []
    assert (run.root / "latest").read_text().strip() == "step_00000004"


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_verify_names_any_damaged_file_of_a_training_checkpoint(runs, tmp_path, stage):
    ckpt = runs[stage].copy(tmp_path) / "step_00000004"
    pristine = {name: (ckpt / name).read_bytes() for name in read_manifest(ckpt)["files"]}
    damages = {
        "fails its checksum": lambda p: flip(p, at=p.stat().st_size // 2, count=1),  # one byte
        "bytes, the manifest says": lambda p: p.write_bytes(p.read_bytes()[:-1]),
        "is missing": lambda p: p.unlink(),
    }
    for name, data in pristine.items():
        for problem, damage in damages.items():
            damage(ckpt / name)
            problems = verify(ckpt)
            assert len(problems) == 1 and problems[0].startswith(f"{name} ") and problem in problems[0], problems
            with pytest.raises(CheckpointError, match=f"is damaged: {name} "):
                resolve_checkpoint(ckpt)
            (ckpt / name).write_bytes(data)
    assert verify(ckpt) == []


# ----------------------------------------------------------------------------------------
# Which checkpoint is read
# ----------------------------------------------------------------------------------------

def test_readers_take_the_newest_complete_checkpoint_and_leave_unfinished_saves_alone(runs, tmp_path):
    run = runs[1]
    root = run.copy(tmp_path)
    newest = root / "step_00000004"
    shutil.copytree(newest, root / "step_00000006.tmp")  # a save killed before its rename, manifest and all
    (root / "step_00000008").mkdir()  # a step directory without a manifest
    assert resolve_checkpoint(root.parent) == resolve_checkpoint(root) == newest
    assert (root / "step_00000006.tmp").is_dir(), "a single-process reader deletes nothing"
    for incomplete in ("step_00000006.tmp", "step_00000008"):
        with pytest.raises(CheckpointError, match="is incomplete"):
            resolve_checkpoint(root / incomplete)
    for latest in ("step_00000002\n", "step_00000009\n"):  # an older complete one, one that does not exist:
        (root / "latest").write_text(latest)               # the highest complete step wins, whatever `latest` says
        assert resolve_checkpoint(root) == newest
    (root / "latest").unlink()
    assert resolve_checkpoint(root) == newest


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_falls_back_to_the_earlier_checkpoint_and_reads_its_state(runs, tmp_path, stage):
    run = runs[stage]
    root = run.copy(tmp_path)
    shutil.copytree(root / "step_00000004", root / "step_00000006.tmp")
    ckpt, notes = checkpoint_to_resume(root, "fail", is_main=True)
    assert ckpt == root / "step_00000004" and "step_00000006.tmp" in notes[0]
    assert not (root / "step_00000006.tmp").exists()
    shard = MODEL_STATES.format(mp=0) if stage == 0 else ZERO_OPTIM.format(dp=0, mp=0)
    flip(root / "step_00000004" / shard, at=(root / "step_00000004" / shard).stat().st_size // 2, count=1)
    with pytest.raises(CheckpointError, match=f"{shard} fails its checksum.* verifies is step_00000002"):
        checkpoint_to_resume(root, "fail", is_main=True)
    ckpt, notes = checkpoint_to_resume(root, "previous", is_main=True)
    assert ckpt == root / "step_00000002" and "step_00000004 is damaged" in notes[-1]
    # (ZeRO 1-3: DeepSpeed also leaves its zero_to_fp32.py scripts beside the step directories)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000000", "step_00000002", "step_00000004.damaged"]
    assert not (root / "latest").exists()  # it named the damaged one
    full = read_full_state(ckpt, run.cfg, saved_layout(read_manifest(ckpt)))
    assert_equal_tensors({n: read() for n, read in full.weights.items()}, run.saved[2].weights)
    for name, moments in run.saved[2].moments.items():
        assert_equal_tensors({k: full.optimizer[name][k]() for k in ADAM}, moments)
    assert full.adam_step.item() == 2 and full.counters["global_steps"] == 2


def test_a_rank_that_still_sees_a_set_aside_checkpoint_stops_instead_of_looping(runs, tmp_path):
    """on_corrupt=previous: rank 0 renames the damaged checkpoint; a rank whose disk is not the
    one rank 0 renamed on (node-local run directories) would find it again and again."""
    root = runs[0].copy(tmp_path)
    flip(root / "step_00000004" / MODEL_STATES.format(mp=0), at=100, count=1)
    with pytest.raises(CheckpointError, match="step_00000004 was set aside by rank 0 but is still in .* shares"):
        checkpoint_to_resume(root, "previous", is_main=False)
    assert (root / "step_00000004").is_dir(), "a rank other than 0 renames nothing"


# ----------------------------------------------------------------------------------------
# Same-layout loading: DeepSpeed's own reader, and the trainer state with the RNG
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [0, 1])
def test_load_checkpoint_restores_the_engine_and_the_rng(runs, stage):
    run = runs[stage]
    train = TrainConfig(max_steps=6, warmup_steps=1, lr=1e-2, global_batch_size=2, seq_len=16)
    torch.manual_seed(1)  # other weights than the checkpoint's
    engine = build_engine(HybridLM(run.cfg), train.optimizer(), ParallelConfig(zero_stage=stage, micro_batch_size=2), 1)
    keep = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        state = load_checkpoint(engine, run.ckpt(4), rank=0)
        after = draws()
    finally:
        torch.set_rng_state(keep[0])
        random.setstate(keep[1])
        np.random.set_state(keep[2])
    assert state["step"] == 4 and state["data"] == {"cursor": 8} and state["layout"] == run.layout().record()
    assert torch.equal(after[0], run.rng_after_last_save[0]) and after[1:] == run.rng_after_last_save[1:]
    assert_equal_tensors(module_weights(engine), run.saved[4].weights)
    got = moments_of(engine, stage)
    for name, moments in run.saved[4].moments.items():
        assert_equal_tensors(got[name], moments)
    assert engine.global_steps == 4 and engine.lr_scheduler.state_dict() == run.saved[4].lr_scheduler
    engine.destroy()


def test_a_rank_without_its_rng_file_keeps_its_own_rng(runs):
    """A resharded resume on more ranks than wrote the checkpoint: the new ranks' RNG stays as seeded."""
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    state = load_trainer_state(runs[0].ckpt(4), rank=1)
    assert torch.equal(torch.rand(4), want) and state["step"] == 4


# ----------------------------------------------------------------------------------------
# Layout: what a checkpoint records of the job that wrote it
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [Layout(1, 1, 1), Layout(1, 1, 4, 1), Layout(2, 1, 2, 2), Layout(2, 2, 2, 0),
                                    Layout(1, 4, 1, 1), Layout(4, 1, 3, 3)])
def test_a_layout_record_round_trips_through_the_manifest(layout):
    record = layout.record()
    assert record == {"world_size": layout.tp * layout.pp * layout.dp, "tp": layout.tp, "pp": layout.pp,
                      "zero_stage": layout.zero_stage}
    assert Layout.from_record(json.loads(json.dumps(record))) == layout
    assert saved_layout({"layout": record}) == layout


def test_a_manifest_without_a_whole_layout_record():
    assert saved_layout({}) == saved_layout({"layout": None}) == Layout(1, 1, 1, 0)  # `strata import`: one process
    assert Layout.from_record({"world_size": 8, "tp": 2}) == Layout(2, 1, 4, 0)  # written before pp and zero_stage
