"""Parquet and Arrow inputs (data/tables.py): the same tokens as the same documents in JSONL, split
by row group and record batch, resumable after a kill, read a row group at a time, damaged files
refused in one line by name, and `datasets`' save_to_disk directories read without `datasets`."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import make_documents, prepared_config

import strata.data.prepare as prepare_module
from strata.data.config import DataConfig
from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.prepare import prepare_corpus
from strata.data.shards import MANIFEST
from strata.data.sources import iter_documents, plan_pieces, resolve_inputs
from strata.launcher.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[2]
ROW_GROUPS = (9, 14, 20)  # rows per row group of the three Parquet files


def write_parquet_dir(directory: Path, docs: list, column: str = "text", **extra_columns) -> Path:
    """``docs`` over three files of several row groups each, with an ``id`` column beside the text."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [0, len(docs) // 3, 2 * len(docs) // 3, len(docs)]
    for i, rows in enumerate(ROW_GROUPS):
        part = slice(bounds[i], bounds[i + 1])
        columns = {"id": list(range(bounds[i], bounds[i + 1])), column: docs[part]}
        columns.update({name: values[part] for name, values in extra_columns.items()})
        pq.write_table(pa.table(columns), directory / f"part-{i:03d}.parquet", row_group_size=rows)
    return directory


def write_jsonl(path: Path, docs: list) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d is not None))
    return path


