"""Lossless sentencepiece tokenizer: training on a bounded sample, encode and decode.

Losslessness: the trainer is set so that decode(encode(text)) == text for any str without lone
surrogates (identity normalisation, no whitespace collapsing, no dummy prefix, byte fallback for
characters outside the vocabulary). Two cases sentencepiece cannot round-trip are handled here:
- U+2581 ("▁") is sentencepiece's own whitespace marker and would decode as a space, so the
  character is encoded as its three UTF-8 byte pieces, which decode back to "▁".
- Lone surrogates (possible from JSON "\\ud800" escapes) are not UTF-8; they become U+FFFD,
  the same policy as invalid UTF-8 bytes in input files (see data/sources.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from .config import file_sha256
from .errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""Special ids of every tokenizer Strata trains (recorded in each manifest as well)."""

RUN_TOKENIZER = "tokenizer.model"
"""The run directory's copy of its tokenizer: what `strata generate` and `strata export` read."""
RUN_TOKENIZER_SHA256 = "tokenizer.sha256"
"""Its checksum beside it, in ``sha256sum`` format ("<hex>  tokenizer.model")."""

SPACE_MARK = "\u2581"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def train_tokenizer(lines: Iterable[str], vocab_size: int, out_path: Path, threads: int = 1) -> None:
    """Train a unigram model on ``lines`` and write it to ``out_path`` (caller renames atomically).

    The input is used whole and in the given order (no sentencepiece sampling/shuffling) and the
    random seed is fixed, so the same lines give a byte-identical model.
    """
    spm.set_random_generator_seed(1)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
            split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=16384,
            hard_vocab_limit=False, num_threads=threads, minloglevel=2)
    except RuntimeError as exc:
        reason = str(exc).split("] ")[-1]  # drop sentencepiece's source location
        raise DataError(f"training the tokenizer (vocab {vocab_size}) failed: {reason} Fix: change --vocab-size "
                        "(it must exceed 260 plus the distinct characters of the text) or give more text") from exc
    out_path.write_bytes(model.getvalue())


