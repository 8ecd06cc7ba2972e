"""An opened prepared corpus (or mixture of them): tokenizer, checks, and token streams."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import DataError
from .shards import TOKENIZER, Shard, check_shard_sizes, prepare_command, read_manifest, verify_shard_checksums
from .tokenizer import Tokenizer

log = logging.getLogger("strata.data")


class TokenStream:
    """One split (train or val) of a corpus as a single token sequence over shard slices.

    Documents are stored with their EOS, so concatenating the slices gives the documents
    joined by EOS. Sample s is the window [s * seq_len, s * seq_len + seq_len + 1): consecutive
    windows share one token, the target of the last position.
    """

    def __init__(self, shards: list[Shard], split: str) -> None:
        self.segments: list[tuple[Shard, int, int]] = []
        for shard in shards:
            train = shard.info["train_tokens"]
            start, length = (0, train) if split == "train" else (train, shard.info["tokens"] - train)
            if length:
                self.segments.append((shard, start, length))
        lengths = np.array([length for _, _, length in self.segments], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.total_tokens = int(self.starts[-1])

    def num_samples(self, seq_len: int) -> int:
        return max(0, (self.total_tokens - 1) // seq_len)

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) as int64, across shard boundaries."""
        out = np.empty(count, dtype=np.int64)
        seg = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < count:
            shard, seg_start, seg_len = self.segments[seg]
            inner = start + filled - int(self.starts[seg])
            take = min(count - filled, seg_len - inner)
            out[filled:filled + take] = shard.tokens[seg_start + inner: seg_start + inner + take]
            filled += take
            seg += 1
        return out

    def window(self, sample: int, seq_len: int) -> np.ndarray:
        return self.read(sample * seq_len, seq_len + 1)


@dataclass
class Corpus:
    tokenizer: Tokenizer
    roots: list[Path]
    manifests: list[dict]
    weights: list[float]
    shards: list[list[Shard]]
    train: list[TokenStream]
    val: list[TokenStream]

    def documents(self, component: int = 0) -> list[tuple[Shard, int, int]]:
        """(shard, start, end) token ranges of every document (without its EOS), for tools/tests."""
        out = []
        for shard in self.shards[component]:
            offsets = shard.offsets.tolist()
            out.extend((shard, a, b - 1) for a, b in zip(offsets[:-1], offsets[1:]))
        return out

    def decode_document(self, shard: Shard, start: int, end: int) -> str:
        return self.tokenizer.decode(shard.tokens[start:end])


def open_corpus(cfg: DataConfig) -> Corpus:
    """Open the prepared corpus (or mixture) of ``cfg``: check manifests, sizes and tokenizer.

    Reads no token data (see the checksum policy in data/shards.py), so it takes milliseconds
    even for billions of tokens.
    """
    if cfg.mixture:
        roots = [Path(e["dir"]) for e in cfg.mixture]
        weights = [float(e["weight"]) for e in cfg.mixture]
    else:
        roots, weights = [cfg.prepared_path()], [1.0]
    manifests = [read_manifest(root) for root in roots]
    tokenizer = _run_tokenizer(cfg, roots[0], manifests[0])
    for root, manifest in zip(roots, manifests):
        _check_tokenizer(root, manifest, tokenizer, cfg)
    _check_vocab_size(cfg, roots[0], manifests[0], mixture=bool(cfg.mixture))
    all_shards, train, val = [], [], []
    for root, manifest in zip(roots, manifests):
        check_shard_sizes(root, manifest)
        if cfg.verify == "full":
            for info in manifest["shards"]:
                verify_shard_checksums(root, manifest, info)
        shards = [Shard(root, manifest, info, cfg.verify) for info in manifest["shards"]]
        all_shards.append(shards)
        train.append(TokenStream(shards, "train"))
        val.append(TokenStream(shards, "val"))
    return Corpus(tokenizer, roots, manifests, weights, all_shards, train, val)


def _run_tokenizer(cfg: DataConfig, root: Path, manifest: dict) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer(cfg.tokenizer)
    path = root / manifest["tokenizer"].get("file", TOKENIZER)  # tokenizer.model, or tokenizer.json (+ configs)
    if not path.is_file():
        raise DataError(f"tokenizer {path} is missing: rebuild the corpus with {prepare_command(manifest, root)}")
    return Tokenizer(path)


def _check_vocab_size(cfg: DataConfig, root: Path, manifest: dict, mixture: bool) -> None:
    """Refuse a corpus prepared with another vocabulary than ``data.vocab_size``.

    The model's vocabulary follows the corpus's tokenizer, so training on it silently would give
    a vocabulary nobody asked for. The corpus's vocabulary is the ``--vocab-size`` its tokenizer
    was trained to (an upper bound: sentencepiece may stop short on a tiny corpus), or the size of
    the tokenizer it was given. Not checked when ``data.tokenizer`` names the model (vocab_size is
    then unused), nor for a corpus prepared with exactly this run's settings.
    """
    if cfg.tokenizer or manifest.get("key") == cfg.prepare_key():
        return
    options = manifest.get("options") or {}
    pieces = manifest["tokenizer"]["vocab_size"]
    trained_to = options.get("vocab_size") if not options.get("tokenizer") else 0
    vocab = trained_to or pieces
    if vocab == cfg.vocab_size:
        return
    where = "data.mixture's corpora" if mixture else "data.prepared_dir"
    pieces_note = f" (its tokenizer has {pieces} pieces)" if pieces != vocab else ""
    raise DataError(f"data.vocab_size is {cfg.vocab_size} but the corpus at {root} was prepared with a vocabulary of "
                    f"{vocab}{pieces_note}: set data.vocab_size={vocab} to train on it, or prepare another corpus "
                    f"with --vocab-size {cfg.vocab_size} for {where}")


def _check_tokenizer(root: Path, manifest: dict, tokenizer: Tokenizer, cfg: DataConfig) -> None:
    recorded = manifest["tokenizer"]
    if recorded["sha256"] == tokenizer.sha256:
        return
    hint = f"re-prepare it with {prepare_command(manifest, root, tokenizer=tokenizer.path)} --force"
    if cfg.tokenizer:
        hint += f", or set data.tokenizer to {root / recorded.get('file', TOKENIZER)}"
    raise DataError(f"{root / 'manifest.json'} was prepared with another tokenizer (sha256 {recorded['sha256'][:12]}, "
                    f"vocab {recorded['vocab_size']}) than this run's {tokenizer.path} (sha256 {tokenizer.sha256[:12]}, "
                    f"vocab {tokenizer.vocab_size}): {hint}")
