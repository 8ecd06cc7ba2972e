"""The checkpoint format's own rules (parallel/checkpoint/files.py), without training: every file is
in the manifest with its size and CRC32, damage of any kind is found and named, the newest
checkpoint that verifies is the one resumed, unfinished saves are removed, and DeepSpeed's
files are always written in the format every reader memory-maps."""
import zlib

import pytest
import torch

from strata.launcher import checkpoints as checkpoint_cli
from strata.parallel.checkpoint.files import (MANIFEST, WEIGHTS_FILE, CheckpointError, StrataCheckpointEngine,
                                              checkpoint_to_resume, file_digest, read_manifest, remove_stale_partials,
                                              resolve_checkpoint, safe_load, verify, write_weights_only)


def make_run(tmp_path, steps=(2, 4, 6)):
    root = tmp_path / "run" / "checkpoints"
    for step in steps:
        write_weights_only(root, {"w": torch.full((256,), float(step))}, step=step)
    return root


def flip(path, at=100, count=8):
    data = bytearray(path.read_bytes())
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    path.write_bytes(bytes(data))


def test_the_manifest_holds_every_file_with_size_and_crc32(tmp_path):
    ckpt = make_run(tmp_path) / "step_00000006"
    manifest = read_manifest(ckpt)
    data = (ckpt / WEIGHTS_FILE).read_bytes()
    block = zlib.crc32(data).to_bytes(4, "little")  # one block: the file is smaller than HASH_BLOCK
    assert manifest["files"] == {WEIGHTS_FILE: {"bytes": len(data), "crc32": f"{zlib.crc32(block):08x}"}}
    assert file_digest(ckpt / WEIGHTS_FILE) == manifest["files"][WEIGHTS_FILE]
    assert verify(ckpt) == []


def test_a_file_of_several_blocks_is_hashed_block_by_block(tmp_path, monkeypatch):
    import strata.parallel.checkpoint.files as checkpoint

    monkeypatch.setattr(checkpoint, "HASH_BLOCK", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: blocks of 1000, 1000 and 560
    (tmp_path / "f").write_bytes(data)
    blocks = b"".join(zlib.crc32(data[i:i + 1000]).to_bytes(4, "little") for i in (0, 1000, 2000))
    assert file_digest(tmp_path / "f") == {"bytes": 2560, "crc32": f"{zlib.crc32(blocks):08x}"}
    flip(tmp_path / "f", at=2500, count=1)  # in the last block
    assert file_digest(tmp_path / "f")["crc32"] != f"{zlib.crc32(blocks):08x}"
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "empty") == {"bytes": 0, "crc32": f"{zlib.crc32(b''):08x}"}


@pytest.mark.parametrize("damage, problem", [
    (lambda p: flip(p), "fails its checksum"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "bytes, the manifest says"),
    (lambda p: p.unlink(), "is missing"),
])
def test_every_kind_of_damage_is_named(tmp_path, damage, problem):
    ckpt = make_run(tmp_path) / "step_00000006"
    damage(ckpt / WEIGHTS_FILE)
    problems = verify(ckpt)
    assert len(problems) == 1 and problems[0].startswith(WEIGHTS_FILE) and problem in problems[0]


def test_readers_refuse_a_damaged_checkpoint_naming_the_file_and_the_one_before(tmp_path):
    root = make_run(tmp_path)
    flip(root / "step_00000006" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(root.parent)
    message = str(e.value)
    assert "\n" not in message and f"{WEIGHTS_FILE} fails its checksum" in message
    assert f"pass --checkpoint {root / 'step_00000004'}" in message
    assert resolve_checkpoint(root / "step_00000004") == root / "step_00000004"


def test_resume_fails_or_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    root = make_run(tmp_path)
    flip(root / "step_00000006" / WEIGHTS_FILE)
    (root / "step_00000004" / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="the newest earlier checkpoint that verifies is step_00000002"):
        checkpoint_to_resume(root, "fail", is_main=True)
    assert (root / "step_00000006").is_dir(), "fail leaves everything as it was"
    ckpt, notes = checkpoint_to_resume(root, "previous", is_main=True)
    assert ckpt == root / "step_00000002"
    assert len(notes) == 2 and "step_00000006 is damaged" in notes[0] and "step_00000004 is damaged" in notes[1]
    # `latest` named a damaged one: gone, so the highest complete step is the newest again
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004.damaged",
                                                      "step_00000006.damaged"]


