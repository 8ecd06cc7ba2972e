"""A job's whole life, end to end: preempted under torchrun, resumed on another number of ranks,
killed in the middle of a save, resumed with another ZeRO stage, given a damaged shard, finished;
the losses are the unbroken run's and every checkpoint it wrote exports and generates. And a rank
killed under torchrun --max-restarts: the job restarts itself and finishes as if unbroken."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strata.launcher import export, generate
from strata.parallel.checkpoint.files import complete_checkpoints, verify
from tests.launcher.conftest import REPO, TINY, run_strata, train_losses

STEPS, EVERY = 24, 4
PREEMPTED = 75


def args(run_dir, corpus_overrides, *more):
    return ["train", *TINY, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={run_dir}",
            "train.eval_every=0", f"checkpoint.every={EVERY}", "checkpoint.keep_last=100", *more]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("unbroken")
    proc = run_strata(args(run_dir, corpus_overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)


def logged_steps(run_dir, since: float = 0.0) -> list[int]:
    """Train steps in metrics.jsonl, those logged after `since` (time.time()) only when given: a
    restarted run's file still holds the killed run's steps until it has cut them."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r["kind"] == "train" and r["time"] > since]


def wait_for(predicate, proc, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def preempt(run_dir, corpus_overrides, after_step: int, nproc: int, *layout) -> tuple[int, int, str]:
    """Start the run, SIGTERM it (the launcher's process) once it is past `after_step`; returns
    the step it saved at, the exit code and stdout. No step is lost: the newest checkpoint is the
    last step logged."""
    started = time.time()
    proc = run_strata(args(run_dir, corpus_overrides, *layout), nproc=nproc, wait=False)
    wait_for(lambda: max(logged_steps(run_dir, since=started), default=0) > after_step, proc, f"step {after_step}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    saved = max(int(p.name[5:]) for p in complete_checkpoints(run_dir / "checkpoints"))
    assert max(logged_steps(run_dir)) == saved, f"steps lost to the preemption: {err[-3000:]}"
    assert f"stopped by SIGTERM at step {saved}" in err, err[-2000:]
    assert "[rank" not in err, "a worker's traceback"  # (torchrun prints its own SignalException)
    return saved, proc.returncode, out


def kill_during_save(run_dir, corpus_overrides, *layout) -> bool:
    """SIGKILL the run as soon as its second save has started; True when it landed before that
    save ended."""
    proc = run_strata(args(run_dir, corpus_overrides, *layout), wait=False)
    ckpts = run_dir / "checkpoints"
    before = {p.name for p in complete_checkpoints(ckpts)}
    wait_for(lambda: {p.name for p in complete_checkpoints(ckpts)} - before, proc, "a first save")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(p.name.endswith(".tmp") and p.name.startswith("step_") for p in ckpts.iterdir()):
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = [p for p in ckpts.iterdir() if p.name.startswith("step_") and p.name.endswith(".tmp")]
    assert {p.name for p in complete_checkpoints(ckpts)} >= before
    return bool(partial)


def test_a_job_preempted_resharded_killed_and_damaged_trains_as_if_unbroken(tmp_path, corpus_overrides, unbroken):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    # 1. two ranks, ZeRO-1, preempted under torchrun: every rank saves at the next step boundary
    saved, code, _ = preempt(run_dir, corpus_overrides, 5, 2, "parallel.zero_stage=1")
    assert code != 0

    # 2. resumed on one process (resharded), SIGKILLed in the middle of a save
    mid_save = kill_during_save(run_dir, corpus_overrides, "parallel.zero_stage=0")

    # 3. resumed on two ranks with ZeRO-2 (resharded again), preempted again; the unfinished
    #    save of 2. was removed at start-up
    stale = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert bool(stale) == mid_save
    _, _, out = preempt(run_dir, corpus_overrides, 15, 2, "parallel.zero_stage=2")
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert "(resharded from world=1 tp=1 pp=1 zero=0)" in out
    assert ("unfinished save(s) left by an interrupted run" in out) == mid_save

    # 4. a damaged shard in the newest checkpoint: refused in one line, nothing changed
    newest = complete_checkpoints(ckpts)[-1]
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
    shard.write_bytes(bytes(data))
    before = sorted(p.name for p in ckpts.iterdir())
    proc = run_strata(args(run_dir, corpus_overrides, "parallel.zero_stage=2"), nproc=2)
    assert proc.returncode == 1
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "[rank" not in proc.stderr, proc.stderr[-3000:]  # torchrun's own report aside
    assert f"{shard.name} fails its checksum" in line[0]
    earlier = complete_checkpoints(ckpts)[-2]
    assert f"the newest earlier checkpoint that verifies is {earlier.name}" in line[0]
    assert sorted(p.name for p in ckpts.iterdir()) == before

    # 5. on_corrupt=previous: set aside, resumed from the earlier one (same layout), finished
    proc = run_strata(args(run_dir, corpus_overrides, "parallel.zero_stage=2", "checkpoint.on_corrupt=previous"),
                      nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {earlier.name}" in proc.stdout
    assert (ckpts / f"{newest.name}.damaged").is_dir()

    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in unbroken.items():
        assert got[step] == pytest.approx(want, rel=1e-6), f"step {step}: {got[step]} != {want}"

    # every checkpoint the job wrote verifies, exports and generates
    written = complete_checkpoints(ckpts)
    assert {EVERY, saved, STEPS - EVERY, STEPS} <= {int(p.name[5:]) for p in written}  # phases 1 and 5
    for ckpt in written:
        assert verify(ckpt) == []
        assert export.main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf" / ckpt.name)]) == 0
        assert generate.main(["--checkpoint", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4"]) == 0


def test_ctrl_c_saves_where_the_run_stands_and_the_resume_is_exact(tmp_path, corpus_overrides, unbroken):
    run_dir = tmp_path / "run"
    started = time.time()
    proc = run_strata(args(run_dir, corpus_overrides), wait=False)  # the unbroken run's environment (threads)
    wait_for(lambda: max(logged_steps(run_dir, since=started), default=0) > 5, proc, "step 5")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = max(logged_steps(run_dir))
    assert complete_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stopped:08d}"
    resumed = run_strata(args(run_dir, corpus_overrides))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step_{stopped:08d}" in resumed.stdout
    got = train_losses(run_dir)
    differ = {s: (got[s], unbroken[s]) for s in unbroken if got[s] != unbroken[s]}
    assert not differ, f"a same-layout resume is bitwise; stopped at {stopped}, differ at {differ}"


def worker_of(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank`, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


def test_a_killed_rank_restarts_the_job_in_place_and_it_finishes_as_if_unbroken(tmp_path, corpus_overrides, unbroken):
    """kill -9 of one rank of two under torchrun --max-restarts 1: the surviving rank says which rank left and
    that the job restarts; torchrun starts both again, they resume from the newest checkpoint, and the job
    ends by itself (exit 0) with the unbroken run's losses."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "strata.launcher.train",
           *args(run_dir, corpus_overrides, "parallel.zero_stage=1")[1:]]
    # a fresh rendezvous store per attempt, as strata launch slurm's script sets it (restart_hazard says why)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: max(logged_steps(run_dir), default=0) > 2 * EVERY + 1, proc, f"step {2 * EVERY + 1}")
    os.kill(worker_of(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "strata: rank 0: rank 1 left the job" in err and "torchrun restarts it in place (restart 1 of 1)" in err, \
        err[-3000:]
    assert re.search(r"resumed from step_\d{8} at step \d+", out), out[-3000:]
    assert "strata: warning" not in err
    got = train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in unbroken.items():
        assert got[step] == pytest.approx(want, rel=1e-6), f"step {step}: {got[step]} != {want}"
