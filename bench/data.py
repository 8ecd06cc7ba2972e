"""Benchmark of the data pipeline; prints a markdown table.

    python bench/data.py [--stdlib-mb 12] [--workers 1 2] [--startup-tokens 1e9]

Measures, in one run on the same text:
1. prepare throughput in tokens/s per worker, against raw sentencepiece encoding of the same
   documents by as many processes (one thread each; model loaded, text in memory): the goal
   is >= 85% of raw per worker, and throughput scaling with workers;
2. dataset start-up (ensure_prepared fast path, open_corpus, TrainLoader, first batch) on a
   synthetic manifest of >= 10^9 tokens made of sparse shard files (goal < 1 s);
3. TrainLoader samples/s, and the share of a simulated training step spent waiting on data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata.data.config import FORMAT_VERSION  # noqa: E402
from strata.data.config import DataConfig  # noqa: E402
from strata.data.corpus import open_corpus
from strata.data.loader import TrainLoader
from strata.data.prepare import ensure_prepared, prepare_corpus
from strata.data.shards import MANIFEST, TOKENIZER  # noqa: E402
from strata.data.sources import iter_documents, plan_pieces, resolve_inputs, stdlib_files  # noqa: E402
from strata.data.tokenizer import Tokenizer  # noqa: E402

REPEATS = 3


def bench_prepare(work: Path, stdlib_mb: float, worker_counts: list[int], inputs: list[str]) -> tuple[list[tuple], Path]:
    """Prepare vs raw sentencepiece with the same number of processes, measured alternately
    (best of REPEATS), so machine load and how well the machine scales affect both alike."""
    base = DataConfig(inputs=inputs, stdlib_max_mb=stdlib_mb, vocab_size=4096, tokenizer_sample_mb=1.0, val_fraction=0.01)
    started = time.perf_counter()
    trained = prepare_corpus(DataConfig(**{**vars(base), "workers": max(worker_counts)}), work / "trained")
    rows = [("prepare from scratch incl. tokenizer training (1 MB sample)", f"{time.perf_counter() - started:.1f} s",
             f"{trained['totals']['input_bytes'] / 2**20:.1f} MB, {trained['totals']['tokens']:,} tokens, "
             f"{len(trained['shards'])} shards")]
    tokenizer = work / "trained" / TOKENIZER
    _load_raw_texts(inputs, stdlib_mb, str(tokenizer), trained["totals"]["input_bytes"] // 64)
    single_raw = single_prep = 0.0
    for workers in worker_counts:
        cfg = DataConfig(**{**vars(base), "tokenizer": str(tokenizer), "workers": workers})
        raw = prep = 0.0
        for attempt in range(REPEATS):
            raw = max(raw, raw_encode_rate(workers))
            started = time.perf_counter()
            tokens = prepare_corpus(cfg, work / f"w{workers}-{attempt}")["totals"]["tokens"]
            prep = max(prep, tokens / (time.perf_counter() - started))
        single_raw, single_prep = single_raw or raw, single_prep or prep
        rows.append((f"raw sentencepiece encode, {workers} process(es), same text",
                     f"{raw:,.0f} tok/s ({raw / workers:,.0f} per process)", f"x{raw / single_raw:.2f} of 1 process"))
        rows.append((f"prepare, {workers} worker(s), end to end", f"{prep:,.0f} tok/s ({prep / workers:,.0f} per worker)",
                     f"{100 * prep / raw:.0f}% of raw per worker; x{prep / single_prep:.2f} of 1 worker"))
    return rows, work / "trained"


_RAW: dict = {}


def _load_raw_texts(inputs: list[str], stdlib_mb: float, tokenizer: str, chunk_bytes: int) -> None:
    """Read the same documents once, in chunks like prepare's units, for forked raw encoders."""
    files = resolve_inputs(inputs, int(stdlib_mb * 2**20))
    chunks = [[text for piece in unit for text, _ in iter_documents(piece, "text")]
              for unit in plan_pieces(files, max(chunk_bytes, 1 << 20))]
    _RAW.update(chunks=chunks, tokenizer=tokenizer)


def _raw_encode_chunk(index: int) -> int:
    if "tok" not in _RAW:
        _RAW["tok"] = Tokenizer(_RAW["tokenizer"])
    return sum(map(len, _RAW["tok"].sp.encode(_RAW["chunks"][index], num_threads=1, return_type="numpy")))


def raw_encode_rate(processes: int) -> float:
    """Tokens/s of bare sentencepiece encode over all chunks, in ``processes`` forked processes."""
    indices = range(len(_RAW["chunks"]))
    if processes == 1:
        _raw_encode_chunk(0)  # load the model outside the timing, as a warm worker has it
        started = time.perf_counter()
        tokens = sum(map(_raw_encode_chunk, indices))
        return tokens / (time.perf_counter() - started)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_raw_encode_chunk, [0] * processes))  # start and warm the processes
        started = time.perf_counter()
        tokens = sum(pool.map(_raw_encode_chunk, indices))
        return tokens / (time.perf_counter() - started)


