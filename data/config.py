"""Configuration of the data pipeline (the ``data:`` section of a run's YAML)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
"""Version of the prepared-corpus layout; part of the cache key so an old layout is never reused."""

STDLIB = "stdlib"
"""The input name that stands for the embedded default corpus (the Python standard library's .py files)."""


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=lambda: [STDLIB])
    """Files, directories and globs of text, source files, JSONL (plain, .gz, .zst), Parquet
    (.parquet) and Arrow (.arrow; a directory `datasets`' save_to_disk wrote) to prepare.
    The single entry "stdlib" is the embedded default corpus: this Python's standard-library
    .py files (no site-packages, no test directories), sorted, capped at ``stdlib_max_mb``."""

    prepared_dir: str = ""
    """Where the prepared shards live. Empty: ``.strata/data/<name>-v<vocab>-<key>`` under the
    current directory, keyed by everything that changes the result (inputs, vocab, tokenizer,
    text field, split), so the next run with the same settings reuses it."""

    vocab_size: int = 4096
    """Vocabulary size of the sentencepiece model trained when ``tokenizer`` is empty. A corpus
    prepared beforehand (``prepared_dir``, ``mixture``) must have been prepared with this
    vocabulary (``--vocab-size``), or it is refused; with ``tokenizer`` set it is not used."""

    tokenizer: str = ""
    """Path of an existing tokenizer to use instead of training one: a sentencepiece .model, a
    Hugging Face tokenizer.json (with the tokenizer_config.json / special_tokens_map.json beside
    it, which name its special tokens), or a Hugging Face model directory holding them (its
    sentencepiece tokenizer.model when it has one). When set, every prepared corpus the run reads
    must have been tokenised with exactly this tokenizer (checksum of its files)."""

    text_field: str = "text"
    """JSONL, Parquet and Arrow: the field of each record (the column of each row) that holds the
    document text; its values must be strings (nulls are skipped)."""

    mixture: list[dict] = field(default_factory=list)
    """Optional weighted mixture of already prepared corpora, e.g.
    ``[{"dir": ".strata/data/code", "weight": 0.7}, {"dir": "web", "weight": 0.3}]``.
    Weights are normalised. Empty: the single corpus prepared from ``inputs``. All entries must
    share one tokenizer (prepare the later ones with ``--tokenizer`` of the first)."""

    seed: int = -1
    """Shuffle seed of the data order; -1 follows the run's seed given to TrainLoader. Set it to
    change the data order without changing the model's initialisation."""

    val_fraction: float = 0.01
    """Fraction of documents held out for validation, chosen by a hash of each document's text
    at prepare time (deterministic; duplicates land on the same side)."""

    doc_boundaries: bool = False
    """Reset position_ids after each EOS and ignore the loss (label -100) where the input token is
    an EOS, i.e. where the target would be the first token of the next, unrelated document."""

    workers: int = 0
    """Worker processes for prepare; 0 means one per CPU core."""

    shard_input_mb: float = 0.0
    """Input megabytes tokenised into one shard (one unit of parallel work and of resume).
    0: automatic, 1/64 of the total input clamped to [1, 64] MB, so a small corpus still
    spreads over the workers and a large one does not make thousands of files."""

    max_shard_tokens: int = 1 << 26
    """Hard cap on tokens per shard; a long input (e.g. compressed JSONL) rolls over to more shards."""

    tokenizer_sample_mb: float = 2.0
    """Megabytes of text (a deterministic spread over the inputs) used to train the tokenizer."""

    stdlib_max_mb: float = 16.0
    """Cap on the default stdlib corpus: files are taken in sorted order until this many megabytes."""

    prefetch: int = 4
    """Micro-batches the background loader thread keeps ready ahead of the training step."""

    verify: str = "lazy"
    """Shard checksum policy. Sizes are always checked when a corpus is opened. "lazy": each
    shard's checksums are verified the first time the run reads it; "full": all shards at open
    (reads the whole corpus); "off": never (``strata prepare --verify DIR`` checks explicitly)."""

    def validate(self) -> None:
        """Raise ValueError("field: problem; fix") for values that cannot work."""
        if not self.inputs and not self.mixture:
            raise ValueError("inputs: empty; give at least one path or glob, or 'stdlib'")
        if not 2 <= self.vocab_size <= (1 << 31) - 1 and not self.tokenizer:
            raise ValueError(f"vocab_size: {self.vocab_size} out of range; use e.g. 4096")
        if self.vocab_size < 300 and not self.tokenizer:
            raise ValueError(f"vocab_size: {self.vocab_size} is too small for 256 byte-fallback "
                             "pieces plus specials; use at least 300")
        if self.tokenizer:
            from .errors import DataError
            from .tokenizer import tokenizer_files

            try:
                tokenizer_files(self.tokenizer)
            except DataError as exc:
                raise ValueError(f"tokenizer: {exc}, or leave it empty") from None
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: {self.val_fraction} not in [0, 1); use e.g. 0.01")
        if self.workers < 0:
            raise ValueError(f"workers: {self.workers} is negative; use 0 for one per core")
        for name in ("tokenizer_sample_mb", "stdlib_max_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive; use the default")
        if self.shard_input_mb < 0:
            raise ValueError("shard_input_mb: negative; use 0 for automatic")
        if self.max_shard_tokens < 1024:
            raise ValueError("max_shard_tokens: below 1024; use the default")
        if self.prefetch < 1:
            raise ValueError(f"prefetch: {self.prefetch} must be >= 1")
        if self.verify not in ("lazy", "full", "off"):
            raise ValueError(f"verify: {self.verify!r} unknown; use lazy, full or off")
        self._validate_mixture()

    def _validate_mixture(self) -> None:
        for i, entry in enumerate(self.mixture):
            if not isinstance(entry, dict) or set(entry) != {"dir", "weight"}:
                raise ValueError(f"mixture[{i}]: expected {{dir: PATH, weight: NUMBER}}, got {entry!r}")
            if not isinstance(entry["weight"], (int, float)) or not entry["weight"] > 0:
                raise ValueError(f"mixture[{i}].weight: {entry['weight']!r} must be a positive number")

    def workers_or_cores(self) -> int:
        return self.workers or max(1, os.cpu_count() or 1)

    def prepare_key(self) -> str:
        """Hash of every setting that changes what prepare writes (not the file listing)."""
        from .tokenizer import tokenizer_sha256

        tokenizer_sha = tokenizer_sha256(self.tokenizer) if self.tokenizer else ""
        settings = {
            "version": FORMAT_VERSION, "inputs": list(self.inputs), "text_field": self.text_field,
            "vocab_size": 0 if tokenizer_sha else self.vocab_size, "tokenizer_sha256": tokenizer_sha,
            "val_fraction": self.val_fraction, "shard_input_mb": self.shard_input_mb,
            "max_shard_tokens": self.max_shard_tokens, "tokenizer_sample_mb": self.tokenizer_sample_mb,
        }
        if self.inputs == [STDLIB]:
            settings["stdlib_max_mb"] = self.stdlib_max_mb
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def prepare_options(self) -> dict:
        """What a manifest records so ``strata prepare`` can rebuild the same corpus: the inputs
        as given, every setting of ``prepare_key`` (``vocab_size`` 0 when a tokenizer was given,
        whose absolute path is kept), and the directory relative inputs were read from."""
        return {"inputs": list(self.inputs), "cwd": os.getcwd(),
                "tokenizer": os.path.abspath(self.tokenizer) if self.tokenizer else "",
                "vocab_size": 0 if self.tokenizer else self.vocab_size, "text_field": self.text_field,
                "val_fraction": self.val_fraction, "shard_input_mb": self.shard_input_mb,
                "max_shard_tokens": self.max_shard_tokens, "tokenizer_sample_mb": self.tokenizer_sample_mb,
                "stdlib_max_mb": self.stdlib_max_mb}

    def prepared_path(self) -> Path:
        """The directory of the single (non-mixture) corpus."""
        if self.prepared_dir:
            return Path(self.prepared_dir)
        first = self.inputs[0] if self.inputs else "corpus"
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(first.rstrip("/*")).name or "corpus")[:40]
        vocab = "tok" if self.tokenizer else f"v{self.vocab_size}"
        return Path(".strata") / "data" / f"{label}-{vocab}-{self.prepare_key()[:10]}"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
