"""The run directory's copy of its tokenizer: written once, atomically, with its checksum; the
same tokenizer is left alone, another is refused in one line; readers find it or say the fix."""
import hashlib
import os

import pytest

from strata.data.errors import DataError
from strata.data.tokenizer import (RUN_TOKENIZER, RUN_TOKENIZER_SHA256, Tokenizer, install_run_tokenizer,
                                   run_tokenizer_path)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_copy_and_its_checksum_are_written_and_a_second_start_leaves_them(tokenizer_path, tmp_path):
    run_dir = tmp_path / "runs" / "a"  # not there yet: training creates it
    copy = install_run_tokenizer(Tokenizer(tokenizer_path), run_dir)
    assert copy == run_dir / RUN_TOKENIZER
    assert copy.read_bytes() == open(tokenizer_path, "rb").read()
    assert (run_dir / RUN_TOKENIZER_SHA256).read_text() == f"{sha256(copy)}  {RUN_TOKENIZER}\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_TOKENIZER, RUN_TOKENIZER_SHA256]  # no temporaries
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    os.utime(copy, ns=(1, 1))
    install_run_tokenizer(Tokenizer(tokenizer_path), run_dir)  # a resume: same checksum, nothing rewritten
    assert copy.stat().st_mtime_ns == 1
    assert (run_dir / RUN_TOKENIZER_SHA256).stat().st_mtime_ns == stamps[RUN_TOKENIZER_SHA256]
    assert Tokenizer(run_tokenizer_path(run_dir)).sha256 == sha256(copy)


def test_a_run_directory_of_another_tokenizer_is_refused_in_one_line(tokenizer_path, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_TOKENIZER).write_bytes(b"another tokenizer")
    with pytest.raises(DataError) as err:
        install_run_tokenizer(Tokenizer(tokenizer_path), run_dir)
    msg = str(err.value)
    assert "\n" not in msg and "belongs to another tokenizer" in msg and "train.run_dir" in msg
    assert (run_dir / RUN_TOKENIZER).read_bytes() == b"another tokenizer"  # untouched
    assert not (run_dir / RUN_TOKENIZER_SHA256).exists()
    # The copy deleted but its checksum recorded: still the run of another tokenizer.
    (run_dir / RUN_TOKENIZER).unlink()
    (run_dir / RUN_TOKENIZER_SHA256).write_text(f"{'0' * 64}  {RUN_TOKENIZER}\n")
    with pytest.raises(DataError, match="belongs to another tokenizer"):
        install_run_tokenizer(tokenizer_path, run_dir)


def test_a_missing_copy_restored_from_its_recorded_checksum(tokenizer_path, tmp_path):
    install_run_tokenizer(tokenizer_path, tmp_path)
    (tmp_path / RUN_TOKENIZER).unlink()
    install_run_tokenizer(Tokenizer(tokenizer_path), tmp_path)  # the same tokenizer: written again
    assert sha256(tmp_path / RUN_TOKENIZER) == Tokenizer(tokenizer_path).sha256


def test_readers_use_the_copy_and_say_the_fix_when_it_is_missing_or_damaged(tokenizer_path, tmp_path):
    with pytest.raises(DataError) as err:
        run_tokenizer_path(tmp_path)  # a run written before runs kept a copy
    assert str(err.value).startswith(str(tmp_path / RUN_TOKENIZER)) and "--tokenizer PATH" in str(err.value)
    assert str(run_tokenizer_path(tmp_path, tokenizer_path)) == tokenizer_path
    install_run_tokenizer(tokenizer_path, tmp_path)
    assert run_tokenizer_path(tmp_path) == tmp_path / RUN_TOKENIZER
    other = tmp_path / "other.model"
    other.write_bytes(b"not the run's")
    with pytest.raises(DataError, match="is not the tokenizer"):
        run_tokenizer_path(tmp_path, other)
    (tmp_path / RUN_TOKENIZER).write_bytes(b"damaged")
    with pytest.raises(DataError, match="does not match the sha256"):
        run_tokenizer_path(tmp_path)


def test_other_ranks_check_but_never_write(tokenizer_path, tmp_path):
    assert install_run_tokenizer(Tokenizer(tokenizer_path), tmp_path / "run", write=False) == tmp_path / "run" / RUN_TOKENIZER
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_TOKENIZER).write_bytes(b"another tokenizer")
    with pytest.raises(DataError, match="belongs to another tokenizer"):  # every rank refuses alike
        install_run_tokenizer(Tokenizer(tokenizer_path), tmp_path / "run", write=False)
