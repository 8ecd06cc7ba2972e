"""On-disk layout of a prepared corpus, atomic writes, the manifest, and checked shard access.

    DIR/plan.json              settings + input file list; written first (resume checks it)
    DIR/tokenizer.model        the tokenizer every shard was encoded with: a sentencepiece model, or
    DIR/tokenizer.json         a Hugging Face one (+ its tokenizer_config.json, special_tokens_map.json
                               when it has them); the manifest's tokenizer.file names which
    DIR/shards/<name>.tok      tokens, uint16 or uint32, each document followed by EOS
    DIR/shards/<name>.idx      uint64 document start offsets into .tok, plus the end (docs + 1)
    DIR/units/<unit>.json      a unit's completion record (its shards, counts, checksums)
    DIR/manifest.json          written last: its presence means the corpus is complete

Within a shard the training documents come first and the held-out validation documents
after them (``train_tokens``/``train_docs`` mark the split), so both splits are contiguous
slices of the memory map and opening a corpus reads no token data.

Checksum policy: opening a corpus always checks the manifest, the tokenizer and every shard's
file size (a stat per file, no reads: start-up stays O(shards), not O(tokens)). The sha256 of
a shard's files is verified on the first read of that shard ("lazy", the default), at open
("full"), or never ("off"); ``strata prepare --verify --out DIR`` checks all of them, and
re-running ``strata prepare`` on a complete corpus verifies everything and rebuilds what failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
from pathlib import Path

import numpy as np

from .config import FORMAT_VERSION, STDLIB, DataConfig
from .errors import DataError

MANIFEST = "manifest.json"
PLAN = "plan.json"
TOKENIZER = "tokenizer.model"  # a trained one; a given one is copied under its own kind's names
TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name and rename, so a reader never sees a partial file.

    No fsync: that is atomic against a killed process (the usual interruption) at no cost. After
    a power loss a renamed file could hold unwritten blocks; a re-run of prepare verifies the
    checksums of every unit it keeps, and readers verify them too, so that is caught, not trusted.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_shard(root: Path, name: str, tokens: np.ndarray, offsets: np.ndarray,
                train_docs: int) -> dict:
    """Write one shard's two files atomically and return its manifest entry."""
    shard_dir = root / "shards"
    tok_bytes = tokens.tobytes()
    idx_bytes = offsets.astype(np.uint64).tobytes()
    write_atomic(shard_dir / f"{name}.tok", tok_bytes)
    write_atomic(shard_dir / f"{name}.idx", idx_bytes)
    return {"name": name, "tokens": int(tokens.size), "docs": int(offsets.size - 1),
            "train_tokens": int(offsets[train_docs]), "train_docs": int(train_docs),
            "tokens_sha256": sha256_bytes(tok_bytes), "index_sha256": sha256_bytes(idx_bytes)}


def prepare_command(manifest: dict, root: Path, tokenizer: str = "") -> str:
    """The ``strata prepare`` command that rebuilds ``root`` as it was prepared, for error messages.

    The inputs as given and every setting the manifest records (``options``), so the command has
    the corpus's fingerprint: it verifies every shard and rebuilds only what is damaged, into the
    same corpus. No ``--force``: inputs changed since are refused, never silently used. Relative
    inputs are read from the directory prepare ran in (a ``cd`` is added when that is not this
    one). ``tokenizer``: the command with that tokenizer instead (a new corpus: callers add --force).
    """
    opts = manifest.get("options")
    if not isinstance(opts, dict):  # a manifest from before options were recorded: the best guess
        opts = {"inputs": manifest.get("inputs") or ["PATH..."], "text_field": manifest.get("text_field"),
                "val_fraction": manifest.get("val_fraction"),
                "vocab_size": (manifest.get("tokenizer") or {}).get("vocab_size")}
    inputs = [str(i) for i in opts["inputs"]]
    out, prefix = str(root), ""
    cwd = opts.get("cwd")
    if cwd and any(i != STDLIB and not os.path.isabs(i) for i in inputs) and \
            os.path.realpath(cwd) != os.path.realpath(os.getcwd()):
        out, prefix = os.path.abspath(root), f"cd {shlex.quote(cwd)} && "
    args = ["strata", "prepare", "--input", *inputs, "--out", out]
    tokenizer = tokenizer or opts.get("tokenizer") or ""
    if tokenizer:
        args += ["--tokenizer", os.path.abspath(tokenizer)]
    elif opts.get("vocab_size"):
        args += ["--vocab-size", str(opts["vocab_size"])]
    defaults = DataConfig()
    for flag, name in (("--text-field", "text_field"), ("--val-fraction", "val_fraction"),
                       ("--shard-input-mb", "shard_input_mb"), ("--max-shard-tokens", "max_shard_tokens"),
                       ("--tokenizer-sample-mb", "tokenizer_sample_mb"), ("--stdlib-max-mb", "stdlib_max_mb")):
        value = opts.get(name)
        if name == "stdlib_max_mb" and STDLIB not in inputs:
            continue  # no effect on this corpus
        if value is not None and value != getattr(defaults, name):
            args += [flag, str(value)]
    return prefix + shlex.join(args)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared corpus at {root} ({MANIFEST} missing, so preparation never finished): "
                        f"run strata prepare --input PATH... --out {root}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); delete {root} and run strata prepare again") from exc
    if manifest.get("format") != "strata-tokens" or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format {manifest.get('format')} version {manifest.get('version')}, this "
                        f"Strata reads strata-tokens version {FORMAT_VERSION}: {prepare_command(manifest, root)} --force")
    return manifest


def shard_paths(root: Path, info: dict) -> tuple[Path, Path]:
    return root / "shards" / f"{info['name']}.tok", root / "shards" / f"{info['name']}.idx"


def check_shard_sizes(root: Path, manifest: dict) -> None:
    """Stat every shard file against the manifest (cheap; no token data is read)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for info in manifest["shards"]:
        tok, idx = shard_paths(root, info)
        for path, expected in ((tok, info["tokens"] * itemsize), (idx, (info["docs"] + 1) * 8)):
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"shard {path} is missing: rebuild it with {prepare_command(manifest, root)}") from None
            if size != expected:
                raise DataError(f"shard {path} is truncated or damaged ({size} bytes, manifest says {expected}): "
                                f"rebuild it with {prepare_command(manifest, root)}")


def verify_shard_checksums(root: Path, manifest: dict, info: dict) -> None:
    for path, key in zip(shard_paths(root, info), ("tokens_sha256", "index_sha256")):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != info[key]:
            raise DataError(f"shard {path} failed its checksum (sha256 {digest[:12]}..., manifest says "
                            f"{info[key][:12]}...): rebuild it with {prepare_command(manifest, root)}")


class Shard:
    """Memory-mapped access to one shard, checksum-verified on first use under the lazy policy."""

    def __init__(self, root: Path, manifest: dict, info: dict, verify: str) -> None:
        self.root, self.manifest, self.info = root, manifest, info
        self.dtype = np.dtype(manifest["dtype"])
        self._verify_on_open = verify == "lazy"
        self._tokens: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._lock = threading.Lock()

    def _open(self) -> None:
        with self._lock:
            if self._tokens is not None:
                return
            if self._verify_on_open:
                verify_shard_checksums(self.root, self.manifest, self.info)
            tok, idx = shard_paths(self.root, self.info)
            self._offsets = np.memmap(idx, dtype=np.uint64, mode="r")
            self._tokens = np.memmap(tok, dtype=self.dtype, mode="r")

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._open()
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._open()
        return self._offsets
