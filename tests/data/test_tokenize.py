"""Lossless tokenisation: strings, whole prepared documents, and the invalid-UTF-8 policy."""

from __future__ import annotations

import gzip
import io
import json

import sentencepiece as spm
import zstandard
from data_helpers import UNUSUAL, WORDS, make_documents, prepared_config

from strata.data.corpus import open_corpus
from strata.data.tokenizer import Tokenizer


def test_strings_round_trip(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    for text in UNUSUAL + WORDS + make_documents(20, seed=5):
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text, repr(text)


def test_special_ids_fixed_and_recorded(small_corpus):
    cfg, _ = small_corpus
    corpus = open_corpus(cfg)
    tok = corpus.tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    recorded = corpus.manifests[0]["tokenizer"]
    assert recorded["eos_id"] == 3 and recorded["sha256"] == tok.sha256
    assert recorded["vocab_size"] == tok.vocab_size <= 400  # an upper bound: tiny corpora give fewer pieces
    assert corpus.manifests[0]["dtype"] == "uint16"


def test_prepared_documents_decode_to_their_text(small_corpus):
    cfg, docs = small_corpus
    corpus = open_corpus(cfg)
    decoded = sorted(corpus.decode_document(*d) for d in corpus.documents())
    assert decoded == sorted(d for d in docs if d)
    totals = corpus.manifests[0]["totals"]
    assert totals["docs"] == len(docs) and 0 < totals["val_docs"] < totals["docs"]
    assert len(corpus.manifests[0]["shards"]) > 2


def test_jsonl_plain_gz_zst_and_invalid_utf8_policy(tmp_path, tokenizer_path):
    records = [{"body": d, "id": i} for i, d in enumerate(make_documents(6, seed=3))]
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0).encode() for i, r in enumerate(records)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines[:2]) + b"\n\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[2:4])))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines[4:])))
    (tmp_path / "d.jsonl").write_bytes(b'{"body": "lone \\ud800 surrogate"}\n')
    (tmp_path / "e.txt").write_bytes(b"bad \xff\xfe bytes \xe2\x82 end")
    cfg = prepared_config(tmp_path / "out", [str(tmp_path / "*.js*"), str(tmp_path / "e.txt")], tokenizer_path,
                          text_field="body", val_fraction=0.0)
    corpus = open_corpus(cfg)
    got = [corpus.decode_document(*d) for d in corpus.documents()]
    expected = [r["body"] for r in records] + ["lone \ufffd surrogate", b"bad \xff\xfe bytes \xe2\x82 end".decode("utf-8", "replace")]
    assert sorted(got) == sorted(expected)
    assert corpus.manifests[0]["totals"]["invalid_utf8_docs"] == 1
    assert corpus.manifests[0]["invalid_utf8_examples"] == [str(tmp_path / "e.txt")]


def test_large_vocab_uses_uint32(tmp_path):
    # User-defined symbols give a > 65536 vocabulary in well under a second of training.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world"] * 10), model_writer=model, vocab_size=66200,
        user_defined_symbols=[f"<w{i}>" for i in range(65800)], hard_vocab_limit=False, byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    path = tmp_path / "big.model"
    path.write_bytes(model.getvalue())
    assert Tokenizer(path).vocab_size > 65536
    text = "<w65799> <w12> hello"
    (tmp_path / "src.txt").write_text(text)
    cfg = prepared_config(tmp_path / "out", [str(tmp_path / "src.txt")], str(path), val_fraction=0.0)
    corpus = open_corpus(cfg)
    assert corpus.manifests[0]["dtype"] == "uint32"
    shard, start, end = corpus.documents()[0]
    assert int(shard.tokens[start:end].max()) > 65535
    assert corpus.decode_document(shard, start, end) == text
