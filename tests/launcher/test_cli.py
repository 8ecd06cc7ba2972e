"""What a newcomer meets at the command line: `strata --help`, the config keys in `strata train
--help`, `strata config`, no third-party line before Strata's own, and sampling flags that sample."""
import os
import subprocess
import sys

import pytest
import torch

from strata.launcher import cli, generate as generate_cli, show_config
from strata.launcher.config import DEFAULT_CONFIG, Config, describe_keys, field_docs, load_config, sections, yaml_value
from tests.launcher.conftest import REPO, TINY, run_strata


def run_cli(args, module: str = "strata.launcher.cli", **env_changes) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process, with no leftover DeepSpeed or Strata logging settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "STRATA_LOG")}
    env.update(env_changes, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def flat(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------
# The keys: strata train --help, strata config --keys
# ----------------------------------------------------------------------------------------

def test_every_config_field_has_a_docstring_and_every_section_is_listed():
    groups = sections()
    assert [name for name, _, _ in groups] == ["model", "model.mamba", "model.attention", "model.mlp", "data",
                                               "train", "parallel", "checkpoint", "logging"]
    assert all(doc for _, doc, _ in groups)
    assert [k.name for _, _, keys in groups for k in keys if not k.doc] == []
    assert field_docs(Config)["train"] == "The optimisation and the run directory."


def test_train_help_names_every_key_with_its_type_default_and_docstring():
    proc = run_cli(["train", "--help"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: strata train") and "--config CONFIG" in out
    for key_line in ("model.pattern: str = M-*-M-", "model.mamba.d_state: int = 64", "model.attention.rope: bool = true",
                     "model.mlp.structure: str = dense", "data.inputs: list[str] = [stdlib]",
                     "train.max_steps: int = 300", "train.eps: float = 1.0e-08", "parallel.zero_stage: int = 0",
                     "checkpoint.keep_last: int = 3", "logging.progress: str = auto", "data.prepared_dir: str = ''"):
        assert f"\n  {key_line}\n" in out, key_line
    assert "SSM state size N per head." in out
    for section, doc, keys in sections():
        assert f"\n{section}: {flat(doc)}\n" in out
        for k in keys:
            assert f"\n  {k.name}: {k.type} = {yaml_value(k.default)}\n" in out
            assert flat(k.doc) in flat(out), k.name


def test_config_keys_narrows_to_sections_and_refuses_an_unknown_one(capsys):
    assert show_config.main(["--keys", "model.mlp", "train.lr"]) == 0
    out = capsys.readouterr().out
    assert "model.mlp.rank: int = 0" in out and "train.lr: float = 0.003" in out
    assert "\n  train.max_steps:" not in out and "\n  model.mamba." not in out
    assert out.rstrip("\n") == describe_keys(["model.mlp", "train.lr"])
    assert show_config.main(["--keys", "trian"]) == 2
    assert capsys.readouterr().err == "error: unknown section or key trian; did you mean train?\n"


# ----------------------------------------------------------------------------------------
# strata config: the resolved config
# ----------------------------------------------------------------------------------------

def test_strata_config_prints_a_config_that_loads_back_identically(tmp_path):
    overrides = ["train.max_steps=7", "model.mlp.activation=relu2", "data.verify=off", "data.inputs=[a.txt, 'no']",
                 "train.run_dir=runs/x", "train.preempt_signal=", "train.eps=1e-12"]
    proc = run_cli(["config", "--config", str(DEFAULT_CONFIG), *overrides])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.startswith("model:\n")
    path = tmp_path / "resolved.yaml"
    path.write_text(proc.stdout)
    want = load_config(DEFAULT_CONFIG, overrides)
    assert load_config(path) == want
    assert want.data.verify == "off" and want.train.max_steps == 7 and want.train.eps == 1e-12


def test_strata_config_refuses_a_bad_key_in_one_line_with_exit_2():
    proc = run_cli(["config", "train.max_step=5"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: unknown key train.max_step; did you mean train.max_steps?\n"


# ----------------------------------------------------------------------------------------
# Strata's own line first
# ----------------------------------------------------------------------------------------

def test_strata_help_speaks_to_users():
    proc = run_cli(["--help"])
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: strata COMMAND")
    for command in ("train", "config", "prepare", "generate", "export", "import", "checkpoint", "launch"):
        assert f"\n  {command} " in proc.stdout, command
    assert "main(argv)" not in proc.stdout and "STRATA_LOG=debug" in proc.stdout and "README.md" in proc.stdout


@pytest.mark.parametrize("command", ["train", "config", "prepare", "generate", "export", "import", "checkpoint",
                                     "launch"])
def test_help_starts_with_stratas_own_line(command):
    proc = run_cli([command, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "" and proc.stdout.startswith(f"usage: strata {command}"), proc.stdout[:300]


@pytest.mark.parametrize("args,module", [(["train", "train.max_step=5"], "strata.launcher.cli"),
                                         (["train.max_step=5"], "strata.launcher.train")])  # torchrun's entry
def test_a_config_error_is_the_only_line(args, module):
    proc = run_cli(args, module=module)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: unknown key train.max_step; did you mean train.max_steps?\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed warns only when it finds no GPU")
def test_strata_log_debug_leaves_third_party_logging_as_it_is():
    proc = run_cli(["train.max_step=5"], module="strata.launcher.train", STRATA_LOG="debug")
    assert proc.returncode == 2
    assert "Setting accelerator to CPU" in proc.stdout


def test_torchrun_entry_help_starts_with_stratas_own_line():
    proc = run_cli(["--help"], module="strata.launcher.train")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("usage: strata train")


# ----------------------------------------------------------------------------------------
# Sampling flags sample
# ----------------------------------------------------------------------------------------

BASE = ["--checkpoint", "runs/x", "--prompt", "x"]


@pytest.mark.parametrize("flags,temperature", [([], 0.0), (["--top-p", "0.9"], 1.0), (["--top-k", "5"], 1.0),
                                               (["--top-p", "0.9", "--temperature", "0.7"], 0.7)])
def test_top_k_and_top_p_imply_sampling_at_temperature_1(flags, temperature, capsys):
    args = generate_cli.parse_args(BASE + flags)
    assert args.temperature == temperature and args.seed == 0
    assert capsys.readouterr().err == ""


def test_flags_greedy_decoding_cannot_use_say_so_in_one_line(capsys):
    generate_cli.parse_args(BASE + ["--temperature", "0", "--top-p", "0.9"])
    assert capsys.readouterr().err == "note: --top-p ignored: --temperature 0 decodes greedily\n"
    args = generate_cli.parse_args(BASE + ["--seed", "3"])
    assert args.temperature == 0 and args.seed == 3
    assert capsys.readouterr().err.startswith("note: --seed ignored: decoding is greedy")


def test_generate_with_top_p_samples_a_different_text_per_seed(corpus_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = run_strata(["train", *TINY, *corpus_overrides, "train.max_steps=2", f"train.run_dir={run_dir}",
                       "train.eval_every=0", "checkpoint.every=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def text(*flags):
        code = cli.main(["generate", "--checkpoint", str(run_dir), "--prompt", "def f(", "--max-new-tokens", "16",
                         *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    one, two, one_again = (text("--top-p", "0.9", "--seed", s) for s in ("1", "2", "1"))
    assert one != two and one == one_again
    assert text() == text()  # greedy, whatever the seed
