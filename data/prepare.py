"""``strata prepare``: tokenise inputs into checked, memory-mappable shards, resumably.

Work is split into units of about ``shard_input_mb`` of input, fixed by the inputs alone (not by
the worker count), so the output is byte-identical whatever the parallelism and whether or not
the run was interrupted. Each unit writes its shards and then its record under temporary names
and renames them; the manifest is written last. A re-run keeps every unit whose record and
shard files are intact and does the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from .config import FORMAT_VERSION, DataConfig
from .errors import DataError
from .progress import Progress
from .shards import (MANIFEST, PLAN, TMP_SUFFIX, TOKENIZER, check_shard_sizes, read_manifest,
                     token_dtype, verify_shard_checksums, write_json, write_shard)
from .sources import InputFile, Piece, input_bytes, iter_documents, plan_pieces, resolve_inputs, sample_lines
from .tokenizer import Tokenizer, copy_tokenizer, tokenizer_files, tokenizer_sha256, train_tokenizer

log = logging.getLogger("strata.data")
ENCODE_BATCH_CHARS = 1 << 20  # documents are encoded in batches of about this much text
AUTO_UNITS, MIN_UNIT_BYTES, MAX_UNIT_BYTES = 64, 1 << 20, 64 << 20  # automatic shard_input_mb


def ensure_prepared(cfg: DataConfig) -> None:
    """Prepare the run's corpus unless a complete one is already there (then only a few stats).

    Call on rank 0 only, then barrier. A mixture's corpora must have been prepared beforehand.
    """
    _validate(cfg)
    if cfg.mixture:
        for entry in cfg.mixture:
            root = Path(entry["dir"])
            check_shard_sizes(root, read_manifest(root))
        return
    out = cfg.prepared_path()
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        try:
            check_shard_sizes(out, manifest)
            return
        except DataError as exc:
            if manifest.get("key") != cfg.prepare_key():
                raise
            log.warning("%s; rebuilding", exc)
    prepare_corpus(cfg, out, force=not cfg.prepared_dir)


def prepare_corpus(cfg: DataConfig, out: str | Path | None = None, *, force: bool = False,
                   _stop_after_units: int | None = None) -> dict:
    """Prepare ``cfg.inputs`` into ``out`` (default ``cfg.prepared_path()``); return the manifest.

    ``force`` replaces a directory prepared from other inputs or settings. On a complete corpus
    of the same inputs this verifies every checksum and rebuilds only what is damaged.
    ``_stop_after_units`` is a test hook that simulates an interruption.
    """
    _validate(cfg)
    root = Path(out) if out else cfg.prepared_path()
    created = not root.exists()
    files = resolve_inputs(cfg.inputs, int(cfg.stdlib_max_mb * 2**20))
    if not any(f.size for f in files):
        raise DataError(f"inputs {cfg.inputs} hold no data (all {len(files)} files are empty): give non-empty files to --input")
    key = cfg.prepare_key()
    fingerprint = _fingerprint(key, files)
    try:
        manifest = _reuse_or_reset(root, fingerprint, force)
        if manifest is not None:
            return manifest
        return _prepare(cfg, root, files, key, fingerprint, _stop_after_units)
    except DataError:
        if created and not any(p.suffix == ".tok" for p in (root / "shards").glob("*")):
            shutil.rmtree(root, ignore_errors=True)  # nothing worth resuming: leave no debris
        raise


def _validate(cfg: DataConfig) -> None:
    try:
        cfg.validate()
    except ValueError as exc:
        raise DataError(f"data.{exc}") from exc


def _fingerprint(key: str, files: list[InputFile]) -> str:
    listing = [[f.path, f.size, f.mtime_ns] for f in files]
    return hashlib.sha256(json.dumps([key, listing]).encode()).hexdigest()


def _reuse_or_reset(root: Path, fingerprint: str, force: bool) -> dict | None:
    """Return a verified complete manifest to reuse, or leave ``root`` ready to (re)prepare."""
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if manifest.get("fingerprint") == fingerprint:
            if not _drop_damaged_units(root, manifest):
                log.info("%s is complete and verified; nothing to do", root)
                return manifest
        elif not force:
            raise DataError(f"{root} already holds a corpus prepared from other inputs or settings: "
                            "choose another --out, or pass --force to replace it")
        else:
            shutil.rmtree(root)
    elif (root / PLAN).is_file():
        plan = json.loads((root / PLAN).read_text())
        if plan.get("fingerprint") != fingerprint:
            if not force:
                raise DataError(f"{root} holds an unfinished preparation of other inputs or settings: "
                                "choose another --out, or pass --force to replace it")
            shutil.rmtree(root)
    return None


def _drop_damaged_units(root: Path, manifest: dict) -> bool:
    """Verify the tokenizer and all shards; delete the manifest and the records of units that
    fail (of every unit when the tokenizer is missing or not the recorded one). True if any."""
    tokenizer = root / manifest["tokenizer"].get("file", TOKENIZER)
    if not tokenizer.is_file() or tokenizer_sha256(tokenizer) != manifest["tokenizer"]["sha256"]:
        log.warning("%s is missing or is not the tokenizer %s records; rebuilding the corpus", tokenizer, MANIFEST)
        tokenizer.unlink(missing_ok=True)
        shutil.rmtree(root / "units", ignore_errors=True)
        (root / MANIFEST).unlink()
        return True
    damaged: set[str] = set()
    for info in manifest["shards"]:
        try:
            check_shard_sizes(root, {**manifest, "shards": [info]})
            verify_shard_checksums(root, manifest, info)
        except DataError as exc:
            log.warning("%s", exc)
            damaged.add(info["name"].split("-")[0])
    for unit in damaged:
        (root / "units" / f"{unit}.json").unlink(missing_ok=True)
    if damaged:
        (root / MANIFEST).unlink()
    return bool(damaged)


def _prepare(cfg: DataConfig, root: Path, files: list[InputFile], key: str, fingerprint: str,
             stop_after: int | None) -> dict:
    for sub in ("shards", "units"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stale in root.rglob(f"*{TMP_SUFFIX}"):
        stale.unlink()  # half-written files of an interrupted run
    units = plan_pieces(files, _unit_bytes(cfg, files), cfg.text_field)
    write_json(root / PLAN, {"fingerprint": fingerprint, "key": key, "inputs": list(cfg.inputs),
                             "files": [[f.path, f.size] for f in files], "units": len(units)})
    tokenizer = _ensure_tokenizer(cfg, root, units)
    records = _run_units(cfg, root, units, tokenizer, stop_after)
    manifest = _manifest(cfg, key, fingerprint, tokenizer, records)
    if manifest["totals"]["docs"] == 0:
        raise DataError(f"no documents found in {cfg.inputs} (all empty or blank): check the inputs, "
                        "and --text-field for JSONL, Parquet and Arrow")
    write_json(root / MANIFEST, manifest)
    _report(root, manifest)
    return manifest


def _unit_bytes(cfg: DataConfig, files: list[InputFile]) -> int:
    if cfg.shard_input_mb:
        return int(cfg.shard_input_mb * 2**20)
    # Depends on the inputs only (never on the worker count), so the output stays deterministic.
    return min(max(sum(f.size for f in files) // AUTO_UNITS, MIN_UNIT_BYTES), MAX_UNIT_BYTES)


def _ensure_tokenizer(cfg: DataConfig, root: Path, units: list[list[Piece]]) -> Tokenizer:
    path = root / TOKENIZER
    if cfg.tokenizer:
        path = copy_tokenizer(cfg.tokenizer, root)  # tokenizer.model, or tokenizer.json and its configs
    elif not path.is_file():
        started = time.perf_counter()
        lines = sample_lines(units, cfg.text_field, int(cfg.tokenizer_sample_mb * 2**20))
        if not lines:
            raise DataError(f"no text found in {cfg.inputs} to train the tokenizer on: give non-empty inputs "
                            "(and the right --text-field for JSONL, Parquet and Arrow)")
        log.info("training a %d-piece tokenizer on %d sample lines (%.1f MB)", cfg.vocab_size, len(lines),
                 sum(map(len, lines)) / 2**20)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        # One trainer thread: sentencepiece's multi-threaded EM is not bit-reproducible, and a
        # resumed run must produce the same model as an uninterrupted one.
        train_tokenizer(lines, cfg.vocab_size, tmp, threads=1)
        tmp.replace(path)
        log.info("trained tokenizer (vocab %d) on %d lines in %.1fs", cfg.vocab_size, len(lines),
                 time.perf_counter() - started)
    return Tokenizer(path)


def _run_units(cfg: DataConfig, root: Path, units: list[list[Piece]], tokenizer: Tokenizer,
               stop_after: int | None) -> list[dict]:
    records: list[dict | None] = [_finished_record(root, i) for i in range(len(units))]
    todo = [i for i, r in enumerate(records) if r is None]
    job = dict(root=str(root), tokenizer=tokenizer.path, text_field=cfg.text_field,
               val_fraction=cfg.val_fraction, max_shard_tokens=cfg.max_shard_tokens,
               dtype=token_dtype(tokenizer.vocab_size).str)
    total_bytes = sum(input_bytes(units[i]) for i in todo)
    workers = min(cfg.workers_or_cores(), len(todo))
    context = _process_context()  # before the progress bar, whose monitor thread would force spawn
    log.info("prepare %s: %d units (%d done before), %d workers", root, len(units), len(units) - len(todo), workers)
    progress = Progress(total_bytes, f"prepare {root.name}", Counter(p.file.path for i in todo for p in units[i]))
    done = 0
    try:
        for index, record in _execute(todo, units, job, workers, context):
            records[index] = record
            progress.update(record["input_bytes"], record["tokens"], [p.file.path for p in units[index]])
            done += 1
            if stop_after is not None and done >= stop_after:
                raise RuntimeError(f"simulated interruption after {done} units")
    finally:
        progress.close()
    return records  # type: ignore[return-value]


def _execute(todo: list[int], units: list[list[Piece]], job: dict, workers: int, context):
    """Yield (unit index, record) as units finish; in-process when one worker suffices."""
    if workers <= 1:
        for i in todo:
            yield i, encode_unit(i, units[i], **job)
        return
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending = {pool.submit(encode_unit, i, units[i], **job): i for i in todo}
        try:
            for future in as_completed(pending):
                yield pending[future], future.result()  # a worker's DataError is raised here
        finally:
            pool.shutdown(cancel_futures=True)


def _process_context() -> multiprocessing.context.BaseContext:
    """fork when this process runs no other Python thread, else spawn.

    fork starts workers in milliseconds and works from any caller (spawn re-imports the caller's
    main module, which breaks scripts without an ``if __name__ == "__main__"`` guard), but
    forking while another thread holds a lock can deadlock the child, so threads mean spawn.
    """
    methods = multiprocessing.get_all_start_methods()
    method = "fork" if threading.active_count() == 1 and "fork" in methods else "spawn"
    return multiprocessing.get_context(method)


def _finished_record(root: Path, index: int) -> dict | None:
    path = root / "units" / f"{_unit_name(index)}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        partial = {"dtype": record["dtype"], "shards": record["shards"], "inputs": []}
        check_shard_sizes(root, partial)
        for info in record["shards"]:
            verify_shard_checksums(root, partial, info)  # reading is ~100x faster than encoding
    except (DataError, ValueError, KeyError):
        return None  # a damaged unit is redone
    return record


def _unit_name(index: int) -> str:
    return f"u{index:06d}"


def encode_unit(index: int, pieces: list[Piece], *, root: str, tokenizer: str, text_field: str,
                val_fraction: float, max_shard_tokens: int, dtype: str) -> dict:
    """Worker: tokenise one unit into shards (rolling over at ``max_shard_tokens``)."""
    tok = _worker_tokenizer(tokenizer)
    writer = _ShardWriter(Path(root), _unit_name(index), np.dtype(dtype), tok.eos_id, val_fraction, max_shard_tokens)
    bad_docs = 0
    bad_examples: list[str] = []
    batch: list[str] = []
    batch_chars = 0
    for piece in pieces:
        for text, bad in iter_documents(piece, text_field):
            if bad:
                bad_docs += 1
                if len(bad_examples) < 3 and piece.file.path not in bad_examples:
                    bad_examples.append(piece.file.path)
            batch.append(text)
            batch_chars += len(text)
            if batch_chars >= ENCODE_BATCH_CHARS:  # one sentencepiece call per batch: per-call overhead matters
                writer.add(tok.encode_arrays(batch))
                batch, batch_chars = [], 0
    writer.add(tok.encode_arrays(batch))
    shards = writer.close()
    record = {"unit": index, "dtype": dtype, "shards": shards, "input_bytes": input_bytes(pieces),
              "tokens": sum(s["tokens"] for s in shards), "docs": sum(s["docs"] for s in shards),
              "invalid_utf8_docs": bad_docs, "invalid_utf8_examples": bad_examples}
    write_json(Path(root) / "units" / f"{_unit_name(index)}.json", record)
    return record


_TOKENIZERS: dict[tuple, Tokenizer] = {}


def _worker_tokenizer(path: str) -> Tokenizer:
    # Keyed by its files' identity on disk too: a directory prepared again with another tokenizer in this
    # process (or in a worker forked from it) must not get the previous one.
    key = (path, *((s.st_ino, s.st_mtime_ns, s.st_size) for s in (f.stat() for f in tokenizer_files(path).values())))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer(path)
    return _TOKENIZERS[key]


class _ShardWriter:
    """Collects encoded documents of one unit, splitting train/val by a hash of each document."""

    def __init__(self, root: Path, unit: str, dtype: np.dtype, eos: int, val_fraction: float, cap: int) -> None:
        self.root, self.unit, self.dtype, self.eos, self.cap = root, unit, dtype, eos, cap
        self.val_threshold = int(val_fraction * 2**64)
        self.train: list[np.ndarray] = []
        self.val: list[np.ndarray] = []
        self.tokens = 0
        self.shards: list[dict] = []

    def add(self, encoded: list[np.ndarray]) -> None:
        for ids in encoded:
            doc = np.empty(ids.size + 1, dtype=self.dtype)
            doc[:-1] = ids
            doc[-1] = self.eos
            digest = hashlib.blake2b(doc.data, digest_size=8).digest()
            held_out = int.from_bytes(digest, "little") < self.val_threshold
            (self.val if held_out else self.train).append(doc)
            self.tokens += doc.size
            if self.tokens >= self.cap:
                self._flush()

    def _flush(self) -> None:
        docs = self.train + self.val
        if not docs:
            return
        offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
        np.cumsum([d.size for d in docs], out=offsets[1:])
        name = f"{self.unit}-p{len(self.shards):03d}"
        self.shards.append(write_shard(self.root, name, np.concatenate(docs), offsets, len(self.train)))
        self.train, self.val, self.tokens = [], [], 0

    def close(self) -> list[dict]:
        self._flush()
        return self.shards


def _manifest(cfg: DataConfig, key: str, fingerprint: str, tokenizer: Tokenizer, records: list[dict]) -> dict:
    shards = [s for r in records for s in r["shards"]]
    totals = {name: sum(s[name] for s in shards) for name in ("tokens", "docs", "train_tokens", "train_docs")}
    totals["val_tokens"] = totals["tokens"] - totals["train_tokens"]
    totals["val_docs"] = totals["docs"] - totals["train_docs"]
    totals["input_bytes"] = sum(r["input_bytes"] for r in records)
    totals["invalid_utf8_docs"] = sum(r["invalid_utf8_docs"] for r in records)
    return {"format": "strata-tokens", "version": FORMAT_VERSION, "key": key, "fingerprint": fingerprint,
            "inputs": list(cfg.inputs), "text_field": cfg.text_field, "val_fraction": cfg.val_fraction,
            "options": cfg.prepare_options(), "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer": tokenizer.describe(),
            "invalid_utf8_examples": [p for r in records for p in r["invalid_utf8_examples"]][:5],
            "totals": totals, "shards": shards}


def _report(root: Path, manifest: dict) -> None:
    t = manifest["totals"]
    log.info("prepared %s: %d docs, %d tokens (%d train, %d val) in %d shards",
             root, t["docs"], t["tokens"], t["train_tokens"], t["val_tokens"], len(manifest["shards"]))
    if t["invalid_utf8_docs"]:
        log.warning("%d documents had invalid UTF-8, replaced by U+FFFD (e.g. %s)",
                    t["invalid_utf8_docs"], ", ".join(manifest["invalid_utf8_examples"]))

