"""Config errors are one line naming the key and the fix, exit code 2, before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

from strata.launcher.config import ConfigError, dump_yaml, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override,expected", [
    ("train.max_step=5", "unknown key train.max_step; did you mean train.max_steps?"),
    ("modle.d_model=64", "unknown key modle; did you mean model?"),
    ("model.d_model=abc", "model.d_model: expected int, got str 'abc'"),
    ("model.attention.n_heads=7", "model.attention.n_heads: 7 does not divide d_model=256; try n_heads=8"),
    ("model.mamba.headdim=48", "model.mamba.headdim: 48 does not divide d_inner"),
    ("model.pattern=MX*", "model.pattern: 'MX*' has letters ['X']"),
    ("parallel.zero_stage=4", "parallel.zero_stage: 4 is not a ZeRO stage"),
    ("train.seq_len=4096", "train.seq_len: 4096 exceeds model.max_seq_len=1024"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_and_types():
    cfg = load_config(None, ["train.max_steps=7", "train.lr=1", "model.attention.rope=false",
                             "data.inputs=[a, b]", "train.eps=1e-12"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.eps == 1e-12
    assert cfg.model.attention.rope is False and cfg.data.inputs == ["a", "b"]


def test_cli_reports_one_line_and_exit_2_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "strata.launcher.cli", "train", "train.max_step=5",
                           f"train.run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown key train.max_step; did you mean train.max_steps?"
    assert not run_dir.exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_layout_that_does_not_divide_the_batch_fails_before_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "strata.launcher.cli", "train", "train.global_batch_size=12",
                           "parallel.micro_batch_size=8", f"train.run_dir={tmp_path / 'r'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.global_batch_size: 12 is not a multiple" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_yaml_boolean_words_are_strings_for_string_fields(tmp_path):
    """YAML 1.1 reads off/on/yes/no as booleans; a str field gets the word, a bool field the bool."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  verify: off\n  inputs: [yes, 'no', On]\n"
                    "model:\n  attention: {rope: off, qkv_bias: Yes}\ncheckpoint:\n  resume: no\n")
    cfg = load_config(path)
    assert cfg.data.verify == "off" and type(cfg.data.verify) is str
    assert cfg.data.inputs == ["yes", "no", "On"]
    assert cfg.model.attention.rope is False and cfg.model.attention.qkv_bias is True
    assert cfg.checkpoint.resume is False
    over = load_config(None, ["data.verify=off", "model.attention.rope=on",
                              "logging.tensorboard=no", "data.mixture=[{dir: d, weight: 1}]"])
    assert over.data.verify == "off" and over.logging.tensorboard is False and over.model.attention.rope is True
    assert over.data.mixture == [{"dir": "d", "weight": 1}]
    with pytest.raises(ConfigError, match="logging.progress: 'on' is not one of"):  # the word, not False
        load_config(None, ["logging.progress=on"])
    with pytest.raises(ConfigError, match="model.d_model: expected int, got bool True"):
        load_config(None, ["model.d_model=yes"])
    assert load_config(path).data.verify == load_config(None, ["data.verify=off"]).data.verify
    dumped = tmp_path / "dumped.yaml"  # the resolved config a run saves reads back the same
    dumped.write_text(dump_yaml(cfg))
    assert load_config(dumped) == cfg