def copy_stdlib(out: Path, stdlib_mb: float, copies: int) -> Path:
    """``copies`` copies of the default corpus's files, for a long enough measurement."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(int(stdlib_mb * 2**20)):
        data = Path(path).read_bytes()
        for k in range(copies):
            target = out / f"copy{k}" / Path(path).relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return out


def synthetic_corpus(root: Path, tokenizer: Path, total_tokens: int, shard_tokens: int) -> DataConfig:
    """Sparse all-zero shards (no disk use) with a real manifest, one document per shard."""
    (root / "shards").mkdir(parents=True)
    (root / TOKENIZER).write_bytes(tokenizer.read_bytes())
    tok = Tokenizer(root / TOKENIZER)
    zeros_sha = hashlib.sha256(bytes(2 * shard_tokens)).hexdigest()
    index = np.array([0, shard_tokens], dtype=np.uint64).tobytes()
    shards = []
    for i in range(-(-total_tokens // shard_tokens)):
        name = f"u{i:06d}-p000"
        with open(root / "shards" / f"{name}.tok", "wb") as f:
            f.truncate(2 * shard_tokens)
        (root / "shards" / f"{name}.idx").write_bytes(index)
        shards.append({"name": name, "tokens": shard_tokens, "docs": 1, "train_tokens": shard_tokens, "train_docs": 1,
                       "tokens_sha256": zeros_sha, "index_sha256": hashlib.sha256(index).hexdigest()})
    cfg = DataConfig(prepared_dir=str(root))
    manifest = {"format": "strata-tokens", "version": FORMAT_VERSION, "key": cfg.prepare_key(), "fingerprint": "",
                "inputs": ["synthetic"], "dtype": "uint16", "tokenizer": tok.describe(), "shards": shards,
                "totals": {"tokens": len(shards) * shard_tokens}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return cfg


def bench_startup(work: Path, tokenizer: Path, total_tokens: int, shard_tokens: int) -> list[tuple]:
    cfg = synthetic_corpus(work / "synthetic", tokenizer, total_tokens, shard_tokens)
    n_shards = -(-total_tokens // shard_tokens)
    t0 = time.perf_counter()
    ensure_prepared(cfg)
    t1 = time.perf_counter()
    corpus = open_corpus(cfg)
    t2 = time.perf_counter()
    loader = TrainLoader(corpus, cfg, 2048, 8, 0, 1, seed=0)
    next(loader)
    t3 = time.perf_counter()
    loader.close()
    label = f"{corpus.train[0].total_tokens:,} tokens, {n_shards} shards"
    return [("start-up: ensure_prepared (complete corpus)", f"{t1 - t0:.3f} s", label),
            ("start-up: open_corpus", f"{t2 - t1:.3f} s", "sizes checked, no token read"),
            ("start-up: TrainLoader + first batch (8x2048)", f"{t3 - t2:.3f} s", "lazy sha256 of the shards touched"),
            ("start-up: total", f"{t3 - t0:.3f} s", "goal < 1 s")]


def bench_loader(prepared: Path, seconds: float = 3.0) -> list[tuple]:
    cfg = DataConfig(prepared_dir=str(prepared), doc_boundaries=True)
    corpus = open_corpus(cfg)
    rows = []
    for seq_len, mb in ((2048, 8), (256, 32)):
        loader = TrainLoader(corpus, cfg, seq_len, mb, 0, 1, seed=0)
        next(loader)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            next(loader)
            count += mb
        rate = count / (time.perf_counter() - started)
        loader.close()
        rows.append((f"loader, seq_len {seq_len}, micro-batch {mb}, doc boundaries", f"{rate:,.0f} samples/s",
                     f"{rate * seq_len:,.0f} tok/s"))
    loader = TrainLoader(corpus, cfg, 2048, 8, 0, 1, seed=0)
    next(loader)
    waited = stepped = 0.0
    for _ in range(100):
        started = time.perf_counter()
        next(loader)
        waited += loader.last_wait_s
        time.sleep(0.01)  # a 10 ms training step
        stepped += time.perf_counter() - started
    loader.close()
    rows.append(("loader wait share of a 10 ms step (last_wait_s)", f"{100 * waited / stepped:.2f}%",
                 f"{1000 * waited / 100:.3f} ms/step"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", default=None,
                        help="text to prepare (default: --copies copies of the stdlib corpus in a temp dir)")
    parser.add_argument("--copies", type=int, default=3, help="copies of the stdlib corpus (fixed costs amortise)")
    parser.add_argument("--stdlib-mb", type=float, default=16.0, help="cap of the stdlib corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--startup-tokens", type=float, default=1e9)
    parser.add_argument("--shard-tokens", type=int, default=1_400_000, help="about one 4 MB input unit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        work = Path(tmp)
        inputs = args.input or [str(copy_stdlib(work / "text", args.stdlib_mb, args.copies))]
        rows, prepared = bench_prepare(work, args.stdlib_mb, args.workers, inputs)
        rows += bench_startup(work, prepared / TOKENIZER, int(args.startup_tokens), args.shard_tokens)
        rows += bench_loader(prepared)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"Python {platform.python_version()}; command: python bench/data.py {' '.join(sys.argv[1:])}".rstrip())
    print("\n| measurement | result | note |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
