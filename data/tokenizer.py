"""Strata's tokenizers: a sentencepiece model or a Hugging Face fast tokenizer behind one class.

``Tokenizer(path)`` takes any of three kinds of path (``tokenizer_files`` resolves it):
- a sentencepiece model file (what ``strata prepare`` trains, ``tokenizer.model`` in a copy);
- a Hugging Face ``tokenizer.json`` (read by the ``tokenizers`` library, imported lazily), with
  the ``tokenizer_config.json`` and ``special_tokens_map.json`` beside it when it is named
  tokenizer.json and they exist (they name the special tokens);
- a Hugging Face model directory: its ``tokenizer.model`` when that is a sentencepiece model (the
  original a tokenizer.json beside it was converted from; what Strata's own exports hold), else
  its ``tokenizer.json`` and those configs.
Callers see one type: ``encode``/``encode_batch``/``encode_arrays``, ``decode``, ``vocab_size``, the
special ids (``bos_id``, ``eos_id``, ``pad_id``, ``unk_id``; -1 when absent, pad falls back to EOS),
``special_ids`` (role -> id of the tokens the tokenizer names), ``sha256`` and ``describe()``.
A copy of a tokenizer (a corpus's, a run's) keeps the files under those names; its identity
(``sha256``) is the file's sha256 for one file, else the sha256 of the files' ``sha256sum`` listing.

Encoding is text only: no template tokens (BOS) are added, and a special token's string inside a
document is encoded as text, never as the special id (a document's ``</s>`` is not a boundary).

Losslessness of sentencepiece: the trainer is set so that decode(encode(text)) == text for any str
without lone surrogates (identity normalisation, no whitespace collapsing, no dummy prefix, byte
fallback for characters outside the vocabulary). Two cases sentencepiece cannot round-trip are
handled here:
- U+2581 ("▁") is sentencepiece's own whitespace marker and would decode as a space, so the
  character is encoded as its three UTF-8 byte pieces, which decode back to "▁".
- Lone surrogates (possible from JSON "\\ud800" escapes) are not UTF-8; they become U+FFFD,
  the same policy as invalid UTF-8 bytes in input files (see data/sources.py); for both kinds.
A Hugging Face tokenizer round-trips as exactly as it allows (a byte-level BPE exactly; one whose
normaliser changes text, e.g. lowercasing or NFKC, gives the normalised text back).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .config import file_sha256
from .errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""Special ids of every tokenizer Strata trains (recorded in each manifest as well)."""

SP_MODEL = "tokenizer.model"
"""A copy's name of a sentencepiece model."""
HF_TOKENIZER = "tokenizer.json"
HF_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
"""A copy's names of a Hugging Face tokenizer: tokenizer.json and, when it has them, these."""
MAIN_FILES = (SP_MODEL, HF_TOKENIZER)
"""The file a copy of each kind is loaded from (``Tokenizer.path``), in the order a directory is searched."""

RUN_TOKENIZER = SP_MODEL
"""The run directory's copy of a sentencepiece tokenizer (``tokenizer.json`` and its configs for a
Hugging Face one): what `strata generate` and `strata export` read."""
RUN_TOKENIZER_SHA256 = "tokenizer.sha256"
"""The copy's checksums beside it, in ``sha256sum`` format, one line per file copied."""

SENTENCEPIECE, HUGGING_FACE = "sentencepiece", "huggingface"
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
_GUESSES = {"bos_token": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
            "eos_token": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
            "pad_token": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
            "unk_token": ("<unk>", "[UNK]", "<|unk|>")}
"""Special tokens of a tokenizer.json without a config that names them, by the usual strings."""
KINDS_HINT = "a sentencepiece .model, a Hugging Face tokenizer.json, or a Hugging Face model directory holding one"

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


# ----------------------------------------------------------------------------------------
# Which files a tokenizer is, and its identity
# ----------------------------------------------------------------------------------------

