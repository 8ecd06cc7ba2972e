"""Two nodes on one machine, through the real entry point (gloo on CPU):
- torchrun, two invocations with --nnodes 2 on loopback: 2 x 2 ranks, TP=2 inside each
  node, PP=2 across them, ZeRO-1 (DeepSpeed's pipeline engine);
- the deepspeed launcher, two --no_ssh invocations over a two-host hostfile: 2 x 1 ranks,
  TP=2 across the nodes with sequence parallelism and ZeRO-2 (the plain engine, mpu);
each trains, checkpoints, and logs the losses and gradient norms of one process on the same
global batch. Bad layouts stop before any process group, with one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from strata.launcher.config import load_run_config
from tests.launcher.conftest import REPO, TINY, free_port, run_strata

STEPS = 6
ARGS = [*TINY, "model.mamba.ngroups=2",  # TINY's Mamba2 has one group: TP needs them split
        f"train.max_steps={STEPS}", "train.eval_every=6", "checkpoint.every=2"]


def train_records(run_dir: Path) -> dict:
    """Step -> (train loss, grad norm), and 'eval' -> the last eval loss."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {r["step"]: (r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"}
    out["eval"] = [r["loss"] for r in records if r["kind"] == "eval"][-1]
    return out


def launch(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_two_nodes(commands: list[list[str]]) -> list[str]:
    nodes = [launch(cmd) for cmd in commands]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("one")
    proc = run_strata(["train", *ARGS, *corpus_overrides, f"train.run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_trained_like_one_process(run_dir: Path, one_dir: Path) -> None:
    got, want = train_records(run_dir), train_records(one_dir)
    assert got.pop("eval") == pytest.approx(want.pop("eval"), rel=1e-4)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, (loss, norm) in want.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-4), f"step {step} loss"
        assert got[step][1] == pytest.approx(norm, rel=1e-4), f"step {step} grad norm"
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (checkpoints / "step_00000004" / "trainer.json").is_file()


def assert_same_weights(run_dir: Path, one_dir: Path) -> None:
    """The TP x PP checkpoint, consolidated (parallel/checkpoint/consolidate.py), holds the one-process
    run's weights: after 6 AdamW steps they agree to ~1e-5 (reduction order)."""
    from strata.parallel.checkpoint.consolidate import consolidate

    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    got = consolidate(ckpt, load_run_config(ckpt).model)
    want = consolidate(one_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        diff = (got[name] - want[name]).abs().max().item()
        assert diff < 1e-4, f"{name}: {diff}"


def forget_last_checkpoint(run_dir: Path) -> None:
    """As if the job had died between steps 4 and 6."""
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / f"step_{STEPS:08d}")
    (checkpoints / "latest").write_text("step_00000004\n")


def test_torchrun_two_nodes_tp_inside_pp_across(tmp_path, corpus_overrides, one_process):
    args = [*ARGS, *corpus_overrides, "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
            f"train.run_dir={tmp_path}"]

    def nodes():
        port = free_port()
        return [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={k}",
                 "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "strata.launcher.train",
                 *args] for k in (0, 1)]

    outputs = run_two_nodes(nodes())
    assert "world=4 dp=1 zero=1 tp=2 pp=2" in outputs[0]
    assert_trained_like_one_process(tmp_path, one_process)
    assert_same_weights(tmp_path, one_process)
    # Started again after losing the last checkpoint: the pipeline stages' and ZeRO-1 shards
    # are loaded and steps 5 and 6 repeat exactly.
    forget_last_checkpoint(tmp_path)
    outputs = run_two_nodes(nodes())
    assert "resumed from step_00000004" in outputs[0]
    assert_trained_like_one_process(tmp_path, one_process)


def test_deepspeed_launcher_two_nodes_tp_across_with_sequence_parallel(tmp_path, corpus_overrides, one_process):
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "nodes", both this machine
    port = free_port()
    args = [*ARGS, *corpus_overrides, "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2",
            f"train.run_dir={tmp_path / 'run'}"]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    outputs = run_two_nodes([[deepspeed, f"--hostfile={hosts}", "--no_ssh", f"--node_rank={k}",
                              "--master_addr=127.0.0.1", f"--master_port={port}", "launcher/train.py", *args]
                             for k in (0, 1)])
    assert "world=2 dp=1 zero=2 tp=2 pp=1" in outputs[0]
    assert_trained_like_one_process(tmp_path / "run", one_process)


def test_bad_layout_fails_with_one_line_before_any_process_group(tmp_path, corpus_overrides):
    proc = run_strata(["train", *TINY, *corpus_overrides, "parallel.tp=4", f"train.run_dir={tmp_path}"], nproc=4)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and "mamba.ngroups=1 is not divisible by tp=4; nearest valid layouts: tp=1 pp=1 dp=4" in lines[0]
    assert len(lines) == 1  # rank 0 says it once for every rank
