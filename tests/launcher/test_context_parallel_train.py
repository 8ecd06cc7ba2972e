"""parallel.cp through the real entry point: a 2-rank cp=2 run trains with one process's losses
and evaluation (each rank feeding its pieces of the same rows); its checkpoint resumes with cp=1 and
a one-process checkpoint with cp=2 (CP shards no parameter), continuing as the unbroken run; cp=2 x
dp=2 with ZeRO-3 and selective recompute, cp=2 x tp=2 with sequence parallelism, and cp=2 x pp=2
train as one process too."""
import shutil

import pytest

from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS = 10
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=5", "checkpoint.every=5", "data.doc_boundaries=true",
          "model.mamba.ngroups=2"]  # TP2 splits the groups


def final_eval_loss(stdout: str) -> float:
    return float(stdout.split("final eval loss ")[1].split()[0])


def assert_same_losses(got: dict, want: dict, rel: float = 1e-6):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel), f"step {step}: {got[step]} != {want[step]}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("one")
    proc = run_strata(["train", *TINY, *corpus_overrides, *COMMON, f"train.run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir), final_eval_loss(proc.stdout), run_dir


def test_cp2_trains_as_one_process_and_resumes_with_cp1(tmp_path, corpus_overrides, one_process):
    want, want_eval, _ = one_process
    base = ["train", *TINY, *corpus_overrides, *COMMON, f"train.run_dir={tmp_path}"]
    cp2 = run_strata([*base, "parallel.cp=2"], nproc=2)
    assert cp2.returncode == 0, cp2.stderr[-3000:]
    assert "world=2 dp=1 zero=0 tp=1 cp=2 pp=1" in cp2.stdout
    assert_same_losses(train_losses(tmp_path), want)
    assert final_eval_loss(cp2.stdout) == pytest.approx(want_eval, rel=1e-6)

    shutil.rmtree(tmp_path / "checkpoints" / f"step_{STEPS:08d}")  # resume from step 5's, with cp=1
    (tmp_path / "metrics.jsonl").unlink()  # only the resumed steps' losses are read back
    resumed = run_strata(base)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tp=1 pp=1 | resumed from step_00000005" in resumed.stdout
    assert_same_losses(train_losses(tmp_path), {step: want[step] for step in range(6, STEPS + 1)})


def test_a_one_process_checkpoint_resumes_with_cp2(tmp_path, corpus_overrides, one_process):
    want, _, written = one_process
    run_dir = tmp_path / "run"
    shutil.copytree(written, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    (run_dir / "metrics.jsonl").unlink()  # only the resumed steps' losses are read back
    resumed = run_strata(["train", *TINY, *corpus_overrides, *COMMON, f"train.run_dir={run_dir}", "parallel.cp=2"],
                         nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "cp=2 pp=1 | resumed from step_00000005" in resumed.stdout
    assert_same_losses(train_losses(run_dir), {step: want[step] for step in range(6, STEPS + 1)})


def test_cp2_with_dp2_zero3_and_selective_recompute_trains_as_one_process(tmp_path, corpus_overrides, one_process):
    """(Evaluation is not compared: each data-parallel rank evaluates its own held-out batches.)"""
    want, _, _ = one_process
    proc = run_strata(["train", *TINY, *corpus_overrides, *COMMON, f"train.run_dir={tmp_path}", "parallel.cp=2",
                       "parallel.zero_stage=3", "train.recompute=selective"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=4 dp=2 zero=3 tp=1 cp=2 pp=1" in proc.stdout
    assert_same_losses(train_losses(tmp_path), want)


def test_cp2_with_tp2_and_sequence_parallelism_trains_as_one_process(tmp_path, corpus_overrides, one_process):
    want, want_eval, _ = one_process
    proc = run_strata(["train", *TINY, *corpus_overrides, *COMMON, f"train.run_dir={tmp_path}", "parallel.cp=2",
                       "parallel.tp=2", "parallel.sequence_parallel=true"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=4 dp=1 zero=0 tp=2 cp=2 pp=1" in proc.stdout
    assert_same_losses(train_losses(tmp_path), want)
    assert final_eval_loss(proc.stdout) == pytest.approx(want_eval, rel=1e-6)


def test_cp2_with_pp2_trains_as_one_process(tmp_path, corpus_overrides, one_process):
    want, want_eval, _ = one_process
    proc = run_strata(["train", *TINY, *corpus_overrides, *COMMON, f"train.run_dir={tmp_path}", "parallel.cp=2",
                       "parallel.pp=2", "parallel.zero_stage=1"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=4 dp=1 zero=1 tp=1 cp=2 pp=2" in proc.stdout
    assert_same_losses(train_losses(tmp_path), want)
    assert final_eval_loss(proc.stdout) == pytest.approx(want_eval, rel=1e-6)
