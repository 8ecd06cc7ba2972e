"""Corpus preparation says how far it is: files, MB, tokens, tokens/s and the time left, as a bar on
a terminal and as log lines otherwise (data/progress.py), also when `strata train` prepares."""
import json
import logging

from data_helpers import make_documents, prepared_config

import strata.data.prepare as prepare_module
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


def test_a_split_file_counts_its_bytes_once(tmp_path, tokenizer_path, monkeypatch, caplog):
    """Issue 22: a JSONL file cut into 61 units ended at `1/1 files, 60.1/3663.3 MB (2%)`, its size
    counted once per unit. The same in small: the total is the input's size and ends at 100%."""
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="strata.data")
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(200, seed=3, max_len=80)))
    totals = []

    class Spy(Progress):
        def close(self):
            totals.append((self.total_bytes, self.bytes, self.files, self.total_files))
            super().close()

    monkeypatch.setattr(prepare_module, "Progress", Spy)
    unit = 4096
    prepared_config(tmp_path / "out", [str(path)], tokenizer_path, shard_input_mb=unit / 2**20, workers=2)
    size = path.stat().st_size
    assert size > 20 * unit and totals == [(size, size, 1, 1)]
    mb = f"{size / 2**20:.1f}"
    lines = [r.getMessage() for r in caplog.records if "files, " in r.getMessage()]
    assert f"1/1 files, {mb}/{mb} MB (100%)" in lines[-1]
