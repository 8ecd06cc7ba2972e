"""``strata prepare``: tokenise text/JSONL/Parquet/Arrow inputs into a prepared corpus (see data/prepare.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from strata.data.config import DataConfig
from strata.data.errors import DataError
from strata.launcher.errors import report_and_exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata prepare", description=(
        "Tokenise text, source files, JSONL (plain, .gz, .zst), Parquet and Arrow (datasets' save_to_disk "
        "directories) into memory-mapped token shards. "
        "Re-running resumes an interrupted run, or verifies a finished one and rebuilds damaged shards."))
    p.add_argument("--input", nargs="+", metavar="PATH", default=None,
                   help="files, directories or globs; 'stdlib' is the embedded default corpus")
    p.add_argument("--out", required=True, metavar="DIR", help="directory of the prepared corpus")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default="", metavar="PATH", help="existing tokenizer to use: a sentencepiece "
                     ".model, a Hugging Face tokenizer.json, or a Hugging Face model directory holding one")
    tok.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="train a tokenizer of this size (default 4096)")
    p.add_argument("--text-field", default="text",
                   help="JSONL field / Parquet or Arrow column holding the text (default: text)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                   help=f"fraction of documents held out for validation (default {DataConfig.val_fraction})")
    p.add_argument("--shard-input-mb", type=float, default=DataConfig.shard_input_mb,
                   help="input megabytes per shard / unit of work (default 0: automatic, total/64 within [1, 64])")
    p.add_argument("--max-shard-tokens", type=int, default=DataConfig.max_shard_tokens,
                   help=f"tokens per shard at most (default {DataConfig.max_shard_tokens})")
    p.add_argument("--tokenizer-sample-mb", type=float, default=DataConfig.tokenizer_sample_mb,
                   help=f"megabytes of text the tokenizer is trained on (default {DataConfig.tokenizer_sample_mb})")
    p.add_argument("--stdlib-max-mb", type=float, default=DataConfig.stdlib_max_mb,
                   help=f"cap on the 'stdlib' input in megabytes (default {DataConfig.stdlib_max_mb})")
    p.add_argument("--force", action="store_true", help="replace a corpus prepared from other inputs or settings")
    p.add_argument("--verify", action="store_true",
                   help="with no --input: verify every shard checksum of --out and exit")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.input is None:
            if not args.verify:
                raise ValueError("nothing to do: give --input PATH... to prepare, or --verify to check --out")
            return _verify(Path(args.out))
        cfg = DataConfig(inputs=args.input, prepared_dir=args.out, vocab_size=args.vocab_size,
                         tokenizer=args.tokenizer, text_field=args.text_field, workers=args.workers,
                         val_fraction=args.val_fraction, shard_input_mb=args.shard_input_mb,
                         max_shard_tokens=args.max_shard_tokens, tokenizer_sample_mb=args.tokenizer_sample_mb,
                         stdlib_max_mb=args.stdlib_max_mb)
        from strata.data.prepare import prepare_corpus
        prepare_corpus(cfg, args.out, force=args.force)
        return 0
    except (DataError, ValueError, OSError) as exc:
        return report_and_exit_code(exc)


def _verify(root: Path) -> int:
    from strata.data.shards import check_shard_sizes, read_manifest, verify_shard_checksums
    manifest = read_manifest(root)
    check_shard_sizes(root, manifest)
    for info in manifest["shards"]:
        verify_shard_checksums(root, manifest, info)
    print(f"{root}: {len(manifest['shards'])} shards, {manifest['totals']['tokens']} tokens verified")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