class Tokenizer:
    """A sentencepiece model with Strata's lossless encode/decode and its special ids."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = str(model_path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(self.path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"cannot load tokenizer {self.path}: {exc}; give a sentencepiece .model file") from exc
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        if self.eos_id < 0:
            raise DataError(f"tokenizer {self.path} has no EOS piece; train it with eos_id set (strata prepare does)")
        self._space_mark_ids = self._byte_piece_ids(SPACE_MARK.encode())

    def _byte_piece_ids(self, data: bytes) -> list[int] | None:
        ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in data]
        return None if self.unk_id in ids else ids

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Encode documents to int32 arrays with one sentencepiece call on the calling thread
        (prepare parallelises across processes; numpy output avoids a Python int per token)."""
        texts = [_clean_surrogates(t) for t in texts]
        out = self.sp.encode(texts, num_threads=1, return_type="numpy")
        for i, text in enumerate(texts):
            if SPACE_MARK in text:  # rare: redo just this document the slow, lossless way
                out[i] = self._encode_with_space_marks(text)
        return out

    def _encode_with_space_marks(self, text: str) -> np.ndarray:
        if self._space_mark_ids is None:
            raise DataError(f"tokenizer {self.path} has no byte-fallback pieces, so '\\u2581' cannot be encoded losslessly; use a model trained with byte_fallback=True")
        parts = text.split(SPACE_MARK)
        encoded = self.sp.encode(parts, num_threads=1, return_type="numpy")
        mark = np.array(self._space_mark_ids, dtype=np.int32)
        pieces = [encoded[0]]
        for part in encoded[1:]:
            pieces += [mark, part]
        return np.concatenate(pieces).astype(np.int32, copy=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        """The facts a manifest records so a corpus can be checked against a run's tokenizer."""
        return {"file": Path(self.path).name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}


def _clean_surrogates(text: str) -> str:
    # Fast path: ASCII and ordinary text never contain surrogates; the regex only runs on
    # strings that fail UTF-8 encoding, which is rare (JSON with broken escapes).
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


# ----------------------------------------------------------------------------------------
# The run directory's copy: a run is readable without its corpus, from any directory
# ----------------------------------------------------------------------------------------

def install_run_tokenizer(tokenizer: Tokenizer | str | os.PathLike, run_dir: str | os.PathLike,
                          write: bool = True) -> Path:
    """Copy the tokenizer a run trains with (a loaded Tokenizer or a sentencepiece .model file),
    and its checksum, into ``run_dir``: training once at start, and `strata import`.

    Each file is written under a temporary name, fsynced and renamed, so a reader never sees a
    partial one. A copy already there with the same checksum is left as it is; a different one
    (or a recorded checksum of another tokenizer) is refused: the run directory belongs to another
    tokenizer. With ``write=False`` (training's other ranks) only that check is made, so every
    rank refuses alike and rank 0 alone writes. Returns the copy's path.
    """
    run_dir = Path(run_dir)
    dest, record = run_dir / RUN_TOKENIZER, run_dir / RUN_TOKENIZER_SHA256
    source = Path(tokenizer.path if isinstance(tokenizer, Tokenizer) else tokenizer)
    reads = write or not isinstance(tokenizer, Tokenizer)  # a check alone needs no second read
    data = source.read_bytes() if reads else b""
    sha = hashlib.sha256(data).hexdigest() if reads else tokenizer.sha256
    if isinstance(tokenizer, Tokenizer) and sha != tokenizer.sha256:
        raise DataError(f"tokenizer {source} changed while the run was starting (sha256 "
                        f"{tokenizer.sha256[:12]}, now {sha[:12]}); start the run again")
    has_copy = dest.is_file()
    present = file_sha256(dest) if has_copy else _recorded_sha256(record)
    if present is not None and present != sha:
        own = f", or train with its own tokenizer (data.tokenizer={dest})" if has_copy else ""
        raise DataError(f"{run_dir} belongs to another tokenizer ({dest if has_copy else record}: sha256 "
                        f"{present[:12]}) than this run's {source} (sha256 {sha[:12]}): give another "
                        f"train.run_dir{own}")
    if not write:
        return dest
    run_dir.mkdir(parents=True, exist_ok=True)
    if not has_copy:
        _write_durably(dest, data)
    if _recorded_sha256(record) != sha:
        _write_durably(record, f"{sha}  {RUN_TOKENIZER}\n".encode())
    return dest


def run_tokenizer_path(run_dir: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """The sentencepiece model of the run in ``run_dir``: its copy (checked against the recorded
    checksum), or ``override`` (``--tokenizer``) for a run that has none; one-line DataErrors."""
    run_dir = Path(run_dir)
    path, record = run_dir / RUN_TOKENIZER, run_dir / RUN_TOKENIZER_SHA256
    recorded = _recorded_sha256(record)
    if override:
        given = Path(override)
        if not given.is_file():
            raise DataError(f"--tokenizer {given} is not a file; give the run's sentencepiece .model")
        if recorded is not None and file_sha256(given) != recorded:
            raise DataError(f"--tokenizer {given} is not the tokenizer {run_dir} was trained with ({record} records "
                            f"sha256 {recorded[:12]}); leave out --tokenizer to use the run's copy {path}")
        return given
    if not path.is_file():
        raise DataError(f"{path} is missing (a run trained before runs kept a copy of their tokenizer, or an import "
                        "without a sentencepiece tokenizer.model): pass --tokenizer PATH, the run's sentencepiece "
                        ".model (e.g. the tokenizer.model of the corpus it was trained on)")
    if recorded is not None and file_sha256(path) != recorded:
        raise DataError(f"{path} does not match the sha256 {recorded[:12]} recorded in {record}: the copy is damaged; "
                        "copy the run's tokenizer there again or pass --tokenizer PATH")
    return path


def _recorded_sha256(record: Path) -> str | None:
    try:
        text = record.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{record} is unreadable ({exc}); delete it (the next training start writes it again)") from exc
    sha = text.split()[0] if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DataError(f"{record} holds no sha256 ({text[:40]!r}); delete it (the next training start writes it again)")
    return sha


def _write_durably(path: Path, data: bytes) -> None:
    """Write under a temporary name, fsync, rename, fsync the directory: all or nothing, even
    after a power loss."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