def write_save_to_disk(directory: Path, docs: list, shards: int = 2, batch_rows: int = 7) -> Path:
    """The layout `datasets`' Dataset.save_to_disk writes (2.x and 3.x): Arrow IPC *stream* files
    data-0000i-of-0000N.arrow in record batches, state.json listing them, dataset_info.json."""
    directory.mkdir(parents=True, exist_ok=True)
    features = {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per_shard = -(-len(docs) // shards)
    for i, name in enumerate(names):
        rows = list(range(i * per_shard, min(len(docs), (i + 1) * per_shard)))
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start in range(0, len(rows), batch_rows):
                ids = rows[start:start + batch_rows]
                texts = pa.array([docs[k] for k in ids], pa.string())
                writer.write_batch(pa.record_batch([pa.array(ids, pa.int64()), texts], schema=schema))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": "train"}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None, "dataset_size": None,
            "description": "", "download_checksums": None, "download_size": None, "features": features,
            "homepage": "", "license": "", "post_processed": None, "post_processing_size": None,
            "size_in_bytes": None, "splits": None, "supervised_keys": None, "task_templates": None, "version": None}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return directory


def documents(cfg: DataConfig) -> list[list[int]]:
    """Every document's tokens, in the order the shards hold them."""
    return [shard.tokens[a:b].tolist() for shard, a, b in open_corpus(cfg).documents()]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(documents with a null and an empty value, Parquet dir, JSONL of the same non-null documents)."""
    base = tmp_path_factory.mktemp("tables")
    docs = make_documents(90, seed=41, min_len=5, max_len=120)
    docs[10], docs[50] = None, ""
    return docs, write_parquet_dir(base / "parquet", docs), write_jsonl(base / "same.jsonl", docs)


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_gives_the_tokens_of_the_same_documents_as_jsonl(tmp_path, corpus, tokenizer_path, workers):
    docs, parquet, jsonl = corpus
    units = plan_pieces(resolve_inputs([str(parquet)], 0), 4096)
    assert len(units) > 3 and any(p.start > 0 for u in units for p in u)  # files split by row group
    settings = dict(val_fraction=0.0, shard_input_mb=0.004, workers=workers)
    from_parquet = prepared_config(tmp_path / "p", [str(parquet)], tokenizer_path, **settings)
    from_jsonl = prepared_config(tmp_path / "j", [str(jsonl)], tokenizer_path, **settings)
    expected = [d for d in docs if d]  # the null and the empty value are skipped
    assert documents(from_parquet) == documents(from_jsonl) and len(documents(from_parquet)) == len(expected)
    corpus_p = open_corpus(from_parquet)
    assert [corpus_p.decode_document(*d) for d in corpus_p.documents()] == expected
    manifest = corpus_p.manifests[0]
    assert manifest["totals"]["input_bytes"] == sum(f.stat().st_size for f in parquet.iterdir())
    assert len(manifest["shards"]) == len(units)
    # with a validation split, each side holds the same documents whichever the format
    split = dict(val_fraction=0.3, workers=workers)
    held = [prepared_config(tmp_path / f"{name}10", [str(path)], tokenizer_path, **split)
            for name, path in (("p", parquet), ("j", jsonl))]
    streams = [open_corpus(cfg) for cfg in held]
    for side in ("train", "val"):
        runs = [sorted(map(tuple, _split_docs(c, side))) for c in streams]
        assert runs[0] == runs[1] and runs[0]


def _split_docs(corpus, side: str) -> list[list[int]]:
    out = []
    for shard in corpus.shards[0]:
        offsets = shard.offsets.tolist()
        train_docs = shard.info["train_docs"]
        pairs = list(zip(offsets[:-1], offsets[1:]))
        out += [shard.tokens[a:b].tolist() for a, b in (pairs[:train_docs] if side == "train" else pairs[train_docs:])]
    return out


def test_a_unit_is_a_range_of_row_groups_and_counts_each_byte_once(corpus):
    _, parquet, _ = corpus
    files = resolve_inputs([str(parquet)], 0)
    units = plan_pieces(files, 3000)
    for f in files:
        pieces = [p for u in units for p in u if p.file == f]
        groups = pq.ParquetFile(f.path).metadata.num_row_groups
        assert pieces[0].start == 0 and pieces[-1].end == groups
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # ranges tile the row groups in order
        assert sum(p.nbytes for p in pieces) == f.size
    assert any(len(u) == 1 and 0 < u[0].end - u[0].start < 4 for u in units)  # a unit of a few row groups
    assert plan_pieces(files, 3000) == units  # deterministic


def test_progress_and_manifest_count_each_input_byte_once_for_every_kind(tmp_path, corpus, tokenizer_path, monkeypatch):
    docs, parquet, jsonl = corpus
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("a small text file\n")
    (mixed / "b.jsonl.gz").write_bytes(gzip.compress(jsonl.read_bytes()))
    write_save_to_disk(mixed / "saved", [d for d in docs if d])
    inputs = [str(mixed), str(jsonl), str(parquet)]
    files = resolve_inputs(inputs, 0)
    assert {f.kind for f in files} == {"text", "jsonl", "parquet", "arrow"}
    units = plan_pieces(files, 2500)
    for f in files:
        assert sum(p.nbytes for u in units for p in u if p.file == f) == f.size, f.path
    totals = []

    class Spy(prepare_module.Progress):
        def close(self):
            totals.append((self.total_bytes, self.bytes))
            super().close()

    monkeypatch.setattr(prepare_module, "Progress", Spy)
    cfg = prepared_config(tmp_path / "out", inputs, tokenizer_path, shard_input_mb=2500 / 2**20)
    size = sum(f.size for f in files)
    manifest = open_corpus(cfg).manifests[0]
    assert totals == [(size, size)] and manifest["totals"]["input_bytes"] == size
    assert len(manifest["shards"]) >= len(units) > len(files)


def test_kill_mid_prepare_then_resume_gives_identical_output(tmp_path, corpus, tokenizer_path):
    _, parquet, _ = corpus
    settings = dict(inputs=[str(parquet)], tokenizer=tokenizer_path, workers=1, shard_input_mb=0.004, val_fraction=0.1)
    prepare_corpus(DataConfig(prepared_dir=str(tmp_path / "ref"), **settings))
    out = tmp_path / "killed"
    # a prepare that takes a while per unit, killed with SIGKILL once two units are recorded
    script = textwrap.dedent(f"""
        import time
        import strata.data.prepare as p
        from strata.data.config import DataConfig
        encode = p.encode_unit
        def slow(*args, **kwargs):
            record = encode(*args, **kwargs)
            time.sleep(0.5)
            return record
        p.encode_unit = slow
        p.prepare_corpus(DataConfig(prepared_dir={str(out)!r}, **{settings!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 120
    while len(list((out / "units").glob("*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")}
    prepare_corpus(DataConfig(prepared_dir=str(out), **settings))
    assert all((out / "units" / name).stat().st_mtime_ns == t for name, t in done.items())  # not redone
    assert tree(tmp_path / "ref") == tree(out)


def test_reading_goes_one_row_group_at_a_time(tmp_path, corpus, monkeypatch):
    docs, parquet, _ = corpus
    calls = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("row_groups"), kwargs.get("columns")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("a whole file was read"))
    files = resolve_inputs([str(parquet)], 0)
    texts = [t for u in plan_pieces(files, 10**9) for p in u for t, _ in iter_documents(p, "text")]
    assert texts == [d for d in docs if d]
    groups = sum(pq.ParquetFile(f.path).metadata.num_row_groups for f in files)
    assert calls == [([g], ["text"]) for f in files for g in range(pq.ParquetFile(f.path).metadata.num_row_groups)]
    assert len(calls) == groups


def test_memory_stays_bounded_by_a_row_group_not_the_file(tmp_path):
    """24 MB of text in 24 row groups: pyarrow's peak allocation while every document is read is
    a few row groups' worth, a small fraction of the file (measured 5.4 MB, the same for a file
    twice the size; in a fresh process, so the peak is this read's alone)."""
    path = tmp_path / "big.parquet"
    docs = [os.urandom(3000).hex() for _ in range(4096)]  # incompressible: the file is as big as its text
    pq.write_table(pa.table({"text": docs}), path, row_group_size=len(docs) // 24)
    text_bytes = sum(map(len, docs))
    script = textwrap.dedent(f"""
        import pyarrow as pa
        from strata.data.sources import iter_documents, plan_pieces, resolve_inputs
        count = sum(1 for u in plan_pieces(resolve_inputs([{str(path)!r}], 0), 1 << 40)
                    for p in u for _ in iter_documents(p, "text"))
        print(count, pa.default_memory_pool().max_memory())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, peak = map(int, out.stdout.split())
    assert count == len(docs) and path.stat().st_size > 0.9 * text_bytes
    assert peak < text_bytes / 3, f"peak {peak / 2**20:.1f} MB of {text_bytes / 2**20:.1f} MB"


def test_save_to_disk_directory_is_read_without_datasets_and_jsonl_without_pyarrow(tmp_path, corpus, tokenizer_path):
    docs, _, jsonl = corpus
    saved = write_save_to_disk(tmp_path / "saved", [d for d in docs if d])
    (saved / "cache-unlisted.arrow").write_bytes(b"not listed in state.json: never read")
    files = resolve_inputs([str(saved)], 0)
    assert [Path(f.path).name for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    units = plan_pieces(files, 2000)
    assert len(units) > 2 and all(p.file.kind == "arrow" for u in units for p in u)  # split by record batch
    settings = dict(tokenizer=tokenizer_path, val_fraction=0.0, workers=2, shard_input_mb=2000 / 2**20)
    script = textwrap.dedent(f"""
        import sys
        from strata.data.config import DataConfig
        from strata.data.prepare import prepare_corpus
        prepare_corpus(DataConfig(inputs=[{str(jsonl)!r}], prepared_dir={str(tmp_path / "j")!r}, **{settings!r}))
        assert "pyarrow" not in sys.modules, "JSONL imported pyarrow"
        prepare_corpus(DataConfig(inputs=[{str(saved)!r}], prepared_dir={str(tmp_path / "a")!r}, **{settings!r}))
        assert "pyarrow" in sys.modules and "datasets" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = {name: DataConfig(prepared_dir=str(tmp_path / name), tokenizer=tokenizer_path) for name in ("j", "a")}
    assert documents(read["a"]) == documents(read["j"]) and len(documents(read["a"])) == len([d for d in docs if d])


def test_arrow_ipc_file_format_is_read_too(tmp_path, corpus, tokenizer_path):
    docs, _, jsonl = corpus
    kept = [d for d in docs if d]
    path = tmp_path / "docs.arrow"
    with pa.ipc.new_file(str(path), pa.schema([("text", pa.large_string())])) as writer:
        for start in range(0, len(kept), 11):
            writer.write_batch(pa.record_batch([pa.array(kept[start:start + 11], pa.large_string())], names=["text"]))
    settings = dict(val_fraction=0.0, shard_input_mb=0.004)
    assert documents(prepared_config(tmp_path / "a", [str(path)], tokenizer_path, **settings)) == \
        documents(prepared_config(tmp_path / "j", [str(jsonl)], tokenizer_path, **settings))


def test_text_field_names_another_column(tmp_path, corpus, tokenizer_path):
    docs = corpus[0]
    other = make_documents(len(docs), seed=5, min_len=5, max_len=40)
    directory = write_parquet_dir(tmp_path / "content", other, column="content", text=docs)
    cfg = prepared_config(tmp_path / "out", [str(directory)], tokenizer_path, text_field="content", val_fraction=0.0)
    corpus_c = open_corpus(cfg)
    assert [corpus_c.decode_document(*d) for d in corpus_c.documents()] == other
    assert corpus_c.manifests[0]["text_field"] == "content"


def test_string_kinds_nulls_and_invalid_utf8(tmp_path, tokenizer_path):
    """large_string, string_view and dictionary columns read as strings; nulls skipped; invalid
    UTF-8 (pyarrow does not validate it) becomes U+FFFD and is counted, as in text files."""
    offsets = pa.array([0, 4, 8], pa.int32()).buffers()[1]
    invalid = pa.StringArray.from_buffers(2, offsets, pa.py_buffer(b"good" + b"ba\xffd"))
    columns = [invalid, pa.array(["large", None], pa.large_string()), pa.array(["view", ""], pa.string_view()),
               pa.array(["dict", "dict", None]).dictionary_encode()]
    # string_view as Arrow: pyarrow 16 reads it but writes it to Parquet only from a later release
    paths = [tmp_path / f"{i}.{'arrow' if i == 2 else 'parquet'}" for i in range(4)]
    for path, column in zip(paths, columns):
        if path.suffix == ".arrow":
            with pa.ipc.new_stream(str(path), pa.schema([("text", column.type)])) as writer:
                writer.write_batch(pa.record_batch([column], names=["text"]))
        else:
            pq.write_table(pa.table({"text": column}), path)
    cfg = prepared_config(tmp_path / "out", list(map(str, paths)), tokenizer_path, val_fraction=0.0)
    corpus_s = open_corpus(cfg)
    assert [corpus_s.decode_document(*d) for d in corpus_s.documents()] == ["good", "ba\ufffdd", "large", "view",
                                                                            "dict", "dict"]
    assert corpus_s.manifests[0]["totals"]["invalid_utf8_docs"] == 1


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = b"JUNK"
    path.write_bytes(bytes(data))


def _damaged_pages(path: Path) -> None:
    """The footer intact, the first row group's text pages overwritten: found when that group is read."""
    meta = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = meta.dictionary_page_offset or meta.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + meta.total_compressed_size] = b"\xff" * meta.total_compressed_size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, expected", [
    ("truncated", "cannot read Parquet file"), ("bad_magic", "cannot read Parquet file"),
    ("damaged_pages", "cannot read Parquet file"), ("no_text_column", "has no column 'text' (its columns: id, body)"),
    ("int_column", "column 'text' holds int64, not strings"), ("truncated_arrow", "cannot read Arrow IPC file"),
])
def test_a_damaged_file_is_refused_in_one_line_naming_it(tmp_path, corpus, tokenizer_path, capsys, case, expected):
    docs = corpus[0]
    inputs = tmp_path / "in"
    write_parquet_dir(inputs, docs)
    damaged = inputs / "z_damaged.parquet"
    if case == "no_text_column":
        pq.write_table(pa.table({"id": [1], "body": ["x"]}), damaged)
    elif case == "int_column":
        pq.write_table(pa.table({"text": [1, 2]}), damaged)
    elif case == "truncated_arrow":
        damaged = write_save_to_disk(inputs / "saved", [d for d in docs if d]) / "data-00001-of-00002.arrow"
        _truncated(damaged)
    else:
        table = pa.table({"id": list(range(30)), "text": [d or "x" for d in docs[:30]]})
        pq.write_table(table, damaged, row_group_size=10)
        {"truncated": _truncated, "bad_magic": _bad_magic, "damaged_pages": _damaged_pages}[case](damaged)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        prepared_config(out, [str(inputs)], tokenizer_path, workers=2)
    message = one_line(exc)
    assert str(damaged) in message and expected in message, message
    assert ("--input" if expected.startswith("cannot") else "--text-field") in message
    assert not (out / MANIFEST).exists()
    args = ["--input", str(inputs), "--out", str(tmp_path / "cli"), "--tokenizer", tokenizer_path]
    assert prepare_main(args) == 1  # a damaged file
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(damaged) in err and "Traceback" not in err


def test_a_save_to_disk_state_that_lists_no_files_is_refused(tmp_path, corpus):
    saved = write_save_to_disk(tmp_path / "saved", ["a", "b"])
    (saved / "state.json").write_text(json.dumps({"_split": None}))
    with pytest.raises(DataError) as exc:
        resolve_inputs([str(saved)], 0)
    assert str(saved / "state.json") in one_line(exc) and "_data_files" in one_line(exc)

