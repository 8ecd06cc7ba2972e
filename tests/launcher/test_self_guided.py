"""Self-guided training through the real entry point: `a` in TensorBoard and in the
checkpoint, the dense paths gone from the optimizer and from every checkpoint after T,
and resumes before and after T that reproduce the unbroken run."""
import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from strata.model.guidance import alpha_at
from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS, T = 8, 4
GUIDED = ["model.mlp.structure=lowrank", "model.mlp.rank=8", "model.mlp.self_guided=true",
          "model.mlp.dense_first_layer=false", "model.mlp.guide_ratio=0.5", "train.eval_every=4",
          "checkpoint.every=2", "checkpoint.keep_last=10"]


def command(run_dir, corpus_overrides):
    return ["train", *TINY, *corpus_overrides, *GUIDED, f"train.max_steps={STEPS}", f"train.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("guided")
    proc = run_strata(command(run_dir, corpus_overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {T:6d} | self-guided training done: dense paths dropped" in proc.stdout
    assert ("structured MLP: lowrank rank=8, 16.7% of the dense MLP's parameters (d_model=64, d_ff=192); "
            "self-guided until 0.5 of the steps (cosine, stochastic)") in proc.stdout
    return run_dir


def checkpoint_files(run_dir, step):
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    model = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
    return ckpt, model


def test_alpha_is_a_tensorboard_scalar_following_the_cosine(unbroken):
    events = EventAccumulator(str(unbroken / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/self_guided_alpha")}
    assert logged == pytest.approx({s + 1: alpha_at(s, T, "cosine") for s in range(STEPS)})


def test_dense_paths_leave_optimizer_and_checkpoints_at_t(unbroken):
    for step in (2, 4, 6, 8):
        ckpt, model = checkpoint_files(unbroken, step)
        guides = [k for k in model["module"] if k.endswith(".guide")]
        assert bool(guides) == (step < T), step
        n_params = len(model["module"]) - sum(1 for k in model["module"] if "merged" in k)
        optimizer = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
        in_optimizer = sum(len(g["params"]) for g in optimizer["param_groups"])
        assert in_optimizer == n_params, step  # no slot (and no state) for a dense path after T
        manifest = json.loads((ckpt / "trainer.json").read_text())
        assert manifest["self_guided"]["guided_steps"] == T
        last_alpha = alpha_at(step - 1, T, "cosine") if step < T else 0.0  # the dense paths' a, once gone 0
        assert manifest["self_guided"]["alpha"] == pytest.approx(last_alpha)


def test_throughput_counts_the_dense_paths_only_while_computed(unbroken):
    """TFLOP/s (and MFU) count a step's dense-path FLOPs for the layers that ran them: all of
    them at a = 1, none after T."""
    from dataclasses import replace

    from strata.launcher.config import load_config
    from strata.model.counting import training_flops_per_token

    model_cfg = load_config(unbroken / "config.yaml").model
    seq_len = load_config(unbroken / "config.yaml").train.seq_len
    with_guides = training_flops_per_token(model_cfg, seq_len)["total"]
    no_guides = training_flops_per_token(replace(model_cfg, mlp=replace(model_cfg.mlp, self_guided=False)),
                                         seq_len)["total"]
    implied = {}
    for line in (unbroken / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "tflops_per_gpu" in record:
            implied[record["step"]] = record["tflops_per_gpu"] * 1e12 / record["tokens_per_s"]
    assert implied[1] == pytest.approx(with_guides, rel=1e-9)  # a = 1: every draw keeps the dense path
    for step in range(T + 1, STEPS + 1):
        assert implied[step] == pytest.approx(no_guides, rel=1e-9), step
    assert all(no_guides <= implied[s] * (1 + 1e-9) and implied[s] <= with_guides * (1 + 1e-9) for s in implied)


@pytest.mark.parametrize("resume_at", [2, 6])  # before and after T
def test_resume_reproduces_the_unbroken_run(tmp_path, corpus_overrides, unbroken, resume_at):
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    for later in range(resume_at + 2, STEPS + 1, 2):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{later:08d}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{resume_at:08d}\n")
    metrics = run_dir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resume_at]
    metrics.write_text("\n".join(kept) + "\n")
    proc = run_strata(command(run_dir, corpus_overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step_{resume_at:08d}" in proc.stdout
    want, got = train_losses(unbroken), train_losses(run_dir)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_two_data_parallel_ranks_with_zero2_match_one_process(tmp_path, corpus_overrides, unbroken):
    # The stochastic draws agree across ranks, and the engine rebuilt at T carries ZeRO-2's
    # partitioned optimizer state across both ranks.
    proc = run_strata(command(tmp_path, corpus_overrides) + ["parallel.zero_stage=2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2 dp=2 zero=2" in proc.stdout
    want, got = train_losses(unbroken), train_losses(tmp_path)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    # The same checkpoints resharded onto one process, before T (dense paths and their ZeRO-2
    # state still there) and after it (gone), continue the unbroken run.
    for resume_at in (2, 6):
        run_dir = tmp_path.parent / f"{tmp_path.name}_from_{resume_at}"
        shutil.copytree(tmp_path, run_dir)
        for later in range(resume_at + 2, STEPS + 1, 2):
            shutil.rmtree(run_dir / "checkpoints" / f"step_{later:08d}")
        (run_dir / "checkpoints" / "latest").write_text(f"step_{resume_at:08d}\n")
        proc = run_strata(command(run_dir, corpus_overrides))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed from step_{resume_at:08d} at step {resume_at} (resharded from world=2" in proc.stdout
        got = train_losses(run_dir)
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (resume_at, step)


def test_equal_flops_extends_the_run_to_the_dense_budget(tmp_path, corpus_overrides):
    from strata.launcher.config import load_config
    from strata.model.guidance import equal_flops_extra_steps

    overrides = [*TINY, *corpus_overrides, *GUIDED, "model.mlp.equal_flops=true", "train.max_steps=6",
                 "checkpoint.every=0", "train.eval_every=0", f"train.run_dir={tmp_path}"]
    cfg = load_config(None, overrides)
    cfg.model.vocab_size = 512  # the corpus's tokenizer
    extra = equal_flops_extra_steps(cfg.model, 6, cfg.train.seq_len)
    assert extra > 0
    proc = run_strata(["train", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(train_losses(tmp_path)) == list(range(1, 6 + extra + 1))
    resolved = (tmp_path / "config.yaml").read_text()
    assert f"max_steps: {6 + extra}" in resolved and "equal_flops: false" in resolved
