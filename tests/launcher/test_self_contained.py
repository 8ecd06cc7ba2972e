"""A run directory is self-contained: training copies its tokenizer (and checksum) there, and
`strata generate` / `strata export` use that copy from any directory, with the prepared corpus
deleted; a run directory of another tokenizer, and sampling flags that cannot work, are one line.
The run's model vocabulary is padded past its tokenizer's (640 > 512): padded ids are never sampled."""
import os
import shutil
import subprocess
import sys

import pytest

from strata.data.tokenizer import Tokenizer
from strata.launcher import generate as generate_cli
from tests.launcher.conftest import REPO, TINY, run_strata

RUN_TOKENIZER, RUN_TOKENIZER_SHA256 = "tokenizer.model", "tokenizer.sha256"  # in the run directory
TEXT = "def add(a, b):\n    return a + b\n"
PADDED_VOCAB = 640


def strata_from(cwd, args):
    """`strata ARGS` run in `cwd` (not the repository), so no relative path of training resolves."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "strata.launcher.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.strip().splitlines() if line.strip()]


def one_error_line(proc, code: int = 2) -> str:
    lines = error_lines(proc)
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_overrides):
    """A 2-step run trained on a copy of the session corpus, the copy deleted afterwards."""
    base = tmp_path_factory.mktemp("self_contained")
    prepared = next(o for o in corpus_overrides if o.startswith("data.prepared_dir=")).partition("=")[2]
    shutil.copytree(prepared, base / "corpus")
    overrides = [o for o in corpus_overrides if not o.startswith("data.prepared_dir=")]
    run_dir = base / "run"
    proc = run_strata(["train", *TINY, *overrides, f"data.prepared_dir={base / 'corpus'}", "train.max_steps=2",
                       f"train.run_dir={run_dir}", "train.eval_every=0", "checkpoint.every=2",
                       f"model.vocab_size={PADDED_VOCAB}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(base / "corpus")
    return run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("exported") / "hf"
    proc = strata_from(tmp_path_factory.mktemp("elsewhere"), ["export", "--checkpoint", str(run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_training_keeps_the_tokenizer_and_its_checksum_in_the_run_directory(run):
    copy = run / RUN_TOKENIZER
    tokenizer = Tokenizer(copy)
    assert tokenizer.vocab_size < PADDED_VOCAB
    assert (run / RUN_TOKENIZER_SHA256).read_text() == f"{tokenizer.sha256}  {RUN_TOKENIZER}\n"


def test_generate_runs_from_another_directory_after_the_corpus_is_deleted(run, tmp_path):
    proc = strata_from(tmp_path / "elsewhere", ["generate", "--checkpoint", str(run), "--prompt", TEXT,
                                                "--max-new-tokens", "8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(TEXT)


def test_export_runs_from_another_directory_after_the_corpus_is_deleted(run, exported):
    assert (exported / "tokenizer.model").read_bytes() == (run / RUN_TOKENIZER).read_bytes()
    assert (exported / "tokenizer.json").is_file()


def test_a_padded_vocabulary_never_produces_ids_past_the_tokenizer(run, tmp_path):
    # A near-uniform draw over 640 ids: without the mask a padded id (128 of them) comes within a few tokens.
    proc = strata_from(tmp_path, ["generate", "--checkpoint", str(run), "--prompt", TEXT, "--temperature", "1000",
                                  "--max-new-tokens", "64", "--seed", "1"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_an_imported_run_generates_and_exports_from_another_directory(exported, corpus_overrides, tmp_path):
    not_model = [o for o in TINY + corpus_overrides if not o.startswith(("model.", "data.prepared_dir"))]
    proc = strata_from(tmp_path / "a", ["import", "--format", "hf", "--from", str(exported), "--out", "imported",
                                        *not_model, f"data.prepared_dir={tmp_path / 'prepared'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "a" / "imported"  # its config.yaml names data.tokenizer relative to tmp_path/a
    assert (run_dir / RUN_TOKENIZER_SHA256).read_text().split()[0] == Tokenizer(run_dir / RUN_TOKENIZER).sha256
    proc = strata_from(tmp_path / "b", ["generate", "--checkpoint", str(run_dir), "--prompt", TEXT,
                                        "--max-new-tokens", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = strata_from(tmp_path / "b", ["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "back")])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_run_without_its_copy_says_to_pass_tokenizer_and_works_with_it(run, tmp_path):
    old = tmp_path / "old_run"  # a run written before runs kept their tokenizer
    shutil.copytree(run, old, ignore=shutil.ignore_patterns(RUN_TOKENIZER, RUN_TOKENIZER_SHA256))
    line = one_error_line(strata_from(tmp_path, ["generate", "--checkpoint", str(old), "--prompt", TEXT]), code=1)
    assert str(old / RUN_TOKENIZER) in line and "--tokenizer PATH" in line
    proc = strata_from(tmp_path, ["generate", "--checkpoint", str(old), "--prompt", TEXT, "--max-new-tokens", "4",
                                  "--tokenizer", str(run / RUN_TOKENIZER)])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_training_into_a_run_directory_of_another_tokenizer_is_one_line(corpus_overrides, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_TOKENIZER).write_bytes(b"the tokenizer of another run")
    proc = run_strata(["train", *TINY, *corpus_overrides, "train.max_steps=1", f"train.run_dir={run_dir}",
                       "train.eval_every=0", "checkpoint.every=0"])
    line = one_error_line(proc, code=1)
    assert "belongs to another tokenizer" in line and str(run_dir) in line
    assert (run_dir / RUN_TOKENIZER).read_bytes() == b"the tokenizer of another run"
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-1"),
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-5")])
def test_a_sampling_flag_that_cannot_work_is_one_line_and_exit_2(flag, value, run, capsys):
    code = generate_cli.main(["--checkpoint", str(run), "--prompt", TEXT, flag, value])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), captured.err
    assert captured.out == ""


def test_temperature_nan_from_the_command_line_is_one_line(run, tmp_path):
    line = one_error_line(strata_from(tmp_path, ["generate", "--checkpoint", str(run), "--prompt", TEXT,
                                                 "--temperature", "nan"]))
    assert line == "error: --temperature: must be a finite number >= 0 (0 is greedy), got nan"
