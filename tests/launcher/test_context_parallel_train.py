"""parallel.cp through the real entry point: a 2-rank cp=2 run trains with one process's losses
and evaluation (each rank feeding its pieces of the same rows), and its checkpoint resumes with
cp=1 (CP shards no parameter), continuing as the unbroken run."""
import shutil

import pytest

from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS = 10
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=5", "checkpoint.every=5", "data.doc_boundaries=true"]


def final_eval_loss(stdout: str) -> float:
    return float(stdout.split("final eval loss ")[1].split()[0])


def assert_same_losses(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), f"step {step}: {got[step]} != {want[step]}"


def test_cp2_trains_as_one_process_and_resumes_with_cp1(tmp_path, corpus_overrides):
    base = ["train", *TINY, *corpus_overrides, *COMMON]
    one = run_strata([*base, f"train.run_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    run_dir = tmp_path / "cp2"
    cp2 = run_strata([*base, f"train.run_dir={run_dir}", "parallel.cp=2"], nproc=2)
    assert cp2.returncode == 0, cp2.stderr[-3000:]
    assert "world=2 dp=1 zero=0 tp=1 cp=2 pp=1" in cp2.stdout
    assert_same_losses(train_losses(run_dir), train_losses(tmp_path / "one"))
    assert final_eval_loss(cp2.stdout) == pytest.approx(final_eval_loss(one.stdout), rel=1e-6)

    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")  # resume from step 5's, with cp=1
    resumed = run_strata([*base, f"train.run_dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "cp=1 pp=1 | resumed from step_00000005" in resumed.stdout
    assert_same_losses(train_losses(run_dir), train_losses(tmp_path / "one"))

