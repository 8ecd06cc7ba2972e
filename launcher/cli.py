"""`strata`: the command-line entry point. Each subcommand is `main(argv) -> int` in its module
(train: `run(argv)`, which exits the process with main's code).

    strata train [--config YAML] [key=value ...]   train (or resume) a model
    strata prepare --input PATH... --out DIR       tokenize a corpus into shards
    strata export --checkpoint RUN --format hf --out DIR
    strata import --format hf --from DIR --out RUN_DIR
    strata generate --checkpoint RUN --prompt TEXT
    strata checkpoint verify RUN_OR_CKPT           check checkpoints' files against their checksums
    strata launch slurm --nodes N --gpus-per-node G --config YAML [key=value ...] [--submit]
                                                   an sbatch script that saves and requeues itself
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command: (module, its entry function)
    "train": ("launcher.train", "run"),  # leaves the process itself: see launcher/train.py:run
    "prepare": ("launcher.prepare", "main"),
    "export": ("launcher.export", "main"),
    "import": ("launcher.import_hf", "main"),
    "generate": ("launcher.generate", "main"),
    "checkpoint": ("launcher.checkpoints", "main"),
    "launch": ("launcher.launch", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the embedded default: `strata` alone trains configs/tiny.yaml
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(__doc__)
        return 0
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    raise SystemExit(main())
