"""Resuming on another layout: a checkpoint from one world size / ZeRO stage / TP or PP
degree continues on another with the losses an unbroken run has (parallel/checkpoint/reshard.py)."""
import shutil

import pytest
import torch

from strata.launcher.config import load_run_config
from strata.parallel.checkpoint.consolidate import consolidate
from strata.parallel.layout import Layout
from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS, HALF = 8, 4
MODEL = [*TINY, "model.mamba.ngroups=2"]  # two groups: the Mamba2 mixer splits over TP=2


def args(run_dir, corpus_overrides, *layout):
    return ["train", *MODEL, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={run_dir}",
            "train.eval_every=0", f"checkpoint.every={HALF}", *layout]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("one_process")
    proc = run_strata(args(run_dir, corpus_overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, train_losses(run_dir)


def crash_after_half(run_dir):
    """The run as a crash after its step-4 checkpoint leaves it."""
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{HALF:08d}\n")


def assert_same_losses(got: dict, want: dict, rel: float):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel), f"step {step}: {got[step]} != {want[step]}"


def assert_export_reads_the_same_model(run_dir, reference_dir):
    """strata export's reader (consolidate) gives the one-process run's weights from any layout
    (to fp32 reduction-order differences over 4 steps)."""
    step = f"checkpoints/step_{HALF:08d}"
    got = consolidate(run_dir / step, load_run_config(run_dir / step).model)
    want = consolidate(reference_dir / step)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4, msg=name)


# (layout that wrote the checkpoint, processes), (layout that resumes it, processes); None: the
# one-process run itself. Together they read every source format (ZeRO 0 with and without PP,
# ZeRO 1 fragments over DP, over TP and over pipeline stages, ZeRO-3 partitions with TP) and
# build every target kind (ZeRO 0-3, TP, PP).
CASES = {
    "dp2-zero1-to-one-process": ((["parallel.zero_stage=1"], 2), (["parallel.zero_stage=0"], 1)),
    "one-process-to-tp2-zero1": (None, (["parallel.tp=2", "parallel.zero_stage=1"], 2)),
    "tp2-zero0-to-pp2-zero1": ((["parallel.tp=2", "parallel.zero_stage=0"], 2),
                               (["parallel.pp=2", "parallel.zero_stage=1"], 2)),
    "pp2-zero1-to-tp2-zero2": ((["parallel.pp=2", "parallel.zero_stage=1"], 2),
                               (["parallel.tp=2", "parallel.zero_stage=2"], 2)),
    "pp2-zero0-to-dp2-zero3": ((["parallel.pp=2", "parallel.zero_stage=0"], 2), (["parallel.zero_stage=3"], 2)),
    "tp2-zero3-to-one-process": ((["parallel.tp=2", "parallel.zero_stage=3"], 2), (["parallel.zero_stage=0"], 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_layout_continues_the_unbroken_run(tmp_path, corpus_overrides, one_process, case):
    reference_dir, want = one_process
    source, (target, target_nproc) = CASES[case]
    run_dir = tmp_path / "run"
    if source is None:
        shutil.copytree(reference_dir, run_dir)
    else:
        layout, nproc = source
        proc = run_strata(args(run_dir, corpus_overrides, *layout), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    crash_after_half(run_dir)
    assert_export_reads_the_same_model(run_dir, reference_dir)
    resumed = run_strata(args(run_dir, corpus_overrides, *target), nproc=target_nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{HALF:08d} at step {HALF} (resharded from" in resumed.stdout
    assert_same_losses(train_losses(run_dir), want, rel=1e-5)


def test_a_checkpoint_missing_a_shard_is_one_line_and_left_as_it_is(one_process, corpus_overrides, tmp_path):
    """Resharding reads every rank's files; a missing one is found by verification against the
    manifest and stops the run before anything is written, naming the earlier checkpoint."""
    run_dir = tmp_path / "run"
    proc = run_strata(args(run_dir, corpus_overrides, "parallel.zero_stage=1"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    proc = run_strata(args(run_dir, corpus_overrides, "parallel.zero_stage=0"))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint ") and "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in line
    assert f"the newest earlier checkpoint that verifies is step_{HALF:08d}" in line
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


def test_which_layout_changes_reshard():
    saved = Layout(tp=1, pp=1, dp=2, zero_stage=1)
    assert Layout.from_record(saved.record()) == saved
    assert saved.reloads_as_written(saved)
    zero0 = Layout(1, 1, 2, zero_stage=0)
    assert Layout(1, 1, 4, zero_stage=0).reloads_as_written(zero0)  # DP replicas
    assert not Layout(1, 1, 4, zero_stage=1).reloads_as_written(saved)
    assert not Layout(2, 1, 1, zero_stage=1).reloads_as_written(saved)
    assert not Layout(1, 2, 1, zero_stage=1).reloads_as_written(saved)
    assert not Layout(1, 1, 2, zero_stage=3).reloads_as_written(saved)
    # a manifest written before the typed record, or by `strata import` (no layout): one process
    assert Layout.from_record({"world_size": 1}) == Layout(1, 1, 1, 0)