def tokenizer_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files of the tokenizer at ``path`` (a file or a model directory), keyed by the names a
    copy of it takes: {"tokenizer.model": ...} or {"tokenizer.json": ..., [configs]}. Reads at
    most a few bytes of each; one-line DataError when there is no tokenizer there."""
    path = Path(path)
    if path.is_dir():
        model, hf = path / SP_MODEL, path / HF_TOKENIZER
        if model.is_file() and (not hf.is_file() or _head(model).startswith(b"\n")):  # a ModelProto's first field
            return {SP_MODEL: model}
        if hf.is_file():
            return _hf_files(hf)
        raise DataError(f"{path} holds no tokenizer ({HF_TOKENIZER} or a sentencepiece {SP_MODEL}): give "
                        f"{KINDS_HINT}")
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist: give {KINDS_HINT}")
    return _hf_files(path) if _head(path).lstrip().startswith(b"{") else {SP_MODEL: path}


def _hf_files(tokenizer_json: Path) -> dict[str, Path]:
    files = {HF_TOKENIZER: tokenizer_json}
    if tokenizer_json.name == HF_TOKENIZER:  # configs belong to the file of that name only
        files.update((name, tokenizer_json.parent / name) for name in HF_CONFIGS
                     if (tokenizer_json.parent / name).is_file())
    return files


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError as exc:
        raise DataError(f"cannot read tokenizer {path}: {exc}; fix its permissions or give another") from exc


def identity(shas: dict[str, str]) -> str:
    """The sha256 that names a tokenizer of these files (name -> sha256): the file's own for
    one file (a sentencepiece model), else that of their sorted ``sha256sum`` listing."""
    if len(shas) == 1:
        return next(iter(shas.values()))
    return hashlib.sha256(_listing(shas).encode()).hexdigest()


def _listing(shas: dict[str, str]) -> str:
    return "".join(f"{shas[name]}  {name}\n" for name in sorted(shas))


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """``Tokenizer(path).sha256`` without loading it."""
    return identity({name: file_sha256(p) for name, p in tokenizer_files(path).items()})


def tokenizer_copy(directory: str | os.PathLike) -> Path | None:
    """The main file of the tokenizer copy in ``directory`` (a corpus's or a run's), or None."""
    return next((Path(directory) / n for n in MAIN_FILES if (Path(directory) / n).is_file()), None)


# ----------------------------------------------------------------------------------------
# The tokenizer: one class, a backend per kind
# ----------------------------------------------------------------------------------------

class Tokenizer:
    """A sentencepiece model or a Hugging Face fast tokenizer: lossless batched encode, decode,
    and the special ids its own files name (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.files = tokenizer_files(path)
        self.kind = SENTENCEPIECE if SP_MODEL in self.files else HUGGING_FACE
        self.path = str(self.files[SP_MODEL if self.kind == SENTENCEPIECE else HF_TOKENIZER])
        self.file_sha256 = {name: file_sha256(p) for name, p in self.files.items()}
        self.sha256 = identity(self.file_sha256)
        backend = _SentencePiece(self.path) if self.kind == SENTENCEPIECE else _HuggingFace(self.files)
        self._backend = backend
        self.sp = getattr(backend, "sp", None)
        """The sentencepiece processor (None for a Hugging Face tokenizer), for raw benchmarks."""
        self.vocab_size = backend.vocab_size
        self.special_ids: dict[str, int] = backend.special_ids
        """Role ("bos_token", "eos_token", "pad_token", "unk_token") -> id, for the tokens it has."""
        self.bos_id = self.special_ids.get("bos_token", -1)
        self.unk_id = self.special_ids.get("unk_token", -1)
        if "eos_token" not in self.special_ids:
            raise DataError(backend.no_eos)
        self.eos_id = self.special_ids["eos_token"]
        self.pad_id = self.special_ids.get("pad_token", self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Encode documents to int32 arrays with one batched call on the calling thread (prepare
        parallelises across processes; numpy output avoids a Python int per token)."""
        return self._backend.encode_arrays([_clean_surrogates(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def token(self, token_id: int) -> str:
        """The string of one token (a sentencepiece piece, a vocabulary entry)."""
        return self._backend.token(int(token_id))

    def describe(self) -> dict:
        """The facts a manifest records so a corpus can be checked against a run's tokenizer."""
        return {"file": Path(self.path).name, "kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}


class _SentencePiece:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"cannot load tokenizer {path}: {exc}; give {KINDS_HINT}") from exc
        self.vocab_size = self.sp.get_piece_size()
        ids = zip(ROLES, (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id()))
        self.special_ids = {role: i for role, i in ids if i >= 0}
        self.no_eos = f"tokenizer {path} has no EOS piece; train it with eos_id set (strata prepare does)"
        self._space_mark_ids = self._byte_piece_ids(SPACE_MARK.encode())

    def _byte_piece_ids(self, data: bytes) -> list[int] | None:
        ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in data]
        return None if self.sp.unk_id() in ids else ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
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

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


class _HuggingFace:
    """A ``tokenizers`` Tokenizer from tokenizer.json; the special tokens from tokenizer_config.json
    (special_tokens_map.json where transformers lets it win), else the usual strings among its
    special added tokens."""

    def __init__(self, files: dict[str, Path]) -> None:
        # One thread per encode call, as sentencepiece: prepare's workers are the parallelism, and a
        # worker forked after the parent encoded never meets tokenizers' fork warning. A setting of
        # the user's stays.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer as Fast

        path = files[HF_TOKENIZER]
        try:
            self.tk = Fast.from_str(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read tokenizer {path}: {exc}; give {KINDS_HINT}") from exc
        except Exception as exc:  # tokenizers raises plain Exception on a file it cannot parse
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise DataError(f"{path} is not a tokenizer.json the tokenizers library reads ({reason}): replace it "
                            "with the model's tokenizer.json (as tokenizers' Tokenizer.save writes it)") from exc
        self.tk.no_truncation()  # a tokenizer.json may carry transformers' truncation or padding: documents
        self.tk.no_padding()     # are encoded whole and unpadded
        self.tk.encode_special_tokens = True  # a special token's string in a document is text
        self._encode = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self.config = special_tokens_config(files)
        self.special_ids = self._special_ids(path, files)
        self.no_eos = (f"tokenizer {path} names no EOS token (no eos_token in a tokenizer_config.json beside it, and "
                       f"none of {', '.join(_GUESSES['eos_token'])} among its special tokens): add \"eos_token\": "
                       f"\"...\" to {path.parent / HF_CONFIGS[0]}")

    def _special_ids(self, path: Path, files: dict[str, Path]) -> dict[str, int]:
        specials = {str(t) for t in self.tk.get_added_tokens_decoder().values() if t.special}
        ids = {}
        for role in ROLES:
            if role in self.config:
                token = _token_string(self.config[role], role, files)
            else:
                guesses = _GUESSES[role] + ((getattr(self.tk.model, "unk_token", None),) if role == "unk_token" else ())
                token = next((g for g in guesses if g and (g in specials or role == "unk_token")
                              and self.tk.token_to_id(g) is not None), None)
            if token is None:
                continue
            token_id = self.tk.token_to_id(token)
            if token_id is None:
                where = next(files[n] for n in reversed(HF_CONFIGS) if n in files and role in _read_json(files[n]))
                raise DataError(f"{where} names {role} {token!r}, which is not in {path}'s vocabulary: set {role} "
                                "there to one of its tokens (or to null)")
            ids[role] = token_id
        return ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.int32) for e in self._encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def token(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id)


def special_tokens_config(files: dict[str, Path]) -> dict:
    """tokenizer_config.json's settings with special_tokens_map.json's special tokens over them
    (unless the config lists added_tokens_decoder), as transformers reads them; {} without either."""
    config = _read_json(files[HF_CONFIGS[0]]) if HF_CONFIGS[0] in files else {}
    if HF_CONFIGS[1] in files and "added_tokens_decoder" not in config:
        config.update(_read_json(files[HF_CONFIGS[1]]))
    return config


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is unreadable or not JSON ({exc}): fix it, or delete it and name the special "
                        "tokens in a tokenizer_config.json") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path} holds {type(value).__name__}, not a JSON object: fix it or delete it")
    return value


