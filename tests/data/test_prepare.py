"""prepare: inputs, determinism, resume after an interruption, mixtures, and ensure_prepared."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import make_documents, prepared_config, write_text_files

from strata.data.config import DataConfig
from strata.data.corpus import open_corpus
from strata.data.loader import TrainLoader
from strata.data.prepare import ensure_prepared, prepare_corpus
from strata.data.shards import MANIFEST


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return write_text_files(tmp_path_factory.mktemp("src") / "docs", make_documents(60, seed=7))


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_prepare_resumes_to_a_byte_identical_result(tmp_path, sources, workers):
    settings = dict(inputs=[str(sources)], vocab_size=350, workers=workers, shard_input_mb=0.008, tokenizer_sample_mb=0.05)
    reference = DataConfig(prepared_dir=str(tmp_path / "ref"), **settings)
    prepare_corpus(reference)
    resumed = DataConfig(prepared_dir=str(tmp_path / "resumed"), **settings)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        prepare_corpus(resumed, _stop_after_units=2)
    out = tmp_path / "resumed"
    assert not (out / MANIFEST).exists()
    finished = len(list((out / "units").glob("*.json")))
    assert finished == 2 if workers == 1 else finished >= 2  # a pool may finish units already running
    (out / "shards" / "u000005-p000.tok.tmp").write_bytes(b"half-written by a killed run")
    done_before = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("u00000[01]*")}
    prepare_corpus(resumed)
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # finished shards kept
    assert tree(tmp_path / "ref") == tree(out)
    assert len(open_corpus(reference).manifests[0]["shards"]) >= 4


def test_output_does_not_depend_on_worker_count(tmp_path, sources, tokenizer_path):
    one = prepared_config(tmp_path / "one", [str(sources)], tokenizer_path, workers=1)
    two = prepared_config(tmp_path / "two", [str(sources)], tokenizer_path, workers=2)
    assert tree(Path(one.prepared_dir)) == tree(Path(two.prepared_dir))


def test_rerun_of_a_complete_corpus_is_a_verified_no_op(tmp_path, sources, tokenizer_path):
    cfg = prepared_config(tmp_path / "c", [str(sources)], tokenizer_path)
    manifest = Path(cfg.prepared_dir) / MANIFEST
    before = manifest.stat().st_mtime_ns
    prepare_corpus(cfg)
    ensure_prepared(cfg)
    assert manifest.stat().st_mtime_ns == before


def test_inputs_expand_dirs_globs_and_skip_hidden_and_binary(tmp_path, tokenizer_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.py").write_text("print('b')\n")
    (tmp_path / "d" / "sub" / "a.md").write_text("# a\n")
    (tmp_path / "d" / ".hidden").write_text("secret")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "x.txt").write_text("x")
    cfg = prepared_config(tmp_path / "out", [str(tmp_path / "d"), str(tmp_path / "*.txt"), str(tmp_path / "d" / "b.py")],
                          tokenizer_path, val_fraction=0.0)
    corpus = open_corpus(cfg)
    assert [corpus.decode_document(*d) for d in corpus.documents()] == ["print('b')\n", "# a\n", "x"]


def test_mixture_of_prepared_corpora_follows_weights(tmp_path, tokenizer_path):
    dirs = []
    for i, n_docs in enumerate((40, 15)):
        src = write_text_files(tmp_path / f"src{i}", make_documents(n_docs, seed=20 + i))
        dirs.append(prepared_config(tmp_path / f"c{i}", [str(src)], tokenizer_path).prepared_dir)
    cfg = DataConfig(mixture=[{"dir": dirs[0], "weight": 3}, {"dir": dirs[1], "weight": 1}], tokenizer=tokenizer_path)
    ensure_prepared(cfg)
    corpus = open_corpus(cfg)
    loader = TrainLoader(corpus, cfg, 16, 50, 0, 1, seed=5)
    ids = [sample for _ in range(100) for sample in (next(loader), loader.last_sample_ids)[1]]
    loader.close()
    counts = Counter(c for c, _ in ids)
    assert abs(counts[0] - 0.75 * len(ids)) <= len(ids) / 1000 and sum(counts.values()) == 5000
    small = corpus.train[1].num_samples(16)
    assert small < counts[1]  # the small corpus is seen for several epochs, each a full pass
    mine = [s for c, s in ids if c == 1]
    assert sorted(mine[:small]) == list(range(small))


def test_ensure_prepared_defaults_to_a_keyed_reusable_dir(tmp_path, monkeypatch, sources):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(inputs=[str(sources)], vocab_size=420, workers=1, tokenizer_sample_mb=0.05)
    path = cfg.prepared_path()
    assert path.parts[:2] == (".strata", "data") and "v420" in path.name
    assert DataConfig(inputs=[str(sources)], vocab_size=430).prepared_path() != path
    ensure_prepared(cfg)
    assert (tmp_path / path / MANIFEST).is_file()
    corpus = open_corpus(cfg)
    assert corpus.tokenizer.vocab_size <= 420
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / path).rglob("*")}
    ensure_prepared(cfg)  # reuses it: nothing rewritten
    assert before == {f: f.stat().st_mtime_ns for f in (tmp_path / path).rglob("*")}


def test_stdlib_default_input_lists_sorted_capped_non_test_sources():
    from strata.data.sources import stdlib_files
    files = stdlib_files(2 * 2**20)
    assert files and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or "site-packages" in f for f in files)
    assert sum(os.path.getsize(f) for f in files) <= 2 * 2**20
    assert files == stdlib_files(2 * 2**20)


def test_large_jsonl_is_split_at_line_boundaries_without_loss(tmp_path, tokenizer_path):
    docs = make_documents(150, seed=31, min_len=5, max_len=60)
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = prepared_config(tmp_path / "out", [str(tmp_path / "big.jsonl")], tokenizer_path,
                          shard_input_mb=0.004, val_fraction=0.0)
    corpus = open_corpus(cfg)
    assert len(corpus.manifests[0]["shards"]) > 5
    assert [corpus.decode_document(*d) for d in corpus.documents()] == docs
