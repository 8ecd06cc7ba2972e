"""Bad input: each case is one clear DataError line naming the file and the fix, and no
partial output is left looking complete."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
from data_helpers import make_documents, prepared_config, write_text_files

from strata.data.config import DataConfig
from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.loader import TrainLoader
from strata.data.prepare import ensure_prepared, prepare_corpus
from strata.data.shards import MANIFEST
from strata.launcher.prepare import main as prepare_main


@pytest.fixture
def corpus_copy(tmp_path, small_corpus) -> DataConfig:
    cfg, _ = small_corpus
    shutil.copytree(cfg.prepared_dir, tmp_path / "copy")
    return DataConfig(**{**vars(cfg), "prepared_dir": str(tmp_path / "copy")})


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_shard_failing_its_checksum_is_caught_on_first_read_and_by_verify(corpus_copy, capsys):
    root = Path(corpus_copy.prepared_dir)
    shard = root / "shards" / "u000001-p000.tok"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(data)
    corpus = open_corpus(corpus_copy)  # sizes are fine, so start-up does not read shards
    with pytest.raises(DataError) as exc:
        for c, s in [(0, i) for i in range(corpus.train[0].num_samples(16))]:
            corpus.train[c].window(s, 16)
    message = one_line(exc)
    assert str(shard) in message and "checksum" in message and "strata prepare --input" in message
    assert prepare_main(["--verify", "--out", str(root)]) == 1  # a damaged file (docs/OPERATIONS.md, exit codes)
    err = capsys.readouterr().err
    assert err.startswith("error: shard ") and err.count("\n") == 1 and str(shard) in err
    with pytest.raises(DataError, match="checksum"):
        open_corpus(DataConfig(**{**vars(corpus_copy), "verify": "full"}))


def test_rerunning_prepare_rebuilds_a_damaged_shard(tmp_path, small_corpus):
    cfg, _ = small_corpus
    reference = {p.name: p.read_bytes() for p in (Path(cfg.prepared_dir) / "shards").iterdir()}
    copy = DataConfig(**{**vars(cfg), "prepared_dir": str(tmp_path / "copy")})
    shutil.copytree(cfg.prepared_dir, copy.prepared_dir)
    shard = tmp_path / "copy" / "shards" / "u000002-p000.tok"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    prepare_corpus(copy)
    assert {p.name: p.read_bytes() for p in shard.parent.iterdir()} == reference


def test_truncated_shard_is_caught_at_open_without_reading_tokens(corpus_copy):
    shard = Path(corpus_copy.prepared_dir) / "shards" / "u000000-p000.tok"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 3)
    with pytest.raises(DataError) as exc:
        open_corpus(corpus_copy)
    message = one_line(exc)
    assert str(shard) in message and "truncated" in message and "strata prepare" in message
    ensure_prepared(corpus_copy)  # same settings: ensure_prepared repairs it
    open_corpus(corpus_copy)


def test_manifest_from_another_tokenizer_is_refused(tmp_path, corpus_copy):
    other = prepared_config(tmp_path / "other", [str(write_text_files(tmp_path / "o", make_documents(30, seed=8)))],
                            vocab_size=380, tokenizer_sample_mb=0.05)
    run_cfg = DataConfig(**{**vars(corpus_copy), "tokenizer": str(Path(other.prepared_dir) / "tokenizer.model")})
    with pytest.raises(DataError) as exc:
        open_corpus(run_cfg)
    message = one_line(exc)
    assert str(Path(corpus_copy.prepared_dir) / MANIFEST) in message and "another tokenizer" in message
    assert "--tokenizer" in message
    mixture = DataConfig(mixture=[{"dir": corpus_copy.prepared_dir, "weight": 1}, {"dir": other.prepared_dir, "weight": 1}])
    with pytest.raises(DataError, match="another tokenizer"):
        open_corpus(mixture)


@pytest.mark.parametrize("case", ["empty_files", "blank_jsonl", "no_match"])
def test_empty_input_is_refused_and_leaves_nothing(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    if case == "empty_files":
        (src / "a.txt").write_text("")
        inputs = [str(src)]
    elif case == "blank_jsonl":
        (src / "a.jsonl").write_text("\n  \n")
        inputs = [str(src / "a.jsonl")]
    else:
        inputs = [str(tmp_path / "nothing*.txt")]
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        prepare_corpus(DataConfig(inputs=inputs, prepared_dir=str(out), vocab_size=400, workers=1))
    assert "--input" in one_line(exc) or "text" in one_line(exc)
    assert not out.exists()


def test_unreadable_file_is_named(tmp_path, tokenizer_path):
    src = write_text_files(tmp_path / "src", make_documents(5, seed=2))
    (src / "z_broken.txt.gz").write_bytes(gzip.compress(b"good start")[:-12] + b"garbage!")
    with pytest.raises(DataError) as exc:
        prepared_config(tmp_path / "out", [str(src)], tokenizer_path, shard_input_mb=1.0)
    message = one_line(exc)
    assert "z_broken.txt.gz" in message and "--input" in message
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_broken_symlink_and_bad_jsonl_are_named(tmp_path, tokenizer_path):
    src = write_text_files(tmp_path / "src", make_documents(3, seed=2))
    os.symlink(tmp_path / "gone.txt", src / "link.txt")
    with pytest.raises(DataError, match="link.txt"):
        prepared_config(tmp_path / "out1", [str(src)], tokenizer_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError) as exc:
        prepared_config(tmp_path / "out2", [str(tmp_path / "bad.jsonl")], tokenizer_path)
    assert "bad.jsonl:2" in one_line(exc) and "--text-field" in one_line(exc)


def test_cli_prints_one_error_line_and_returns_1_for_a_missing_input(tmp_path, capsys):
    assert prepare_main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: input ") and "missing.txt" in err
    assert prepare_main(["--out", str(tmp_path / "o")]) == 2  # a request that cannot run as asked
    assert capsys.readouterr().err.startswith("error: nothing to do: give --input")


def test_missing_corpus_and_too_short_corpus(tmp_path, small_corpus):
    with pytest.raises(DataError, match="strata prepare"):
        open_corpus(DataConfig(prepared_dir=str(tmp_path / "never")))
    cfg, _ = small_corpus
    with pytest.raises(DataError, match="seq_len"):
        TrainLoader(open_corpus(cfg), cfg, 10**7, 1, 0, 1, seed=0)


def test_config_validation_names_the_field():
    for bad, field in [({"val_fraction": 1.5}, "val_fraction"), ({"workers": -1}, "workers"),
                       ({"mixture": [{"dir": "x", "weight": 0}]}, "mixture[0].weight"),
                       ({"verify": "sometimes"}, "verify"), ({"vocab_size": 100}, "vocab_size")]:
        with pytest.raises(ValueError, match=rf"^{field.replace('[', '.').replace(']', '.')}: "):
            DataConfig(**bad).validate()
    DataConfig().validate()


def test_blank_documents_with_a_given_tokenizer_leave_nothing(tmp_path, tokenizer_path):
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no documents"):
        prepared_config(tmp_path / "out", [str(tmp_path / "blank.jsonl")], tokenizer_path)
    assert not (tmp_path / "out").exists()
