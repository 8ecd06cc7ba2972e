"""The real entry point, end to end: resume is exact, DP with ZeRO equals one process,
TensorBoard gets the scalars users watch."""
import signal
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS = 8


def final_eval_loss(stdout: str) -> float:
    return float(stdout.split("final eval loss ")[1].split()[0])


def assert_same_losses(got: dict, want: dict, rel: float):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel), f"step {step}: {got[step]} != {want[step]}"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("unbroken")
    proc = run_strata(["train", *TINY, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={run_dir}",
                       "train.eval_every=4", "checkpoint.every=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, train_losses(run_dir), proc.stdout


def test_default_run_reports_final_eval_loss(unbroken):
    _, losses, stdout = unbroken
    assert len(losses) == STEPS
    assert "final eval loss" in stdout


def test_killed_then_resumed_run_matches_unbroken(tmp_path, corpus_overrides, unbroken):
    _, want, _ = unbroken
    steps = 40  # long enough that the kill lands mid-run
    base = ["train", *TINY, *corpus_overrides, f"train.max_steps={steps}", "train.eval_every=0", "checkpoint.every=10"]
    reference_dir = tmp_path / "reference"
    assert run_strata([*base, f"train.run_dir={reference_dir}"]).returncode == 0
    run_dir = tmp_path / "killed"
    proc = run_strata([*base, f"train.run_dir={run_dir}"], wait=False)
    first = run_dir / "checkpoints" / "step_00000010"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(train_losses(run_dir))
    assert killed_at < steps
    resumed = run_strata([*base, f"train.run_dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_000000" in resumed.stdout
    assert_same_losses(train_losses(run_dir), train_losses(reference_dir), rel=1e-6)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_data_parallel_zero_matches_single_process(tmp_path, corpus_overrides, unbroken, stage):
    _, want, _ = unbroken
    proc = run_strata(["train", *TINY, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={tmp_path}",
                       "train.eval_every=4", "checkpoint.every=4", f"parallel.zero_stage={stage}"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2 dp=2" in proc.stdout
    assert_same_losses(train_losses(tmp_path), want, rel=1e-5)
    # Started again, the finished run loads its sharded ZeRO checkpoint and evaluates the same model.
    again = run_strata(["train", *TINY, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={tmp_path}",
                        "train.eval_every=4", "checkpoint.every=4", f"parallel.zero_stage={stage}"], nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step_00000008" in again.stdout
    assert final_eval_loss(again.stdout) == pytest.approx(final_eval_loss(proc.stdout), rel=1e-6)


def test_deepspeed_launcher_runs_the_same_entry_point(tmp_path, corpus_overrides, unbroken):
    _, want, _ = unbroken
    proc = run_strata(["train", *TINY, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={tmp_path}",
                       "train.eval_every=4", "checkpoint.every=4"], nproc=2, launcher="deepspeed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2 dp=2 zero=0" in proc.stdout
    assert_same_losses(train_losses(tmp_path), want, rel=1e-5)


def test_tensorboard_has_the_scalars(unbroken):
    run_dir, _, _ = unbroken
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tokens_seen",
                "train/step_time_s", "train/data_wait_share", "train/tflops_per_gpu", "train/peak_memory_gib",
                "eval/loss", "eval/perplexity"]:
        assert tag in tags
    assert len(events.Scalars("train/loss")) == STEPS
    assert [e.value for e in events.Scalars("train/skipped_steps")] == [0] * STEPS
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8]
    assert events.Tensors("config/text_summary")


def test_each_evaluation_shows_a_sample_of_the_model(unbroken):
    """logging.sample_prompt's greedy continuation, in the log and TensorBoard's text tab."""
    run_dir, _, stdout = unbroken
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    samples = events.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [4, 8]
    logged = [line for line in stdout.splitlines() if "| sample 'def " in line]
    assert [line.split("|")[0].split()[1] for line in logged] == ["4", "8"]
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("def ") and len(text) > len("def ")
