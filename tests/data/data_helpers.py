"""Helpers shared by the data tests: tiny deterministic corpora with unusual characters."""

from __future__ import annotations

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
