"""The commands the suite's parts run, as lists for subprocess and as lines for the dry run, and the
bench scripts it calls into. The bottom of bench/gpu/: imports nothing of the suite."""
from __future__ import annotations

import glob
import importlib
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "bench" / "gpu_suite.py"
"""The suite's command line (the peak part runs it again, with --measure-peak)."""
KERNEL_BENCH = "bench/kernel_speed.py"
"""Strata's ops and their peers timed on the GPU (bench/kernel_peers.py, bench/kernel_timing.py)."""


def py() -> str:
    return sys.executable or "python3"


def wheel_files(args) -> list[str]:
    return sorted(glob.glob(str(Path(args.wheels) / "*.whl")))


def commands(args, corpus: str | None, vocab: int) -> dict[str, list[str]]:
    work = Path(args.work)
    kernels = [py(), KERNEL_BENCH, "--ops", args.kernel_ops, "--batch", str(args.kernel_batch)]
    cmds = {
        "setup": [py(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                  "--target", args.site, f"{args.wheels}/*.whl"],
        "tests": [py(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu.plugin",
                  "tests/kernels/test_gpu.py"],
        "warm mamba_ssm": [*kernels, "--warm-peers", "--only-peers", "mamba_ssm"],
        "warm fla, liger": [*kernels, "--warm-peers", "--only-peers", "fla,liger_kernel"],
        "peak": [py(), str(ENTRY.relative_to(REPO)), "--measure-peak", str(work / "peak.json")],
        "kernels": [*kernels, "--no-compile", "--json", str(work / "kernels.json"), "--peak-tflops", "PEAK",
                    "--hbm-tbs", "HBM"],
    }
    if corpus:  # no console script where strata is not pip-installed (the GPU machine): its module
        cmds["corpus"] = [py(), "-m", "strata.launcher.cli", "prepare", "--input", "stdlib", "--out", corpus,
                          "--vocab-size", str(vocab), "--workers", "8"]
    return cmds


def shown(cmd: list[str], env: dict | None = None) -> str:
    pre = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(c) if "*" not in c else c for c in cmd)


def load_bench(name: str):
    """bench/<name>.py as the module bench.<name> (bench/ is a namespace package of the repo root, which the
    entry script, pytest and every part's PYTHONPATH put on sys.path)."""
    return importlib.import_module(f"bench.{name}")
