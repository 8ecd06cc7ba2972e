"""bf16 parameters with fp32 master weights (train.param_dtype=bf16, DeepSpeed's bf16 mode): a
checkpoint resumes bit for bit as written and resharded (the masters are restored, not rebuilt
from the bf16 module), exports its fp32 masters, and changes mode in either direction."""
import shutil

import pytest
import torch

from strata.launcher.config import ConfigError, load_config, load_run_config
from strata.parallel.checkpoint.consolidate import consolidate
from strata.parallel.checkpoint.files import MODEL_STATES, safe_load
from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS, EVERY = 12, 4
BF16 = ["parallel.zero_stage=1", "train.param_dtype=bf16"]
MODEL = [*TINY, "model.mamba.ngroups=2"]  # two groups: the Mamba2 mixer splits over TP=2


def args(run_dir, corpus_overrides, *layout):
    return ["train", *MODEL, *corpus_overrides, f"train.max_steps={STEPS}", f"train.run_dir={run_dir}",
            "train.eval_every=0", f"checkpoint.every={EVERY}", *layout]


def trained(run_dir, corpus_overrides, *layout, nproc=1):
    proc = run_strata(args(run_dir, corpus_overrides, *layout), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)


def resumed_after(step, source, run_dir, corpus_overrides, *layout, nproc=1) -> tuple[dict, str]:
    """The source run as a crash after its checkpoint of `step` leaves it, resumed on `layout`."""
    shutil.copytree(source, run_dir)
    for later in range(step + EVERY, STEPS + 1, EVERY):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{later:08d}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    proc = run_strata(args(run_dir, corpus_overrides, *layout), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir), proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, corpus_overrides):
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    return run_dir, trained(run_dir, corpus_overrides, *BF16)


@pytest.mark.parametrize("layout", [BF16, ["parallel.zero_stage=2", "train.param_dtype=bf16"],
                                    ["parallel.zero_stage=3", "train.param_dtype=bf16"]],
                         ids=["as-written", "resharded-to-zero2", "resharded-to-zero3"])
def test_a_resumed_run_equals_the_unbroken_one_bit_for_bit(tmp_path, corpus_overrides, unbroken, layout):
    """ZeRO 1 -> 2 and 1 -> 3 are reshards: the masters and AdamW moments are written into the new
    engine's partitions (ZeRO-3's per parameter). Without the masters (rebuilt from the bf16 module,
    rounded) the losses part at step 6 by about 1e-4. ZeRO-3 sums its gradients in another order
    than ZeRO-1 once it has traced the model: 3e-6 apart by step 12, from masters that are exact."""
    source, want = unbroken
    got, log = resumed_after(EVERY, source, tmp_path / "run", corpus_overrides, *layout)
    if "parallel.zero_stage=3" in layout:
        assert got == pytest.approx(want, rel=1e-5, abs=0)
        assert all(got[step] == want[step] for step in range(EVERY + 1, EVERY + 3))
        return
    assert got == want
    assert ("resharded from" in log) == (layout != BF16)


def test_export_reads_the_fp32_masters_of_the_bf16_module(unbroken):
    source, _ = unbroken
    ckpt = source / "checkpoints" / f"step_{EVERY:08d}"
    exported = consolidate(ckpt)
    module = safe_load(ckpt / MODEL_STATES.format(mp=0))["module"]
    assert all(t.dtype == torch.bfloat16 for t in module.values())
    assert sorted(exported) == sorted(module)
    for name, weight in exported.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight.bfloat16(), module[name]), f"{name}: the module is its master rounded"
    assert any(not torch.equal(w.bfloat16().float(), w) for w in exported.values()), "masters, not the module"


def test_the_parameter_dtype_changes_at_a_resume_in_either_direction(tmp_path, corpus_overrides, unbroken):
    """A bf16-parameter checkpoint continues with fp32 parameters, and that run's checkpoint with bf16
    parameters again (each a reshard: the files differ); the losses are the unbroken run's to the
    difference the modes make."""
    source, want = unbroken
    to_fp32, _ = resumed_after(EVERY, source, tmp_path / "fp32", corpus_overrides, "parallel.zero_stage=1",
                               "train.precision=bf16")
    back, log = resumed_after(2 * EVERY, tmp_path / "fp32", tmp_path / "back", corpus_overrides, *BF16)
    assert "resharded from world=1 tp=1 pp=1 zero=1)" in log
    for got in (to_fp32, back):
        assert sorted(got) == sorted(want)
        assert got[EVERY + 1] == pytest.approx(want[EVERY + 1], rel=1e-3)
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=2e-2), step
    assert to_fp32 != want  # the modes do compute differently


