"""What only several nodes would show, on one machine: ranks started by hand (as srun starts one task per
GPU), each given its own view of the disk. Whatever decides the collectives that follow (is the run
directory shared, which checkpoint to resume, is the corpus ready) is decided once and shared, and a
problem on one rank ends every rank within seconds, in one line, instead of a hang until the watchdog."""
import os
import subprocess
import sys
import time

import pytest

from tests.launcher.conftest import REPO, TINY, free_port, run_strata, train_losses


def start_ranks(per_rank_args: list[list[str]], **env) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank, args in enumerate(per_rank_args):
        rank_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RANK": str(rank),
                    "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(per_rank_args)), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port, **env}
        procs.append(subprocess.Popen([sys.executable, "-m", "strata.launcher.train", *args], cwd=REPO, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def train_args(run_dir, corpus_overrides, *more) -> list[str]:
    return [*TINY, *corpus_overrides, f"train.run_dir={run_dir}", "train.eval_every=0", "logging.tensorboard=false",
            *more]


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_ranks_that_see_different_run_directories_stop_in_one_line_each(tmp_path, corpus_overrides,
                                                                          with_checkpoint):
    """As with a node-local train.run_dir: rank 1 does not see what rank 0 wrote. Fresh, every rank would
    have trained into its own directory and rank 0 alone committed; resuming, rank 0 would have entered the
    resume's collectives while rank 1 started fresh."""
    if with_checkpoint:
        first = run_strata(["train", *train_args(tmp_path / "node0", corpus_overrides, "train.max_steps=2")])
        assert first.returncode == 0, first.stderr[-3000:]
    started = time.monotonic()
    results = finish(start_ranks([train_args(tmp_path / f"node{rank}", corpus_overrides, "train.max_steps=4")
                                  for rank in (0, 1)]))
    assert time.monotonic() - started < 120  # seconds, not the collective timeout
    for rank, (code, stderr) in enumerate(results):
        assert code == 2, stderr[-3000:]
        lines = error_lines(stderr)
        assert len(lines) == 1, stderr[-3000:]
        assert "not shared with rank 0" in lines[0] and "node-local storage?" in lines[0], lines
        assert lines[0].startswith("error: rank 1: train.run_dir: ") or rank == 0 and "rank 1:" in lines[0], lines
    assert not (tmp_path / "node1" / "checkpoints").exists()
    assert not list(tmp_path.rglob(".strata-shared-probe"))


def test_a_problem_on_one_rank_ends_every_rank_in_one_line(tmp_path, corpus_overrides):
    """Rank 1's data.prepared_dir holds no corpus (a node-local one, on the node that did not prepare it):
    the error is rank 1's alone, and every rank stops with it within seconds."""
    args = [train_args(tmp_path / "run", corpus_overrides, "train.max_steps=2") for _ in (0, 1)]
    args[1].append(f"data.prepared_dir={tmp_path / 'empty'}")
    (tmp_path / "empty").mkdir()
    started = time.monotonic()
    results = finish(start_ranks(args))
    assert time.monotonic() - started < 120
    for code, stderr in results:
        assert code == 1, stderr[-3000:]
        lines = error_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith("error: rank 1: ") and str(tmp_path / "empty") in lines[0], \
            stderr[-3000:]


def test_corpus_preparation_longer_than_the_collective_timeout_does_not_end_the_job(tmp_path):
    """Rank 0 prepares a fresh corpus for longer than parallel.timeout_s while rank 1 waits: on the
    long-wait group (parallel.long_timeout_s), not under the collectives' timeout."""
    corpus = ["data.inputs=[stdlib]", "data.stdlib_max_mb=1", "data.vocab_size=512", "data.val_fraction=0.05",
              f"data.prepared_dir={tmp_path / 'prepared'}", "data.workers=1"]  # about 5 s to prepare on 2 cores
    proc = run_strata(["train", *train_args(tmp_path / "run", corpus, "train.max_steps=2", "checkpoint.every=0",
                                            "parallel.timeout_s=1")], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    took = [line for line in proc.stderr.splitlines() if "prepared" in line and " in " in line]
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    assert took, proc.stderr[-3000:]


@pytest.mark.parametrize("env, warned", [
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}, True),
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),  # the fresh store
    ({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}, False),
    ({}, False)])
def test_a_restart_that_would_hang_is_said_at_start(monkeypatch, env, warned):
    """torchrun --max-restarts with its shared rendezvous store: the restarted job would hang (reproduced
    with torch 2.13 and gloo; test_long_life's restart test sets the switch that avoids it)."""
    from strata.parallel.distributed import restart_hazard

    for key in ("TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    hazard = restart_hazard()
    assert bool(hazard) == warned
    assert not warned or "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in hazard
