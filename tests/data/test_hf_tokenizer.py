"""Hugging Face fast tokenizers (tokenizer.json) beside sentencepiece: the same Tokenizer type,
special ids from the tokenizer's own files, lossless batched encoding, corpora prepared with one,
the run directory's copy and its checksums, and bad files refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from data_helpers import (HF_SPECIALS, UNUSUAL, WORDS, make_documents, prepared_config, write_bpe_tokenizer,
                          write_text_files)

from strata.data.config import DataConfig
from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.prepare import prepare_corpus
from strata.data.tokenizer import (
    RUN_TOKENIZER_SHA256,
    Tokenizer,
    install_run_tokenizer,
    run_tokenizer_path,
    tokenizer_sha256,
)

PAD, BOS, EOS = range(3)  # the ids BpeTrainer gives HF_SPECIALS


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    return write_bpe_tokenizer(tmp_path_factory.mktemp("hf") / "tok")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_tokenizer_json_round_trips_text_in_batches_as_the_tokenizers_library_encodes_it(hf_json):
    from tokenizers import Tokenizer as Fast

    tok = Tokenizer(hf_json)
    assert tok.kind == "huggingface" and tok.path == str(hf_json) and tok.sp is None
    assert tok.vocab_size == Fast.from_file(str(hf_json)).get_vocab_size() > 300
    texts = UNUSUAL + WORDS + make_documents(20, seed=5)
    batch = tok.encode_arrays(texts)
    assert all(a.dtype == np.int32 for a in batch)
    assert [a.tolist() for a in batch] == tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, batch):
        assert tok.decode(ids) == text, repr(text)
        assert EOS not in ids.tolist()  # "</s>" inside a document is text, never the boundary
    plain = "def add(a, b):\n    return a + b  # naïve café 🙂\n"
    assert tok.encode(plain) == Fast.from_file(str(hf_json)).encode(plain, add_special_tokens=False).ids
    assert tok.decode(tok.encode("lone \ud800 surrogate")) == "lone \ufffd surrogate"  # as for sentencepiece


def test_the_special_ids_come_from_the_tokenizers_own_files(hf_json, tmp_path):
    tok = Tokenizer(hf_json)  # tokenizer_config.json names <s>, </s>, <pad>
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (BOS, EOS, PAD, -1)
    assert [tok.token(i) for i in (PAD, BOS, EOS)] == HF_SPECIALS
    assert Tokenizer(hf_json.parent).sha256 == tok.sha256 == tokenizer_sha256(hf_json)  # the directory: the same

    other = tmp_path / "named"  # the config decides, in transformers' AddedToken form too
    shutil.copytree(hf_json.parent, other)
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>", "special": True},
                                                             "bos_token": None}))
    named = Tokenizer(other / "tokenizer.json")
    assert (named.eos_id, named.bos_id, named.pad_id) == (PAD, -1, PAD)  # no pad_token: </s>'s role is not guessed
    assert named.sha256 != tok.sha256  # the config is part of the tokenizer
    (other / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))  # wins, as in transformers
    assert Tokenizer(other).eos_id == BOS

    bare = tmp_path / "bare"  # no config: the usual strings among its special tokens
    bare.mkdir()
    shutil.copyfile(hf_json, bare / "tokenizer.json")
    guessed = Tokenizer(bare)
    assert (guessed.bos_id, guessed.eos_id, guessed.pad_id) == (BOS, EOS, PAD)
    assert guessed.sha256 == sha256(hf_json)  # one file: its own checksum


def test_a_directory_with_a_sentencepiece_model_uses_the_model(hf_json, tokenizer_path, tmp_path):
    both = tmp_path / "both"  # as Strata's exports and many hub models hold them
    shutil.copytree(hf_json.parent, both)
    shutil.copyfile(tokenizer_path, both / "tokenizer.model")
    tok = Tokenizer(both)
    assert tok.kind == "sentencepiece" and tok.sha256 == sha256(both / "tokenizer.model")
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    (both / "tokenizer.model").write_text("IQ== 0\n")  # not sentencepiece (a tiktoken rank file): the tokenizer.json
    assert Tokenizer(both).kind == "huggingface"


def test_a_corpus_prepared_with_a_tokenizer_json_keeps_its_files_and_ends_documents_with_its_eos(hf_json, tmp_path):
    docs = make_documents(60, seed=11)
    src = write_text_files(tmp_path / "src", docs)
    cfg = prepared_config(tmp_path / "out", [str(src)], str(hf_json), workers=2)
    corpus = open_corpus(cfg)
    tok = corpus.tokenizer
    assert tok.kind == "huggingface" and tok.eos_id == EOS
    assert sorted(corpus.decode_document(*d) for d in corpus.documents()) == sorted(docs)
    for shard in corpus.shards[0]:
        ends = shard.offsets[1:].astype(np.int64) - 1
        assert (np.asarray(shard.tokens)[ends] == EOS).all()  # each document followed by the tokenizer's EOS
    root = tmp_path / "out"
    assert sorted(p.name for p in root.glob("tokenizer*")) == ["tokenizer.json", "tokenizer_config.json"]
    recorded = corpus.manifests[0]["tokenizer"]
    assert recorded["file"] == "tokenizer.json" and recorded["kind"] == "huggingface"
    assert recorded["sha256"] == Tokenizer(hf_json).sha256 and recorded["eos_id"] == EOS
    one = prepared_config(tmp_path / "one", [str(src)], str(hf_json.parent), workers=1)  # the directory, 1 worker
    assert [s["tokens_sha256"] for s in open_corpus(one).manifests[0]["shards"]] == \
        [s["tokens_sha256"] for s in corpus.manifests[0]["shards"]]
    (root / "tokenizer_config.json").write_text("{}")  # a damaged copy: a re-run rebuilds the corpus with the right one
    prepare_corpus(cfg, root)
    assert sha256(root / "tokenizer_config.json") == sha256(hf_json.parent / "tokenizer_config.json")
    assert open_corpus(cfg).manifests[0]["tokenizer"]["sha256"] == recorded["sha256"]


def test_the_run_directory_keeps_the_files_and_one_record_of_their_checksums(hf_json, tokenizer_path, tmp_path):
    run_dir = tmp_path / "run"
    copy = install_run_tokenizer(Tokenizer(hf_json), run_dir)
    assert copy == run_dir / "tokenizer.json"
    assert sorted(p.name for p in run_dir.iterdir()) == ["tokenizer.json", "tokenizer.sha256", "tokenizer_config.json"]
    lines = (run_dir / RUN_TOKENIZER_SHA256).read_text().splitlines()  # sha256sum -c reads it
    assert lines == [f"{sha256(run_dir / name)}  {name}" for name in ("tokenizer.json", "tokenizer_config.json")]
    assert all((run_dir / n).read_bytes() == (hf_json.parent / n).read_bytes() for n in ("tokenizer.json",
                                                                                         "tokenizer_config.json"))
    stamp = (run_dir / RUN_TOKENIZER_SHA256).stat().st_mtime_ns
    install_run_tokenizer(Tokenizer(hf_json.parent), run_dir)  # a resume, given the directory: nothing rewritten
    assert (run_dir / RUN_TOKENIZER_SHA256).stat().st_mtime_ns == stamp
    assert run_tokenizer_path(run_dir) == copy and Tokenizer(copy).sha256 == Tokenizer(hf_json).sha256
    assert run_tokenizer_path(run_dir, hf_json.parent) == hf_json  # --tokenizer DIR of the same tokenizer

    with pytest.raises(DataError, match="belongs to another tokenizer") as err:  # kinds never mix
        install_run_tokenizer(Tokenizer(tokenizer_path), run_dir)
    assert "\n" not in str(err.value) and f"data.tokenizer={copy}" in str(err.value)
    sp_run = tmp_path / "sp_run"
    install_run_tokenizer(tokenizer_path, sp_run)
    with pytest.raises(DataError, match="belongs to another tokenizer"):
        install_run_tokenizer(Tokenizer(hf_json), sp_run, write=False)
    with pytest.raises(DataError, match="is not the tokenizer"):
        run_tokenizer_path(sp_run, hf_json)

    (run_dir / "tokenizer_config.json").write_text('{"eos_token": "<s>"}')  # the copy damaged
    with pytest.raises(DataError, match="tokenizer_config.json does not match the sha256"):
        run_tokenizer_path(run_dir)
    (run_dir / "tokenizer_config.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer_config.json is missing \(.*records it\)"):
        run_tokenizer_path(run_dir)
    install_run_tokenizer(Tokenizer(hf_json), run_dir)  # the same tokenizer: the missing file written again
    assert run_tokenizer_path(run_dir) == copy


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_tokenizer_files_are_one_line_naming_the_file_and_the_fix(hf_json, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(hf_json.parent, damaged)
    text = (damaged / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(text[: len(text) // 2])  # cut off
    with pytest.raises(DataError) as err:
        Tokenizer(damaged)
    assert one_line(err).startswith(f"{damaged / 'tokenizer.json'} is not a tokenizer.json")
    assert "replace it with the model's tokenizer.json" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        Tokenizer(empty)
    assert one_line(err).startswith(f"{empty} holds no tokenizer (tokenizer.json or a sentencepiece tokenizer.model)")
    with pytest.raises(ValueError, match=f"^tokenizer: {empty} holds no tokenizer"):
        DataConfig(tokenizer=str(empty)).validate()

    cases = {'{"eos_token": "<eos>"}': "names eos_token '<eos>', which is not in",
             '{"eos_token": null}': "names no EOS token",
             '{"eos_token": 7}': "eos_token is 7, neither a string",
             '{"eos_token": ': "is unreadable or not JSON"}
    for content, expected in cases.items():
        (damaged / "tokenizer.json").write_text(text)
        (damaged / "tokenizer_config.json").write_text(content)
        with pytest.raises(DataError) as err:
            Tokenizer(damaged / "tokenizer.json")
        assert expected in one_line(err) and str(damaged / "tokenizer_config.json") in str(err.value), content
