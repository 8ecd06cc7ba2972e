"""Resuming on another layout: a checkpoint from one world size / ZeRO stage / TP or PP
degree continues on another with the losses an unbroken run has (parallel/reshard.py)."""
import shutil

import pytest

from parallel.reshard import reshard_refusal, same_layout
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


# (layout that wrote the checkpoint, processes), (layout that resumes it, processes); None: the
# one-process run itself. Together they read every source format (ZeRO 0 with and without PP,
# ZeRO 1 fragments over DP, over TP and over pipeline stages) and build every target kind.
CASES = {
    "dp2-zero1-to-one-process": ((["parallel.zero_stage=1"], 2), (["parallel.zero_stage=0"], 1)),
    "one-process-to-tp2-zero1": (None, (["parallel.tp=2", "parallel.zero_stage=1"], 2)),
    "tp2-zero0-to-pp2-zero1": ((["parallel.tp=2", "parallel.zero_stage=0"], 2),
                               (["parallel.pp=2", "parallel.zero_stage=1"], 2)),
    "pp2-zero1-to-tp2-zero2": ((["parallel.pp=2", "parallel.zero_stage=1"], 2),
                               (["parallel.tp=2", "parallel.zero_stage=2"], 2)),
    "pp2-zero0-to-one-process": ((["parallel.pp=2", "parallel.zero_stage=0"], 2), (["parallel.zero_stage=0"], 1)),
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
    resumed = run_strata(args(run_dir, corpus_overrides, *target), nproc=target_nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{HALF:08d} at step {HALF} (resharded from" in resumed.stdout
    assert_same_losses(train_losses(run_dir), want, rel=1e-5)


def test_unreshardable_layout_change_is_one_line_and_leaves_the_checkpoints(one_process, corpus_overrides, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_process[0], run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_strata(args(run_dir, corpus_overrides, "parallel.zero_stage=3"))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint ") and "ZeRO-3 partitions are not resharded" in line
    assert "resume with parallel.tp=1 parallel.pp=1 parallel.zero_stage=0 on 1 ranks" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_which_layout_changes_reshard():
    saved = {"world_size": 2, "tp": 1, "pp": 1, "zero_stage": 1}
    assert same_layout(saved, dict(saved))
    assert same_layout({**saved, "zero_stage": 0}, {**saved, "zero_stage": 0, "world_size": 4})  # DP replicas
    assert not same_layout(saved, {**saved, "world_size": 4})
    assert not same_layout(saved, {**saved, "tp": 2})
    assert not same_layout(saved, {**saved, "pp": 2})
    assert reshard_refusal("c", saved, {**saved, "world_size": 8, "tp": 2, "pp": 2, "zero_stage": 0}) is None
    assert "ZeRO-3" in reshard_refusal("c", {**saved, "zero_stage": 3}, {**saved, "world_size": 4})
    assert "ZeRO-3" in reshard_refusal("c", saved, {**saved, "zero_stage": 3})
