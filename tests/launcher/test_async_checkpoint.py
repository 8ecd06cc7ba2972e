"""checkpoint.async (parallel/checkpoint/background.py): the files are the synchronous save's, byte for
byte; a SIGKILL during a background write leaves the previous checkpoint the newest, a stop signal
waits for the save in flight and loses no step, a save due while one is in flight is said in one line
and waited for or skipped, and a full disk in the background is the synchronous save's one line.
STRATA_TEST_CHECKPOINT_WRITE_DELAY slows the writer down so that the tests can act during a write."""
import filecmp
import signal
import time

import pytest

from strata.parallel.checkpoint.background import WRITE_DELAY_VARIABLE
from strata.parallel.checkpoint.files import MANIFEST, complete_checkpoints, read_manifest, safe_load, verify
from tests.launcher.conftest import TINY, run_strata, train_losses
from tests.launcher.test_failures import error_line, small_disk  # noqa: F401 (a fixture)
from tests.launcher.test_long_life import logged_steps, wait_for

STEPS, EVERY = 16, 4
PREEMPTED = 75
ASYNC = "checkpoint.async=true"


def args(run_dir, corpus_overrides, *more, steps=STEPS, every=EVERY):
    return ["train", *TINY, *corpus_overrides, f"train.max_steps={steps}", f"train.run_dir={run_dir}",
            "train.eval_every=0", f"checkpoint.every={every}", "checkpoint.keep_last=100", *more]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, corpus_overrides):
    """A synchronous run: its losses and its checkpoints."""
    run_dir = tmp_path_factory.mktemp("unbroken")
    proc = run_strata(args(run_dir, corpus_overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def steps_of(run_dir) -> list[int]:
    return [int(p.name[5:]) for p in complete_checkpoints(run_dir / "checkpoints")]


def in_flight(run_dir) -> list[str]:
    ckpts = run_dir / "checkpoints"
    return [p.name for p in ckpts.iterdir() if p.name.startswith("step_") and p.name.endswith(".tmp")] \
        if ckpts.is_dir() else []


def training_past_a_save_in_flight(run_dir, since: float = 0.0) -> bool:
    writing = in_flight(run_dir)
    return bool(writing) and max(logged_steps(run_dir, since), default=0) > int(writing[0][5:13])


def assert_same_checkpoints(got, want) -> None:
    """Every checkpoint of `got` is `want`'s, file for file: DeepSpeed's byte for byte, the manifest and
    the RNG files but for Python's and numpy's generators, which no process seeds (so two runs differ
    there, synchronous or not; the model draws nothing from them)."""
    got_dirs, want_dirs = complete_checkpoints(got / "checkpoints"), complete_checkpoints(want / "checkpoints")
    assert [p.name for p in got_dirs] == [p.name for p in want_dirs]
    for a, b in zip(got_dirs, want_dirs):
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        assert verify(a) == [], a
        rng_files = [n for n in names if n.startswith("rank_")]
        differ = [n for n in names if n not in rng_files and n != MANIFEST and not filecmp.cmp(a / n, b / n, shallow=False)]
        assert not differ, f"{a.name}: {differ} differ from the synchronous save's"
        for name in rng_files:
            mine, theirs = (safe_load(d / name) for d in (a, b))
            for key in ("torch", "optimizer_param_names"):
                assert str(mine[key]) == str(theirs[key]) and (key != "torch" or mine[key].equal(theirs[key]))
        manifests = [read_manifest(d) for d in (a, b)]
        for m in manifests:
            for name in rng_files:
                m["files"].pop(name)
        assert manifests[0] == manifests[1]


def assert_losses_are_unbroken(run_dir, unbroken_dir) -> None:
    got, want = train_losses(run_dir), train_losses(unbroken_dir)
    assert sorted(got) == sorted(want)
    differ = {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    assert not differ, f"a same-layout resume is bitwise; differ at {differ}"


def test_an_async_run_writes_the_synchronous_checkpoints(tmp_path, corpus_overrides, unbroken):
    run_dir = tmp_path / "async"
    proc = run_strata(args(run_dir, corpus_overrides, ASYNC))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_losses_are_unbroken(run_dir, unbroken)
    assert_same_checkpoints(run_dir, unbroken)
    assert not in_flight(run_dir)


def test_two_ranks_with_zero_2_write_the_synchronous_checkpoints_and_resume_from_them(tmp_path, corpus_overrides):
    layout = ("parallel.zero_stage=2", "checkpoint.keep_last=100")
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    for run_dir, more in ((sync_dir, ()), (async_dir, (ASYNC,))):
        proc = run_strata(args(run_dir, corpus_overrides, *layout, *more, steps=8), nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoints(async_dir, sync_dir)
    assert_losses_are_unbroken(async_dir, sync_dir)
    # resumed from the async run's step 4: the sync run's losses after it
    ckpts = async_dir / "checkpoints"
    for later in complete_checkpoints(ckpts)[1:]:
        for f in later.iterdir():
            f.unlink()
        later.rmdir()
    proc = run_strata(args(async_dir, corpus_overrides, *layout, ASYNC, steps=8), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step_00000004" in proc.stdout
    assert_losses_are_unbroken(async_dir, sync_dir)


def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path, corpus_overrides, unbroken,
                                                                              monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv(WRITE_DELAY_VARIABLE, "1.5")  # per file: each save takes 3 s or more to write
    proc = run_strata(args(run_dir, corpus_overrides, ASYNC), wait=False)
    wait_for(lambda: steps_of(run_dir), proc, "a first complete checkpoint")
    first = steps_of(run_dir)[-1]
    # the next save is being written while training goes on past it: kill then
    wait_for(lambda: training_past_a_save_in_flight(run_dir), proc, "training past a save in flight")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert steps_of(run_dir) == [first] and in_flight(run_dir), "the kill did not land during a background write"
    monkeypatch.delenv(WRITE_DELAY_VARIABLE)
    resumed = run_strata(args(run_dir, corpus_overrides, ASYNC))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{first:08d}" in resumed.stdout
    assert "removed 1 unfinished save(s) left by an interrupted run" in resumed.stdout
    assert_losses_are_unbroken(run_dir, unbroken)


def test_a_stop_signal_waits_for_the_save_in_flight_and_loses_no_step(tmp_path, corpus_overrides, unbroken,
                                                                     monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv(WRITE_DELAY_VARIABLE, "1.5")
    started = time.time()
    proc = run_strata(args(run_dir, corpus_overrides, ASYNC), wait=False)
    wait_for(lambda: training_past_a_save_in_flight(run_dir, started), proc, "training past a save in flight")
    writing = int(in_flight(run_dir)[0][5:13])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, err[-3000:]
    stopped = max(logged_steps(run_dir))
    assert f"stopped by SIGTERM at step {stopped}" in err and "Traceback" not in err, err[-3000:]
    assert {writing, stopped} <= set(steps_of(run_dir)) and not in_flight(run_dir)
    assert read_manifest(complete_checkpoints(run_dir / "checkpoints")[-1])["step"] == stopped
    monkeypatch.delenv(WRITE_DELAY_VARIABLE)
    resumed = run_strata(args(run_dir, corpus_overrides, ASYNC))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{stopped:08d}" in resumed.stdout
    assert_losses_are_unbroken(run_dir, unbroken)


@pytest.mark.parametrize("busy", ["wait", "skip"])
def test_a_save_due_while_one_is_in_flight_is_said_and_waited_for_or_skipped(tmp_path, corpus_overrides, busy,
                                                                             monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv(WRITE_DELAY_VARIABLE, "0.5")  # a save takes longer to write than a step
    proc = run_strata(args(run_dir, corpus_overrides, ASYNC, f"checkpoint.async_busy={busy}", steps=5, every=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [ln for ln in proc.stdout.splitlines() if "is still being written" in ln]
    assert said, proc.stdout[-3000:]
    if busy == "wait":
        assert all(ln.endswith("is still being written: waiting for it") for ln in said), said
        assert steps_of(run_dir) == [1, 2, 3, 4, 5]
    else:
        skipped = {int(ln.split("|")[0].split()[1]) for ln in said if ln.endswith("this save skipped "
                                                                               "(checkpoint.async_busy=skip)")}
        assert skipped and all(ln.endswith("waiting for it") for ln in said if ln.startswith("step      5 |"))
        assert len(said) == len(skipped) + any(ln.startswith("step      5 |") for ln in said), said
        assert set(steps_of(run_dir)) == {1, 2, 3, 4, 5} - skipped and 5 not in skipped  # the final save waits
    assert all(verify(c) == [] for c in complete_checkpoints(run_dir / "checkpoints"))


def test_a_full_disk_during_a_background_write_is_one_line_and_keeps_the_previous_checkpoint(small_disk,  # noqa: F811
                                                                                           corpus_overrides):
    run_dir = small_disk / "run"
    proc = run_strata(args(run_dir, corpus_overrides, ASYNC, steps=6, every=2))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "cannot write checkpoint step_00000004" in line and "no space left on device" in line
    assert "the previous checkpoint step_00000002 is intact" in line
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("step_")] == ["step_00000002"]
    assert verify(ckpts / "step_00000002") == []
