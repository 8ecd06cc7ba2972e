"""metrics.jsonl after a resume: each step once (the records past the checkpoint are cut), a torn
last line dropped, and the cut atomic (a kill during it loses nothing)."""
import json
import os

import pytest

from strata.launcher.config import LoggingConfig
from strata.launcher.metrics import Reporter

LINES = LoggingConfig(tensorboard=False, progress="lines", log_every=1000)


def train_record(step: int) -> dict:
    return {"loss": 5.0 - step / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0}


def run(run_dir, start: int, stop: int, torn: bool = False, eval_every: int = 3) -> None:
    """What launcher/train.py does: a Reporter started at ``start``, steps start+1..stop."""
    reporter = Reporter(run_dir, LINES, True, stop, start)
    for step in range(start + 1, stop + 1):
        reporter.step_done(step, train_record(step))
        if step % eval_every == 0:
            reporter.scalars(step, {"loss": 4.0, "perplexity": 54.6}, kind="eval")
    if torn:  # killed in the middle of writing a record
        reporter.jsonl.write('{"kind": "train", "step": %d, "lo' % (stop + 1))
        reporter.jsonl.flush()
        reporter.jsonl.close()
        return
    reporter.close()


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir, kind: str) -> list[int]:
    return [r["step"] for r in records(run_dir) if r["kind"] == kind]


def test_resume_cuts_the_records_past_the_checkpoint(tmp_path):
    run(tmp_path, 0, 8, torn=True)  # checkpoint at 4 (say), killed while writing step 9
    run(tmp_path, 4, 10)            # resumed from the checkpoint of step 4
    assert steps(tmp_path, "train") == list(range(1, 11))
    assert steps(tmp_path, "eval") == [3, 6, 9]
    assert all(r["loss"] == pytest.approx(5.0 - r["step"] / 10) for r in records(tmp_path) if r["kind"] == "train")
    run(tmp_path, 10, 10)  # resumed at the end: nothing to cut, nothing lost
    assert steps(tmp_path, "train") == list(range(1, 11))


def test_torn_last_line_is_dropped_and_a_missing_newline_added(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2)]
    path.write_text(good[0] + "\n" + good[1])  # the last record complete but without its newline
    Reporter(tmp_path, LINES, True, 5, 2).close()
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"
    path.write_text(good[0] + "\n" + good[1] + "\n" + '{"kind": "tra')
    run(tmp_path, 2, 3)
    assert steps(tmp_path, "train") == [1, 2, 3]


def test_a_fresh_start_in_an_old_run_dir_starts_the_file_over(tmp_path):
    run(tmp_path, 0, 5)
    run(tmp_path, 0, 2)  # checkpoint.resume=false, or every checkpoint deleted
    assert steps(tmp_path, "train") == [1, 2]


def test_nothing_to_cut_leaves_the_file_alone(tmp_path):
    run(tmp_path, 0, 4)
    before = os.stat(tmp_path / "metrics.jsonl")
    Reporter(tmp_path, LINES, True, 8, 4).close()
    after = os.stat(tmp_path / "metrics.jsonl")
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_only_the_reporting_rank_touches_the_file(tmp_path):
    run(tmp_path, 0, 6)
    Reporter(tmp_path, LINES, False, 8, 2).close()  # rank != 0
    assert steps(tmp_path, "train") == list(range(1, 7))


@pytest.mark.parametrize("killed_at", ["fsync", "replace"])
def test_a_kill_during_the_cut_loses_nothing(tmp_path, monkeypatch, killed_at):
    run(tmp_path, 0, 8)
    original = (tmp_path / "metrics.jsonl").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, killed_at, killed)  # inside parallel.checkpoint.atomic_write
    with pytest.raises(KeyboardInterrupt):
        Reporter(tmp_path, LINES, True, 10, 4)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == original  # the old file whole, never half cut
    run(tmp_path, 4, 10)  # the restart after the kill cuts and goes on
    assert steps(tmp_path, "train") == list(range(1, 11))
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
