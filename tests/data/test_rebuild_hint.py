"""The command a damaged corpus's error suggests works: run as printed, it rebuilds the same corpus
(the embedded default and a user corpus, a trained or a given tokenizer), which then verifies."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import make_documents, prepared_config, write_text_files

from strata.data.config import DataConfig
from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.prepare import ensure_prepared, prepare_corpus
from strata.data.shards import TOKENIZER
from strata.launcher.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name in ("shards", root.name) and p.name != "plan.json"}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)


def hint(cfg: DataConfig, marker: str) -> str:
    with pytest.raises(DataError) as exc:
        open_corpus(DataConfig(**{**vars(cfg), "verify": "full"}))
    message = str(exc.value)
    assert marker in message and "\n" not in message
    return message.split(marker, 1)[1]


def run_in_process(command: str) -> None:
    argv = shlex.split(command)
    assert argv[:2] == ["strata", "prepare"] and "--force" not in argv, command
    assert prepare_main(argv[2:]) == 0


def run_in_shell(command: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (command, proc.stderr[-2000:])


def test_checksum_hint_rebuilds_the_same_default_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(inputs=["stdlib"], prepared_dir="std", stdlib_max_mb=0.3, vocab_size=400, val_fraction=0.05,
                     shard_input_mb=0.05, tokenizer_sample_mb=0.1, max_shard_tokens=20000, workers=1)
    ensure_prepared(cfg)  # as `strata train` does
    root = Path("std")
    reference = snapshot(root)
    shards = sorted((root / "shards").glob("*.tok"))
    assert len(shards) > 1
    flip_byte(shards[-1])
    command = hint(cfg, "rebuild it with ")
    run_in_process(command)
    assert command.startswith("strata prepare --input stdlib --out std --vocab-size 400 ")
    assert prepare_main(["--verify", "--out", "std"]) == 0
    assert snapshot(root) == reference  # the same corpus, not another one
    open_corpus(DataConfig(**{**vars(cfg), "verify": "full"}))


def test_hint_for_a_user_corpus_works_from_another_directory(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    docs = make_documents(60, seed=3)
    write_text_files(work / "src" / "docs", docs[:30])
    (work / "src" / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[30:]))
    monkeypatch.chdir(work)  # relative inputs, one a glob: recorded as given
    cfg = DataConfig(inputs=["src/*.jsonl", "src/docs"], prepared_dir=str(tmp_path / "prep"), vocab_size=380,
                     text_field="body", val_fraction=0.1, shard_input_mb=0.005, tokenizer_sample_mb=0.05,
                     max_shard_tokens=2048, workers=1)
    prepare_corpus(cfg)
    root = tmp_path / "prep"
    reference = snapshot(root)
    assert len(reference) > 6
    monkeypatch.chdir(elsewhere)
    flip_byte(sorted((root / "shards").glob("*.idx"))[1])
    command = hint(cfg, "rebuild it with ")
    run_in_shell(command, elsewhere)
    assert command.startswith(f"cd {work} && strata prepare --input 'src/*.jsonl' src/docs --out {root} ")
    run_in_shell(f"strata prepare --verify --out {root}", elsewhere)
    assert snapshot(root) == reference
    (root / TOKENIZER).unlink()  # the tokenizer's hint works too, without --force
    command = hint(cfg, "rebuild the corpus with ")
    run_in_shell(command, elsewhere)
    assert snapshot(root) == reference
    open_corpus(DataConfig(**{**vars(cfg), "verify": "full"}))


def test_hint_for_a_corpus_of_a_given_tokenizer(tmp_path, small_corpus):
    cfg, _ = small_corpus
    root = tmp_path / "copy"
    shutil.copytree(cfg.prepared_dir, root)
    copy = DataConfig(**{**vars(cfg), "prepared_dir": str(root)})
    reference = snapshot(root)
    flip_byte(root / "shards" / "u000001-p000.tok")
    command = hint(copy, "rebuild it with ")
    run_in_process(command)
    assert f"--tokenizer {cfg.tokenizer}" in command and "--vocab-size" not in command
    assert prepare_main(["--verify", "--out", str(root)]) == 0
    assert snapshot(root) == reference


def test_another_tokenizer_hint_reprepares_with_the_run_tokenizer(tmp_path, tokenizer_path):
    src = write_text_files(tmp_path / "src", make_documents(40, seed=5))
    cfg = prepared_config(tmp_path / "trained", [str(src)], vocab_size=380, tokenizer_sample_mb=0.05)
    run_cfg = DataConfig(**{**vars(cfg), "tokenizer": tokenizer_path})  # not the one it was trained with
    with pytest.raises(DataError) as exc:
        open_corpus(run_cfg)
    command = str(exc.value).split("re-prepare it with ", 1)[1].split(", or set data.tokenizer")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["strata", "prepare"] and argv[-1] == "--force"
    assert prepare_main(argv[2:]) == 0
    open_corpus(DataConfig(**{**vars(run_cfg), "verify": "full"}))
