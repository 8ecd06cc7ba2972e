"""Corpus preparation says how far it is: files, MB, tokens, tokens/s and the time left, as a bar on
a terminal and as log lines otherwise (data/progress.py), also when `strata train` prepares."""
import logging

import strata.data.progress as progress_module
from strata.data.progress import Progress, format_seconds


def test_a_file_counts_once_all_its_pieces_are_done(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="strata.data")
    progress = Progress(3 * 2**20, "prepare x", files={"a.py": 2, "b.py": 1})
    progress.update(2**20, 1000, ["a.py"])
    assert progress.files == 0, "a.py has a piece left"
    assert "0/2 files, 1.0/3.0 MB (33%), 1,000 tokens" in caplog.records[-1].getMessage()
    assert " left" in caplog.records[-1].getMessage()
    progress.update(2**20, 500, ["a.py", "b.py"])
    progress.close()
    assert progress.files == 2 and "2/2 files, 2.0/3.0 MB (67%), 1,500 tokens" in caplog.records[-1].getMessage()


def test_time_left_reads_as_a_person_would_say_it():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == ["0s", "59s", "1m01s", "59m59s",
                                                                             "1h00m", "2h02m"]
