"""Prepare throughput of the same documents as JSONL, Parquet and a `datasets` save_to_disk
directory (Arrow); prints a markdown table.

    python bench/parquet_speed.py [--copies 3] [--stdlib-mb 16] [--workers 1 2] [--repeats 3]

The documents are ``--copies`` copies of the default stdlib corpus (one document per file). Each
format is prepared with the same tokenizer (trained once), the same settings and automatic unit
sizes, best of ``--repeats``, formats alternating within each repeat so machine load affects them
alike; no validation split, so that the token streams can be checked equal. "read" is iterating
every document of every unit in this process, no tokenising: the cost of the format alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata.data.config import DataConfig  # noqa: E402
from strata.data.corpus import open_corpus  # noqa: E402
from strata.data.prepare import _unit_bytes, prepare_corpus  # noqa: E402
from strata.data.shards import TOKENIZER  # noqa: E402
from strata.data.sources import iter_documents, plan_pieces, resolve_inputs, stdlib_files  # noqa: E402

PARQUET_ROWS = 256     # rows per Parquet row group (about 4 MB of text here, 1.3 MB compressed)
ARROW_ROWS = 1000      # rows per record batch, as datasets writes them (config.DEFAULT_MAX_BATCH_SIZE)


def write_inputs(work: Path, docs: list[str]) -> dict[str, Path]:
    jsonl = work / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    parquet = work / "parquet"
    parquet.mkdir()
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):  # snappy, pyarrow's default, as most of the hub
        pq.write_table(pa.table({"text": part}), parquet / f"train-{i:05d}-of-00002.parquet",
                       row_group_size=PARQUET_ROWS)
    saved = work / "saved"
    saved.mkdir()
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(docs), ARROW_ROWS):
            writer.write_batch(pa.record_batch([pa.array(docs[start:start + ARROW_ROWS], pa.string())], schema=schema))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    return {"JSONL": jsonl, "Parquet (snappy)": parquet, "Arrow (save_to_disk)": saved}


def read_rate(path: Path) -> tuple[float, int]:
    """Documents read per second and characters, iterating every unit in this process."""
    cfg = DataConfig(inputs=[str(path)])
    files = resolve_inputs(cfg.inputs, 0)
    started = time.perf_counter()
    chars = sum(len(text) for unit in plan_pieces(files, _unit_bytes(cfg, files))
                for piece in unit for text, _ in iter_documents(piece, "text"))
    return chars / (time.perf_counter() - started), len(plan_pieces(files, _unit_bytes(cfg, files)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--stdlib-mb", type=float, default=16.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    docs = [text for text in (Path(p).read_text(encoding="utf-8", errors="replace")
                              for p in stdlib_files(int(args.stdlib_mb * 2**20))) if text] * args.copies
    rows = []
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        work = Path(tmp)
        inputs = write_inputs(work, docs)
        first = prepare_corpus(DataConfig(inputs=[str(inputs["JSONL"])], vocab_size=4096, tokenizer_sample_mb=1.0,
                                          val_fraction=0.0,
                                          prepared_dir=str(work / "trained")))
        tokenizer = str(work / "trained" / TOKENIZER)
        best: dict[tuple[str, int], float] = {}
        streams = {}
        for attempt in range(args.repeats):
            for workers in args.workers:
                for k, (name, path) in enumerate(inputs.items()):
                    cfg = DataConfig(inputs=[str(path)], tokenizer=tokenizer, workers=workers, val_fraction=0.0,
                                     prepared_dir=str(work / f"f{k}-w{workers}-{attempt}"))
                    started = time.perf_counter()
                    prepare_corpus(cfg)
                    best[name, workers] = min(best.get((name, workers), 1e9), time.perf_counter() - started)
                    if name not in streams:  # no validation split: the token stream is the documents in order
                        streams[name] = b"".join(s.tokens[:].tobytes() for s in open_corpus(cfg).shards[0])
        assert len(set(streams.values())) == 1, "the formats gave different tokens"
        tokens = first["totals"]["tokens"]
        reads = {name: read_rate(path) for name, path in inputs.items()}
        for name, path in inputs.items():
            size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
            for workers in args.workers:
                seconds = best[name, workers]
                base = best["JSONL", workers]
                rows.append((name, f"{size / 2**20:.1f} MB, {reads[name][1]} units", str(workers), f"{seconds:.2f} s",
                             f"{tokens / seconds:,.0f}", f"x{base / seconds:.2f}",
                             f"{reads[name][0] / 2**20:,.0f} M chars/s"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"Python {platform.python_version()}, pyarrow {pa.__version__}; {len(docs)} documents, "
          f"{sum(map(len, docs)) / 2**20:.1f} M characters, {tokens:,} tokens; "
          f"command: python bench/parquet_speed.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"\n| input | on disk | workers | prepare (best of {args.repeats}) | tokens/s | vs JSONL "
          "| read only, 1 process |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
