"""Prepare throughput with a Hugging Face fast tokenizer beside sentencepiece, on the same text;
prints a markdown table.

    python bench/tokenizer_speed.py [--stdlib-mb 12] [--vocab-size 4096] [--workers 1 2]

Three tokenizers of the same vocabulary size over the default corpus (the stdlib's .py files):
- sentencepiece: the unigram model `strata prepare` trains (1 MB sample), through sentencepiece;
- tokenizers unigram: that same model converted to a fast tokenizer (launcher/export.py, as
  `strata export` writes it), through the `tokenizers` library: the same pieces, the other library;
- tokenizers BPE: a byte-level BPE trained with tokenizers' BpeTrainer on the same sample, the
  kind of tokenizer.json published models ship.
For each and each worker count: raw batched encode (``Tokenizer.encode_arrays``, the call prepare
makes, one per unit of about 1 MB of documents, text in memory, tokenizer loaded) in as many forked
processes, and ``strata prepare`` end to end (reading, encoding, the split, writing and hashing
shards) with as many workers, measured alternately, best of 3. Per worker: total / workers. Both
libraries encode on the calling thread (Strata sets TOKENIZERS_PARALLELISM=false unless it is set).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata.data.config import DataConfig  # noqa: E402
from strata.data.prepare import prepare_corpus  # noqa: E402
from strata.data.shards import TOKENIZER  # noqa: E402
from strata.data.sources import iter_documents, plan_pieces, resolve_inputs  # noqa: E402
from strata.data.tokenizer import Tokenizer  # noqa: E402

REPEATS = 3
SAMPLE_MB = 1.0


def train_bpe(out: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE (GPT-2 style pre-tokenisation) with <pad> <s> </s> named in a tokenizer_config.json."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Fast(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (out / "tokenizer_config.json").write_text(json.dumps(names))
    return out / "tokenizer.json"


def converted_unigram(out: Path, sp_model: Path) -> Path:
    from strata.launcher.export import fast_tokenizer

    out.mkdir(parents=True)
    fast_tokenizer(sp_model).save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


_RAW: dict = {}


def _encode_chunk(index: int) -> int:
    if "tok" not in _RAW:
        _RAW["tok"] = Tokenizer(_RAW["tokenizer"])
    return sum(a.size for a in _RAW["tok"].encode_arrays(_RAW["chunks"][index]))


def raw_rate(tokenizer: Path, processes: int) -> float:
    """Tokens/s of Tokenizer.encode_arrays over every chunk, in ``processes`` forked processes."""
    _RAW.clear()
    _RAW.update(chunks=CHUNKS, tokenizer=str(tokenizer))
    indices = range(len(CHUNKS))
    if processes == 1:
        _encode_chunk(0)  # loaded outside the timing, as a warm worker has it
        started = time.perf_counter()
        tokens = sum(map(_encode_chunk, indices))
        return tokens / (time.perf_counter() - started)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_encode_chunk, [0] * processes))
        started = time.perf_counter()
        tokens = sum(pool.map(_encode_chunk, indices))
        return tokens / (time.perf_counter() - started)


CHUNKS: list[list[str]] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stdlib-mb", type=float, default=12.0, help="megabytes of the stdlib corpus to prepare")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strata-tokbench-"))
    base = DataConfig(inputs=["stdlib"], stdlib_max_mb=args.stdlib_mb, vocab_size=args.vocab_size,
                      tokenizer_sample_mb=SAMPLE_MB, val_fraction=0.01, workers=max(args.workers))
    trained = prepare_corpus(base, work / "trained")
    sp_model = work / "trained" / TOKENIZER
    files = resolve_inputs(base.inputs, int(args.stdlib_mb * 2**20))
    units = plan_pieces(files, 1 << 20)
    CHUNKS.extend([text for piece in unit for text, _ in iter_documents(piece, "text")] for unit in units)
    sample, size = [], 0
    for text in (t for chunk in CHUNKS[:: max(1, len(CHUNKS) // 8)] for t in chunk):  # ~1 MB spread over the corpus
        if size >= SAMPLE_MB * 2**20:
            break
        sample.append(text)
        size += len(text)
    tokenizers = [("sentencepiece unigram (sentencepiece)", sp_model),
                  ("same unigram, converted (tokenizers)", converted_unigram(work / "unigram", sp_model)),
                  ("byte-level BPE (tokenizers)", train_bpe(work / "bpe", sample, args.vocab_size))]
    input_mb = trained["totals"]["input_bytes"] / 2**20
    rows = []
    for name, path in tokenizers:
        tok = Tokenizer(path)
        single = 0.0
        for workers in args.workers:
            cfg = DataConfig(**{**vars(base), "tokenizer": str(path), "workers": workers})
            raw = prep = 0.0
            for attempt in range(REPEATS):
                raw = max(raw, raw_rate(path, workers))
                started = time.perf_counter()
                manifest = prepare_corpus(cfg, work / "prepared")
                prep = max(prep, manifest["totals"]["tokens"] / (time.perf_counter() - started))
                shutil.rmtree(work / "prepared")
            single = single or prep
            tokens = manifest["totals"]["tokens"]
            rows.append((name, tok.vocab_size, workers, f"{raw / workers:,.0f}", f"{prep / workers:,.0f}",
                         f"{100 * prep / raw:.0f}%", f"x{prep / single:.2f}",
                         f"{tokens:,} ({tokens / manifest['totals']['input_bytes']:.3f}/byte)"))
            print(f"  done: {name}, {workers} worker(s)", file=sys.stderr, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}, Python "
          f"{platform.python_version()}; {input_mb:.1f} MB of stdlib source; command: python bench/tokenizer_speed.py "
          f"{' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| tokenizer | vocab | workers | raw batched encode, tok/s per process | prepare, tok/s per worker "
          "| prepare / raw | scaling | tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
