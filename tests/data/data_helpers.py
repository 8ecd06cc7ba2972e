"""Helpers shared by the data tests: tiny deterministic corpora with unusual characters."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from strata.data.config import DataConfig  # noqa: E402
from strata.data.prepare import prepare_corpus

WORDS = ["def", "return", "self", "naïve", "café", "日本語", "中文字符", "Ωμέγα", "مرحبا", "🙂", "👩‍💻",
         "e\u0301", "\u200b", "\u00a0", "▁", "x\u2581y", "</s>", "<unk>", "\ttab", "  ", "\r\n", "\n",
         "\n\n    ", "0123456789", "ß", "ﬁ", "Å", "\ufeff", "\x01", "\\u2028", "\u2028", "ᄀ", "𝔘𝔫𝔦"]

UNUSUAL = [  # strings a lossless tokenizer must round-trip
    "", " ", "  lead and trail  ", "\t\tx\t", "a\r\nb\rc\n\n\n", "▁", "▁▁ ▁", "x\u2581\u2581y", "\x00\x01\x7f",
    "\ufeffBOM", "e\u0301 vs é", "ﬁ Å K", "🙂👩‍💻🏳️‍🌈", "日本語とEnglish", "\u200b\u2028\u2029", "مرحبا بالعالم",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "</s><s><unk><pad>", "<0x41>", "\\n literal", "\U0010ffff", "def f(x):\n    return x  # ok\n"]


def make_documents(n_docs: int, seed: int, min_len: int = 40, max_len: int = 400) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) if rng.random() < 0.3 else rng.choice(["alpha", "beta", "gamma", "delta"])
                 for _ in range(rng.randint(min_len, max_len))]
        docs.append(" ".join(words) + rng.choice(["", "\n", "  ", "\t"]))
    return docs


def write_text_files(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:04d}.txt").write_bytes(doc.encode("utf-8"))
    return directory


def prepared_config(out: Path, inputs: list[str], tokenizer: str = "", **overrides) -> DataConfig:
    settings = dict(inputs=inputs, prepared_dir=str(out), tokenizer=tokenizer, vocab_size=400, workers=1,
                    val_fraction=0.1, shard_input_mb=0.01, tokenizer_sample_mb=0.2)
    settings.update(overrides)
    cfg = DataConfig(**settings)
    prepare_corpus(cfg, out)
    return cfg


HF_SPECIALS = ["<pad>", "<s>", "</s>"]
"""The special tokens of write_bpe_tokenizer's tokenizer, in the order of their ids (0, 1, 2)."""


def write_bpe_tokenizer(directory: Path, vocab_size: int = 512, config: dict | None = None) -> Path:
    """A byte-level BPE tokenizer trained with `tokenizers`' BpeTrainer on a few KB of text (the
    test vocabulary and some Python), with the special tokens <pad> <s> </s>, saved as
    DIRECTORY/tokenizer.json beside a tokenizer_config.json that names them (``config`` replaces
    its content; ``{}`` writes none). Returns the tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    code = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    texts = make_documents(12, seed=7) + [code * 8]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=HF_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is None:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<pad>", "model_max_length": 1024}
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"
