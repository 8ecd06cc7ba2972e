"""train.recompute through the config and the real entry point: one-line errors for bad
settings, the per-block plan, and a run with recompute (Mamba2 blocks full, the rest selective,
a self-guided LowRank MLP whose dense paths drop mid-run) that has the losses of the same run
without recompute and, resumed from its middle checkpoint, those of the unbroken run."""
import shutil

import pytest

from strata.launcher.config import ConfigError, TrainConfig, dump_yaml, load_config
from strata.model.config import ModelConfig
from tests.launcher.conftest import TINY, run_strata, train_losses

STEPS = 4
RECOMPUTE = ["train.recompute=selective", "train.recompute_kinds.M=full"]
GUIDED = ["model.mlp.structure=lowrank", "model.mlp.rank=8", "model.mlp.self_guided=true",
          "model.mlp.guide_ratio=0.5"]


@pytest.mark.parametrize("override,expected", [
    ("train.recompute=ful", "train.recompute: 'ful' is not one of 'none', 'selective', 'full'"),
    ("train.recompute_kinds.X=full", "train.recompute_kinds: 'X' is not a block kind; use 'M' (Mamba2 mixer), "
                                     "'*' (attention), '-' (MLP)"),
    ("train.recompute_kinds.M=most", "train.recompute_kinds.M: 'most' is not one of 'none', 'selective', 'full'"),
    ("train.recompute_kinds=M", "train.recompute_kinds: expected a mapping of block kind to mode"),
    ("train.recompute_every=0", "train.recompute_every: must be >= 1, got 0"),
    ("train.recompute_every=2", "train.recompute_every: 2 applies to full recompute only"),
])
def test_bad_settings_are_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_kinds_from_yaml_and_overrides_round_trip(tmp_path):
    cfg = load_config(None, ["train.recompute=full", "train.recompute_every=2", "train.recompute_kinds.*=selective",
                             "train.recompute_kinds={'-': none, M: full}"])
    assert cfg.train.recompute_kinds == {"-": "none", "M": "full"}  # the later override replaces the mapping
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path).train == cfg.train


def test_block_plan():
    pattern = ModelConfig(pattern="M-M-M*-M*").blocks()
    assert TrainConfig().block_recompute(pattern) == ["none"] * 9
    assert TrainConfig(recompute="selective").block_recompute(pattern) == ["selective"] * 9
    # every 2nd block of each kind, counted per kind: the 2nd and 4th M, the 2nd MLP, the 2nd attention
    assert TrainConfig(recompute="full", recompute_every=2).block_recompute(pattern) == \
        ["none", "none", "full", "full", "none", "none", "none", "full", "full"]
    assert TrainConfig(recompute="selective", recompute_kinds={"M": "full", "*": "none"}).block_recompute(pattern) == \
        ["full", "selective", "full", "selective", "full", "none", "selective", "full", "none"]


def test_recompute_run_resumes_exactly_and_equals_no_recompute(tmp_path, corpus_overrides):
    base = ["train", *TINY, *corpus_overrides, *GUIDED, f"train.max_steps={STEPS}", "train.eval_every=0",
            "checkpoint.every=2"]
    plain, recomputed = tmp_path / "plain", tmp_path / "recompute"
    proc = run_strata([*base, f"train.run_dir={plain}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_strata([*base, *RECOMPUTE, f"train.run_dir={recomputed}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "self-guided training done: dense paths dropped" in proc.stdout
    unbroken = train_losses(recomputed)
    assert sorted(unbroken) == list(range(1, STEPS + 1))
    assert unbroken == pytest.approx(train_losses(plain), rel=1e-7, abs=0)

    shutil.rmtree(recomputed / "checkpoints" / f"step_{STEPS:08d}")
    resumed = run_strata([*base, *RECOMPUTE, f"train.run_dir={recomputed}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000002" in resumed.stdout
    assert train_losses(recomputed) == pytest.approx(unbroken, rel=1e-7, abs=0)