def _token_string(value, role: str, files: dict[str, Path]) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    where = ", ".join(str(files[n]) for n in HF_CONFIGS if n in files)
    raise DataError(f"{where}: {role} is {value!r}, neither a string nor {{\"content\": ...}}: write the "
                    "token's string")


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
# Copies: a prepared corpus's, and the run directory's (readable without its corpus, from anywhere)
# ----------------------------------------------------------------------------------------

def copy_tokenizer(tokenizer: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Copy the tokenizer at ``tokenizer`` (any kind of path) into ``directory`` under a copy's
    names, as a prepared corpus keeps it: each file missing or different there is written (under a
    temporary name, then renamed), a file of another tokenizer's copy is removed. Returns the main
    file of the copy (what ``Tokenizer`` loads). The source is loaded first: a bad one is refused
    naming the user's file, not the copy."""
    directory = Path(directory)
    files = Tokenizer(tokenizer).files
    for name in (*MAIN_FILES, *HF_CONFIGS):
        dest = directory / name
        if name not in files:
            dest.unlink(missing_ok=True)
        elif not dest.is_file() or file_sha256(dest) != file_sha256(files[name]):
            _write_durably(dest, files[name].read_bytes())
    return directory / _main_name(files)


def _main_name(files: dict) -> str:
    return next(name for name in MAIN_FILES if name in files)


def install_run_tokenizer(tokenizer: Tokenizer | str | os.PathLike, run_dir: str | os.PathLike,
                          write: bool = True) -> Path:
    """Copy the tokenizer a run trains with (a loaded Tokenizer or a path of any kind), and the
    checksums of its files, into ``run_dir``: training once at start, and `strata import`.

    A sentencepiece model becomes ``tokenizer.model``; a Hugging Face tokenizer ``tokenizer.json``
    and the configs it has (``tokenizer_config.json``, ``special_tokens_map.json``); the record
    ``tokenizer.sha256`` lists them all. Each file is written under a temporary name, fsynced and
    renamed, so a reader never sees a partial one. A copy already there with the same checksums is
    left as it is (a file missing from it is written again); a different one (or a record of
    another tokenizer) is refused: the run directory belongs to another tokenizer. With
    ``write=False`` (training's other ranks) only that check is made, so every rank refuses alike
    and rank 0 alone writes. Returns the copy's main file.
    """
    run_dir = Path(run_dir)
    loaded = isinstance(tokenizer, Tokenizer)
    files = tokenizer.files if loaded else tokenizer_files(tokenizer)
    source = tokenizer.path if loaded else files[_main_name(files)]
    reads = write or not loaded  # a check alone needs no second read
    data = {name: p.read_bytes() for name, p in files.items()} if reads else {}
    shas = {name: hashlib.sha256(d).hexdigest() for name, d in data.items()} if reads else dict(tokenizer.file_sha256)
    sha = identity(shas)
    if loaded and sha != tokenizer.sha256:
        raise DataError(f"tokenizer {source} changed while the run was starting (sha256 "
                        f"{tokenizer.sha256[:12]}, now {sha[:12]}); start the run again")
    record = run_dir / RUN_TOKENIZER_SHA256
    present = {**(_recorded_sha256s(record) or {}), **_copy_sha256s(run_dir)}
    if present and present != shas:
        copy = tokenizer_copy(run_dir)
        own = f", or train with its own tokenizer (data.tokenizer={copy})" if copy else ""
        raise DataError(f"{run_dir} belongs to another tokenizer ({copy or record}: sha256 {identity(present)[:12]}) "
                        f"than this run's {source} (sha256 {sha[:12]}): give another train.run_dir{own}")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, content in data.items():
            if not (run_dir / name).is_file():
                _write_durably(run_dir / name, content)
        if _recorded_sha256s(record) != shas:
            _write_durably(record, _listing(shas).encode())
    return run_dir / _main_name(shas)


def run_tokenizer_path(run_dir: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """The tokenizer of the run in ``run_dir`` (the main file to give ``Tokenizer``): its copy,
    checked against the recorded checksums, or ``override`` (``--tokenizer``, any kind of path)
    for a run that has none; one-line DataErrors."""
    run_dir = Path(run_dir)
    record = run_dir / RUN_TOKENIZER_SHA256
    recorded = _recorded_sha256s(record)
    if override:
        given = Path(override)
        if not given.exists():
            raise DataError(f"--tokenizer {given} does not exist; give the run's tokenizer: {KINDS_HINT}")
        files = tokenizer_files(given)
        if recorded is not None and identity({n: file_sha256(p) for n, p in files.items()}) != identity(recorded):
            copy = run_dir / _main_name(recorded)
            raise DataError(f"--tokenizer {given} is not the tokenizer {run_dir} was trained with ({record} records "
                            f"sha256 {identity(recorded)[:12]}); leave out --tokenizer to use the run's copy {copy}")
        return files[_main_name(files)]
    path = run_dir / _main_name(recorded) if recorded else tokenizer_copy(run_dir)
    if path is None or not path.is_file():
        missing = path or run_dir / RUN_TOKENIZER
        also = f" ({record} records it)" if recorded else f", and so is {run_dir / HF_TOKENIZER}"
        raise DataError(f"{missing} is missing{also} (a run trained before runs kept a copy of their tokenizer, or an "
                        f"import without a tokenizer): pass --tokenizer PATH, the run's tokenizer ({KINDS_HINT}; e.g. "
                        "the tokenizer.model of the corpus it was trained on)")
    if recorded is not None:
        on_disk = _copy_sha256s(run_dir)
        for name in sorted(set(recorded) | set(on_disk)):
            if on_disk.get(name) != recorded.get(name):
                what = (f"does not match the sha256 {recorded[name][:12]} recorded in {record}" if name in recorded
                        and name in on_disk else f"is missing ({record} records it)" if name in recorded
                        else f"is not in the copy {record} records")
                raise DataError(f"{run_dir / name} {what}: the copy is damaged; copy the run's tokenizer there again "
                                "or pass --tokenizer PATH")
    return path


def _copy_sha256s(directory: Path) -> dict[str, str]:
    return {name: file_sha256(directory / name) for name in (*MAIN_FILES, *HF_CONFIGS) if (directory / name).is_file()}


def _recorded_sha256s(record: Path) -> dict[str, str] | None:
    """File name -> sha256 of the run's copy, from its record; None when there is no record."""
    try:
        text = record.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{record} is unreadable ({exc}); delete it (the next training start writes it again)") from exc
    shas = {}
    for line in text.splitlines() or [""]:
        sha, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", sha) or name not in (*MAIN_FILES, *HF_CONFIGS):
            raise DataError(f"{record} holds no sha256 of a tokenizer file ({line[:40]!r}); delete it (the next "
                            "training start writes it again)")
        shas[name] = sha
    if sum(name in MAIN_FILES for name in shas) != 1:
        raise DataError(f"{record} lists {sorted(shas)}, not one tokenizer; delete it (the next training start writes "
                        "it again)")
    return shas


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
