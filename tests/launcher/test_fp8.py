"""train.fp8 through the config and the real entry point: one-line errors for bad settings and for
FP8 where its products cannot run, the per-block plan, and a run in FP8 (a self-guided LowRank MLP
among its blocks) that says so in its first lines, counts the model FLOPs of the same run without
FP8, trains near it but not equal to it, and resumed from its middle checkpoint has the unbroken
run's losses bit for bit."""
import shutil

import pytest
import torch

from strata.launcher.config import ConfigError, TrainConfig, load_config
from strata.launcher.train import check_fp8
from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS = 4
FP8 = ["train.fp8=tensorwise", "train.fp8_keep_bf16=0"]  # every block: M-*-'s first is its Mamba2
GUIDED = ["model.mlp.structure=lowrank", "model.mlp.rank=16", "model.mlp.self_guided=true",
          "model.mlp.dense_first_layer=false"]


@pytest.mark.parametrize("override,expected", [
    ("train.fp8=e4m3", "train.fp8: 'e4m3' is not one of 'none', 'tensorwise', 'rowwise'"),
    ("train.fp8_keep_bf16=-1", "train.fp8_keep_bf16: must be >= 0, got -1"),
])
def test_bad_settings_are_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_where_fp8_cannot_run_the_run_stops_with_one_line(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("_scaled_mm_out_cpu not implemented for 'Float8_e4m3fn'\n(a stack trace)")

    cfg = load_config(None, ["train.fp8=rowwise"])
    check_fp8(cfg, torch.device("cpu"))  # this PyTorch runs FP8 products on CPU
    monkeypatch.setattr(torch, "_scaled_mm", refuse)  # one that does not, as a GPU before Ada would not
    with pytest.raises(ConfigError) as err:
        check_fp8(cfg, torch.device("cpu"))
    assert str(err.value) == ("train.fp8: rowwise cannot run on this cpu: torch._scaled_mm says: _scaled_mm_out_cpu "
                              "not implemented for 'Float8_e4m3fn'; use train.fp8=none")
    check_fp8(load_config(None, []), torch.device("cpu"))  # without FP8 nothing is tried


def test_block_plan():
    assert TrainConfig().block_fp8(4) == [None] * 4
    assert TrainConfig(fp8="rowwise").block_fp8(5) == [None, "rowwise", "rowwise", "rowwise", None]
    assert TrainConfig(fp8="tensorwise", fp8_keep_bf16=0).block_fp8(3) == ["tensorwise"] * 3
    assert TrainConfig(fp8="tensorwise", fp8_keep_bf16=2).block_fp8(4) == [None] * 4


def test_fp8_run_says_so_counts_model_flops_and_resumes_bit_for_bit(tmp_path, corpus_overrides):
    base = ["train", *TINY, *corpus_overrides, *GUIDED, f"train.max_steps={STEPS}", "train.eval_every=0",
            "checkpoint.every=2"]
    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    proc = run_strata([*base, f"train.run_dir={plain}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    flops_line = next(line for line in proc.stdout.splitlines() if line.startswith("training FLOPs/token"))
    proc = run_strata([*base, *FP8, f"train.run_dir={fp8}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert flops_line in lines, "FP8 changes no model FLOP"
    assert ("strata: FP8 tensorwise on blocks 0-3 of 4; bf16: the LM head; bf16 for sizes not multiples of 16: "
            "blocks.0.mixer.in_proj.weight (296, 64)") in lines
    unbroken = train_losses(fp8)
    without = train_losses(plain)
    assert unbroken != without and unbroken == pytest.approx(without, rel=2e-2), (unbroken, without)

    shutil.rmtree(fp8 / "checkpoints" / f"step_{STEPS:08d}")
    resumed = run_strata([*base, *FP8, f"train.run_dir={fp8}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000002" in resumed.stdout
    assert train_losses(fp8) == unbroken


def test_fp8_with_context_parallelism_is_refused_in_one_line():
    """A shard's activations would be scaled by its own maximum, not the sequence's: not one process's run."""
    from strata.launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^train.fp8: tensorwise with parallel.cp=2 is not supported yet: .*"
                                          r"use parallel.cp=1 or train.fp8=none$"):
        load_config(None, ["train.fp8=tensorwise", "parallel.cp=2"])
