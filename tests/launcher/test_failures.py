"""What a run does when things go wrong: each failure is one line naming the file or setting and
the fix, a non-zero exit, and the complete checkpoints left intact."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from strata.parallel.checkpoint.files import complete_checkpoints, verify
from tests.launcher.conftest import TINY, metrics_records, run_strata, train_losses

DIVERGED = 3


def args(run_dir, corpus_overrides, *more):
    return ["train", *TINY, *corpus_overrides, f"train.run_dir={run_dir}", "train.eval_every=0", *more]


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("every, says", [
    (0, "3 consecutive steps (to step 6) had a non-finite loss or gradient and were skipped"),
    (1, "the weights became non-finite at step 3 after a step whose loss was finite"),
])
def test_a_diverging_run_stops_with_its_last_good_checkpoint_intact(tmp_path, corpus_overrides, every, says):
    run_dir = tmp_path / "run"
    ok = run_strata(args(run_dir, corpus_overrides, "train.max_steps=2", "checkpoint.every=2"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    good = run_dir / "checkpoints" / "step_00000002"
    # a peak LR this large makes the weights infinite in one step (3): every later step is
    # non-finite and skipped, and the run stops; a save due at step 3 is refused instead
    proc = run_strata(args(run_dir, corpus_overrides, "train.max_steps=40", f"checkpoint.every={every}",
                           "train.lr=1e30", "train.warmup_steps=0", "train.max_skipped_steps=3"))
    assert proc.returncode == DIVERGED, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert says in line and str(good) in line and "train.lr" in line
    records = metrics_records(run_dir)  # strict JSON, the non-finite steps included
    if every == 0:
        assert proc.stdout.count("non-finite loss or gradient: step skipped") == 3
        skipped = [r for r in records if r["kind"] == "train" and r["step"] > 3]
        assert len(skipped) == 3 and all(r["loss"] in ("nan", "inf", "-inf") for r in skipped), skipped
    written = complete_checkpoints(run_dir / "checkpoints")
    assert good in written and all(verify(c) == [] for c in written)
    import torch

    from strata.parallel.checkpoint.files import safe_load
    for ckpt in written:
        module = safe_load(ckpt / "mp_rank_00_model_states.pt")["module"]
        assert all(torch.isfinite(t).all() for t in module.values()), f"{ckpt.name} holds non-finite weights"


def test_raising_max_steps_on_resume_uses_the_new_schedule_at_once(tmp_path, corpus_overrides):
    """A checkpoint stores the LR its schedule gave; the resumed run's first step must use the
    new schedule's, as a run started with the new max_steps has at that step."""
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    assert run_strata(args(resumed, corpus_overrides, "train.max_steps=4", "checkpoint.every=2")).returncode == 0
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    proc = run_strata(args(resumed, corpus_overrides, "train.max_steps=8", "checkpoint.every=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_strata(args(fresh, corpus_overrides, "train.max_steps=8", "checkpoint.every=2")).returncode == 0
    import json
    lrs = {}
    for name, run_dir in (("resumed", resumed), ("fresh", fresh)):
        lrs[name] = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                     if r["kind"] == "train"}
    for step in range(3, 9):
        assert lrs["resumed"][step] == pytest.approx(lrs["fresh"][step], rel=1e-12), f"step {step}"
    assert train_losses(resumed)[8] == pytest.approx(train_losses(fresh)[8], rel=1e-6)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system: room for the tiny model's first checkpoint (1.7 MiB), not its second."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk, corpus_overrides):
    run_dir = small_disk / "run"
    proc = run_strata(args(run_dir, corpus_overrides, "train.max_steps=6", "checkpoint.every=2",
                           "checkpoint.keep_last=3"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "cannot write checkpoint step_00000004" in line and "no space left on device" in line
    assert "free at least 2 MiB (what step_00000002 takes)" in line and "keep_last" not in line  # which frees nothing
    assert "the previous checkpoint step_00000002 is intact" in line
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("step_")] == ["step_00000002"]
    assert verify(ckpts / "step_00000002") == []
    # restarted on the still-full disk: the same kind of line, nothing lost
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    proc = run_strata(args(run_dir, corpus_overrides, "train.max_steps=6", "checkpoint.every=2",
                           "checkpoint.keep_last=3"))
    assert proc.returncode == 1
    assert "no space left on device" in error_line(proc.stderr)
    assert verify(ckpts / "step_00000002") == []


def flip_a_digit_of_the_data_cursor(manifest: Path) -> None:
    """One digit of the manifest's data position changed, the JSON still valid: before the manifest had a
    checksum of its own, this resumed "from step 4" on other data."""
    text = manifest.read_text()
    at = re.search(r'"cursor": (\d)', text)
    digit = at.start(1)
    manifest.write_text(text[:digit] + str((int(text[digit]) + 5) % 10) + text[digit + 1:])
    assert json.loads(manifest.read_text())["data"] != json.loads(text)["data"]


@pytest.mark.parametrize("damage", ["delete the model shard", "truncate a rank file", "delete a rank file",
                                    "flip a digit of the manifest"])
def test_a_damaged_or_missing_file_is_one_line_naming_it(tmp_path, corpus_overrides, damage):
    """Each of these was a traceback (DeepSpeed's bare AssertionError, OverflowError, OSError) or,
    for a deleted RNG file or a changed manifest, a silent resume without it or from elsewhere."""
    run_dir = tmp_path / "run"
    ok = run_strata(args(run_dir, corpus_overrides, "train.max_steps=4", "checkpoint.every=2"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    newest = run_dir / "checkpoints" / "step_00000004"
    target = newest / ("mp_rank_00_model_states.pt" if "model" in damage else
                       "trainer.json" if "manifest" in damage else "rank_00000.pt")
    if damage.startswith("flip"):
        flip_a_digit_of_the_data_cursor(target)
    elif damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.unlink()
    proc = run_strata(args(run_dir, corpus_overrides, "train.max_steps=6", "checkpoint.every=2"))
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert f"checkpoint {newest} is damaged: {target.name}" in line
    assert "the newest earlier checkpoint that verifies is step_00000002" in line


def test_a_resume_with_a_model_its_checkpoint_does_not_fit_is_one_line_naming_the_keys(tmp_path, corpus_overrides):
    """It was a 72-line state_dict error with 37 size mismatches."""
    run_dir = tmp_path / "run"
    ok = run_strata(args(run_dir, corpus_overrides, "train.max_steps=2", "checkpoint.every=2"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    proc = run_strata(args(run_dir, corpus_overrides, "train.max_steps=4", "checkpoint.every=2", "model.d_model=96",
                           "model.mamba.chunk_size=8"))
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "model.d_model: 64 -> 96" in line and "model.mamba.chunk_size: 16 -> 8" in line
    assert "step_00000002" in line and "new train.run_dir" in line
    # a change that keeps every parameter's shape resumes as asked
    same_shapes = run_strata(args(run_dir, corpus_overrides, "train.max_steps=4", "checkpoint.every=2",
                                  "model.mamba.chunk_size=8"))
    assert same_shapes.returncode == 0, same_shapes.stderr[-3000:]
    assert "resumed from step_00000002" in same_shapes.stdout + same_shapes.stderr


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, corpus_overrides):
    (tmp_path / "run").write_text("not a directory")
    proc = run_strata(args(tmp_path / "run", corpus_overrides, "train.max_steps=2"))
    assert proc.returncode == 2
    assert f"train.run_dir: {tmp_path / 'run'} is a file, not a directory" in error_line(proc.stderr)


def test_checkpoint_verify_exits_like_every_command(tmp_path, capsys):
    """`strata checkpoint verify`: 0 when every checkpoint verifies, 1 (a file problem, docs/OPERATIONS.md's
    one exit-code table) for a damaged one, a path that is not a directory, or no complete checkpoint."""
    import torch

    from strata.launcher.checkpoints import main as verify_main
    from strata.parallel.checkpoint.files import write_weights_only

    ckpt = write_weights_only(tmp_path / "run" / "checkpoints", {"w": torch.arange(64.0)})
    assert verify_main(["verify", str(tmp_path / "run")]) == 0
    assert "1 of 1 checkpoints verify" in capsys.readouterr().out
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert verify_main(["verify", str(tmp_path / "run")]) == 1
    assert "DAMAGED: model.safetensors fails its checksum" in capsys.readouterr().out
    assert verify_main(["verify", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert verify_main(["verify", str(tmp_path / "empty")]) == 1