def test_a_zero3_run_resumes_as_written_and_exports_its_masters(tmp_path, corpus_overrides):
    """ZeRO-3 on two ranks gathers bf16 parameters; its checkpoint resumes bit for bit and exports
    the fp32 masters (its module files hold no weights)."""
    zero3 = ["parallel.zero_stage=3", "train.param_dtype=bf16"]
    want = trained(tmp_path / "unbroken", corpus_overrides, *zero3, nproc=2)
    got, log = resumed_after(EVERY, tmp_path / "unbroken", tmp_path / "run", corpus_overrides, *zero3, nproc=2)
    assert got == want and "resharded" not in log
    exported = consolidate(tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}")
    assert all(w.dtype == torch.float32 for w in exported.values())
    assert any(not torch.equal(w.bfloat16().float(), w) for w in exported.values()), "masters, not bf16 weights"


def test_a_pipeline_run_resumes_as_written_and_from_one_process(tmp_path, corpus_overrides, unbroken):
    """PP2 at ZeRO-1: each stage's partitions hold its masters (the tied embedding on both). Resumed as
    written bit for bit; one process's checkpoint continues there, and the pipeline's on one process,
    each to the other's numerics."""
    pipeline = ["parallel.pp=2", *BF16]
    want = trained(tmp_path / "unbroken", corpus_overrides, *pipeline, nproc=2)
    got, log = resumed_after(EVERY, tmp_path / "unbroken", tmp_path / "run", corpus_overrides, *pipeline, nproc=2)
    assert got == want and "resharded" not in log
    source, one_process = unbroken
    got, log = resumed_after(EVERY, source, tmp_path / "from-one", corpus_overrides, *pipeline, nproc=2)
    assert "resharded from world=1 tp=1 pp=1 zero=1 params=bf16" in log
    assert got == pytest.approx(one_process, rel=2e-3)
    got, log = resumed_after(EVERY, tmp_path / "unbroken", tmp_path / "to-one", corpus_overrides, *BF16)
    assert "resharded from world=2 tp=1 pp=2 zero=1 params=bf16" in log  # each stage's masters, read back
    assert got == pytest.approx(want, rel=2e-3)


def test_a_pipeline_skips_non_finite_steps_with_bf16_parameters(tmp_path, corpus_overrides):
    """ZeRO's overflow check skips them on every stage, and the run stops after
    train.max_skipped_steps with exit 3 (through torchrun: its failure)."""
    proc = run_strata(["train", *MODEL, *corpus_overrides, f"train.run_dir={tmp_path / 'run'}", "train.eval_every=0",
                       "train.max_steps=40", "checkpoint.every=0", "train.lr=1e30", "train.warmup_steps=0",
                       "train.max_skipped_steps=3", "parallel.pp=2", *BF16], nproc=2)
    assert proc.returncode != 0
    assert proc.stdout.count("non-finite loss or gradient: step skipped") == 3, proc.stdout[-3000:]
    assert "error: training diverged: 3 consecutive steps" in proc.stderr + proc.stdout


def test_tensor_parallel_ranks_take_their_slices_of_the_masters(tmp_path, corpus_overrides, unbroken):
    source, want = unbroken
    got, log = resumed_after(EVERY, source, tmp_path / "run", corpus_overrides, *BF16, "parallel.tp=2", nproc=2)
    assert "resharded from" in log
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-2), step
    written = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    exported = consolidate(written, load_run_config(written).model)
    reference = consolidate(source / "checkpoints" / f"step_{STEPS:08d}")
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=0, atol=2e-2, msg=name)


@pytest.mark.parametrize("overrides,problem", [
    (["train.param_dtype=bf16"], "parallel.zero_stage is 0"),
    (["train.param_dtype=bf16", "parallel.zero_stage=1", "train.precision=fp32"], "precision is fp32"),
    (["train.param_dtype=fp16"], "'fp16' is not one of"),
])
def test_a_layout_without_room_for_the_masters_is_one_line(overrides, problem):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert "\n" not in message and message.startswith("train.param_dtype") and problem in message


def test_recompute_trains_bf16_parameters_like_none(tmp_path, corpus_overrides, unbroken):
    """Selective recompute under DeepSpeed's bf16 ZeRO-1 optimizer, whose gradient hooks fire for
    the parameters inside a recomputed region in that region's own backward: the same losses, bit
    for bit (the recomputed activations are those of the forward)."""
    _, want = unbroken
    assert trained(tmp_path / "run", corpus_overrides, *BF16, "train.recompute=selective") == want