def test_nothing_verifies_is_one_line(tmp_path):
    root = make_run(tmp_path, steps=(2,))
    flip(root / "step_00000002" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        checkpoint_to_resume(root, "previous", is_main=True)


def test_unfinished_saves_are_removed_at_start_up(tmp_path):
    root = make_run(tmp_path, steps=(2,))
    (root / "step_00000004.tmp").mkdir()
    (root / "step_00000004.tmp" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (root / "latest.tmp").write_text("step_00000004\n")
    ckpt, notes = checkpoint_to_resume(root, "fail", is_main=True)
    assert ckpt == root / "step_00000002"
    assert "removed 2 unfinished save(s)" in notes[0]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert remove_stale_partials(root) == []


def test_a_manifest_that_is_not_json_is_one_line(tmp_path):
    ckpt = make_run(tmp_path, steps=(2,)) / "step_00000002"
    (ckpt / MANIFEST).write_bytes(b"\xff\x00{")
    with pytest.raises(CheckpointError, match=f"no readable {MANIFEST}"):
        read_manifest(ckpt)


def test_deepspeed_files_are_written_as_zipfiles_that_memory_map(tmp_path):
    """DeepSpeed's engine built without a config writes torch's legacy format, which mmap cannot
    read: every checkpoint written after a resume was unreadable by export and resharding."""
    engine = StrataCheckpointEngine()
    engine.save({"module": {"w": torch.arange(4.0)}}, str(tmp_path / "f.pt"))
    assert safe_load(tmp_path / "f.pt")["module"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]  # mmap=True
    assert engine.load(str(tmp_path / "f.pt"))["module"]["w"].sum() == 6.0


def test_strata_checkpoint_verify(tmp_path, capsys):
    root = make_run(tmp_path)
    assert checkpoint_cli.main(["verify", str(root.parent)]) == 0
    assert "3 of 3 checkpoints verify" in capsys.readouterr().out
    flip(root / "step_00000004" / WEIGHTS_FILE)
    (root / "step_00000008.tmp").mkdir()
    assert checkpoint_cli.main(["verify", str(root.parent)]) == 1
    out = capsys.readouterr().out
    assert f"step_00000004: DAMAGED: {WEIGHTS_FILE} fails its checksum" in out
    assert "step_00000008.tmp: unfinished save" in out and "2 of 3 checkpoints verify" in out
    assert checkpoint_cli.main(["verify", str(root / "step_00000006")]) == 0
    assert checkpoint_cli.main(["verify", str(tmp_path / "nowhere")]) == 1  # a missing path: docs/OPERATIONS.md


@pytest.mark.parametrize("overlap", [True, False])  # on the second thread, or in line
@pytest.mark.parametrize("sizes", [[0], [10], [999, 1], [1000], [300, 1700, 1], [2500, 500, 1000]])
def test_a_file_hashed_while_written_has_the_digest_of_reading_it_back(tmp_path, monkeypatch, sizes, overlap):
    import strata.parallel.checkpoint.files as checkpoint

    monkeypatch.setattr(checkpoint, "HASH_BLOCK", 1000)
    monkeypatch.setattr(checkpoint.HashingWriter, "OVERLAP_BYTES", 0 if overlap else 1 << 30)
    data = bytes(i % 251 for i in range(sum(sizes)))
    with checkpoint.HashingWriter(tmp_path / "f") as f:
        at = 0
        for n in sizes:  # writes that straddle, end at and fill whole blocks
            f.write(memoryview(data)[at:at + n])
            at += n
    assert (tmp_path / "f").read_bytes() == data
    assert f.digest() == file_digest(tmp_path / "f")


def test_the_engine_hashes_what_it_writes_and_memory_maps_it(tmp_path):
    engine = StrataCheckpointEngine()
    engine.save({"w": torch.arange(1000.0)}, str(tmp_path / "f.pt"))
    assert engine.digests == {"f.pt": file_digest(tmp_path / "f.pt")}
    assert safe_load(tmp_path / "f.pt")["w"].sum() == 499500.0


def test_a_manifest_changed_in_one_field_fails_its_own_checksum(tmp_path):
    """Still valid JSON, one digit other: the step, the data position, a file's name or size. Before the
    manifest carried its own checksum, each of these verified and resumed as if nothing had happened."""
    root = make_run(tmp_path)
    manifest = root / "step_00000006" / MANIFEST
    manifest.write_text(manifest.read_text().replace('"step": 6', '"step": 5'))
    assert read_manifest(root / "step_00000004")["step"] == 4
    with pytest.raises(CheckpointError, match=f"{MANIFEST} fails its checksum"):
        read_manifest(root / "step_00000006")
    (problem,) = verify(root / "step_00000006")
    assert problem.startswith(f"{MANIFEST} fails its checksum")
    with pytest.raises(CheckpointError, match=f"step_00000006 is damaged: {MANIFEST} fails its checksum.*"
                                              "the newest earlier checkpoint that verifies is step_00000004"):
        checkpoint_to_resume(root, "fail", is_main=True)
    assert checkpoint_to_resume(root, "previous", is_main=True)[0] == root / "step_00000004"


def test_a_manifest_without_its_checksum_is_refused_unless_it_predates_it(tmp_path):
    import json

    root = make_run(tmp_path, steps=(2, 4))
    for step, version in ((2, 2), (4, 3)):
        manifest = root / f"step_{step:08d}" / MANIFEST
        record = json.loads(manifest.read_text())
        del record["manifest_crc32"]
        manifest.write_text(json.dumps({**record, "format": version}))
    assert read_manifest(root / "step_00000002")["format"] == 2  # written before manifests had one
    with pytest.raises(CheckpointError, match="lost its checksum"):
        read_manifest(root / "step_00000004")


def test_a_damaged_latest_does_not_choose_the_checkpoint(tmp_path):
    root = make_run(tmp_path)
    (root / "latest").write_text("step_00000002\n")  # one flipped digit: an older, complete checkpoint
    assert checkpoint_to_resume(root, "fail", is_main=True)[0] == root / "step_00000006"
    assert resolve_checkpoint(root.parent) == root / "step_00000006"
