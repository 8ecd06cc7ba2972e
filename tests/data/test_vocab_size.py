"""A prepared corpus of another vocabulary than data.vocab_size is refused in one line (asked 512,
trained 4096 no more), whether named by data.prepared_dir or in a mixture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import make_documents, prepared_config, write_text_files

from strata.data.config import DataConfig
from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.prepare import ensure_prepared
from strata.data.shards import MANIFEST

REPO = Path(__file__).resolve().parents[2]
SMALL_RUN = ["model.pattern=M-*", "model.d_model=64", "model.mamba.headdim=16", "model.mamba.d_state=16",
             "model.mamba.chunk_size=16", "model.attention.n_heads=4", "model.attention.n_kv_heads=2",
             "train.seq_len=32", "train.global_batch_size=2", "parallel.micro_batch_size=2", "train.max_steps=1",
             "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1"]  # quick even when not refused


@pytest.fixture(scope="module")
def corpus_380(tmp_path_factory) -> DataConfig:
    """A corpus whose tokenizer was trained to --vocab-size 380."""
    base = tmp_path_factory.mktemp("v380")
    src = write_text_files(base / "src", make_documents(40, seed=11))
    return prepared_config(base / "prepared", [str(src)], vocab_size=380, tokenizer_sample_mb=0.05)


def refusal(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as exc:
        open_corpus(cfg)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_prepared_dir_of_another_vocabulary_is_refused(corpus_380):
    asked = DataConfig(prepared_dir=corpus_380.prepared_dir, vocab_size=512)  # other inputs too: key differs
    message = refusal(asked)
    assert "data.vocab_size is 512" in message and "vocabulary of 380" in message
    assert "set data.vocab_size=380" in message and "--vocab-size 512" in message
    assert corpus_380.prepared_dir in message
    ensure_prepared(asked)  # the complete corpus is left as it is: nothing rebuilt under the run's settings
    assert refusal(asked) == message
    open_corpus(DataConfig(prepared_dir=corpus_380.prepared_dir, vocab_size=380))  # the fix works
    open_corpus(DataConfig(prepared_dir=corpus_380.prepared_dir, vocab_size=512,  # vocab_size unused
                           tokenizer=str(Path(corpus_380.prepared_dir) / "tokenizer.model")))


def test_the_requested_vocabulary_counts_not_the_pieces_sentencepiece_stopped_at(tmp_path, corpus_380):
    # sentencepiece may stop short of --vocab-size on a tiny corpus: the run that asked for 380 still opens it
    root = tmp_path / "copy"
    shutil.copytree(corpus_380.prepared_dir, root)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["options"]["vocab_size"] == 380
    manifest["tokenizer"]["vocab_size"] = 371  # as if it had stopped at 371 pieces
    (root / MANIFEST).write_text(json.dumps(manifest))
    open_corpus(DataConfig(prepared_dir=str(root), vocab_size=380, inputs=["elsewhere"]))
    message = refusal(DataConfig(prepared_dir=str(root), vocab_size=371))
    assert "vocabulary of 380 (its tokenizer has 371 pieces)" in message and "set data.vocab_size=380" in message


def test_corpus_of_a_given_tokenizer_counts_its_pieces(tmp_path, small_corpus, tokenizer_path):
    cfg, _ = small_corpus  # prepared with --tokenizer (a 400-piece model)
    pieces = json.loads((Path(cfg.prepared_dir) / MANIFEST).read_text())["tokenizer"]["vocab_size"]
    open_corpus(DataConfig(prepared_dir=cfg.prepared_dir, vocab_size=pieces))
    message = refusal(DataConfig(prepared_dir=cfg.prepared_dir, vocab_size=pieces + 100))
    assert f"data.vocab_size is {pieces + 100}" in message and f"set data.vocab_size={pieces}" in message


def test_mixture_of_another_vocabulary_is_refused(corpus_380):
    mixture = [{"dir": corpus_380.prepared_dir, "weight": 1.0}]
    message = refusal(DataConfig(mixture=mixture))  # data.vocab_size left at its default, 4096
    assert "data.vocab_size is 4096" in message and "set data.vocab_size=380" in message
    open_corpus(DataConfig(mixture=mixture, vocab_size=380))


def test_train_refuses_it_in_one_line_before_training(tmp_path, corpus_380):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "strata.launcher.cli", "train", f"data.prepared_dir={corpus_380.prepared_dir}",
                           "data.vocab_size=512", f"train.run_dir={tmp_path / 'run'}", "logging.progress=lines",
                           *SMALL_RUN],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.vocab_size is 512" in errors[0] and "380" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
