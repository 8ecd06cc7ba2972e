"""`strata`: the command-line entry point (the console script in pyproject.toml).

Each command is a module with `main(argv) -> int` (train: `run(argv)`, which leaves the process
itself; see launcher/train.py:run). Before any command is imported, `quiet_third_party()`
(launcher/quiet.py) keeps third-party start-up noise off the terminal, so every command's first
line is Strata's own, and launcher/host.py sets how the process uses the CPU (OpenMP threads that
spin only briefly when idle; for `strata train` without CUDA, freed memory kept for the next
step). `strata train --help` adds the config keys (launcher/config.py:describe_keys) to train's
own usage.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

COMMANDS = {  # command: (module, its entry function, what it does, for `strata --help`)
    "train": ("strata.launcher.train", "run",  # leaves the process itself: see launcher/train.py:run
              "train a model, or resume its run where it stopped (configs/tiny.yaml by default)"),
    "config": ("strata.launcher.show_config", "main",
               "print the config a command line resolves to; --keys describes every key"),
    "prepare": ("strata.launcher.prepare", "main", "tokenize text, source files or JSONL into token shards"),
    "generate": ("strata.launcher.generate", "main", "continue a prompt with a trained run"),
    "export": ("strata.launcher.export", "main", "write a run's weights as a Hugging Face transformers model"),
    "import": ("strata.launcher.import_hf", "main", "start a run from a Hugging Face model's weights"),
    "checkpoint": ("strata.launcher.checkpoints", "main",
                   "verify a run's checkpoints against their checksums, without loading them"),
    "launch": ("strata.launcher.launch", "main",
               "write (or submit) a SLURM script that saves before its time limit and requeues itself"),
    "plan": ("strata.launcher.plan", "main",
             "which parallel layouts fit a model on N GPUs: memory per GPU, FLOPs, estimated step time"),
}

STDOUT_IS_OUTPUT = {"generate", "export", "import", "checkpoint"}
"""Commands whose stdout is their result (generated text, a summary): library logging goes to stderr."""

README = Path(__file__).resolve().parent.parent / "README.md"


def usage() -> str:
    width = max(map(len, COMMANDS))
    more = f"{README} and the docs/ folder beside it" if README.is_file() else "the README of the Strata repository"
    return "\n".join([
        "usage: strata COMMAND [options]          (no command: strata train)",
        "",
        "Strata trains hybrid Mamba2/attention language models, from one CPU to many GPUs.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()),
        "",
        "`strata COMMAND --help` shows a command's options; `strata train --help` also lists every",
        "config key, with its default and what it does.",
        "STRATA_LOG=debug shows third-party libraries' start-up logging, which Strata hides otherwise.",
        f"More: {more}.",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the embedded default: `strata` alone trains configs/tiny.yaml
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; use one of {', '.join(COMMANDS)} (`strata --help` says "
              "what each does)", file=sys.stderr)
        return 2
    from strata.launcher import host

    host.short_omp_spinning()  # before anything imports torch
    from strata.launcher.quiet import quiet_third_party

    quiet_third_party(stdout_is_output=command in STDOUT_IS_OUTPUT)
    if command == "train" and ("-h" in rest or "--help" in rest):
        return train_help()
    if command == "train":
        host.keep_freed_memory()
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest)


def train_help() -> int:
    """train's own usage (launcher/train.py:parse_args), then every config key."""
    from strata.launcher.config import describe_keys
    from strata.launcher.train import parse_args

    with contextlib.suppress(SystemExit):
        parse_args(["--help"])
    print()
    print(describe_keys())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
