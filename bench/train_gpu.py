"""End-to-end training on one GPU: the Triton kernels against the PyTorch reference path.

    python bench/train_gpu.py --config configs/hybrid-200m.yaml --steps 50
    python bench/train_gpu.py --config configs/hybrid-1b3.yaml --steps 50 --no-save train.recompute=selective

Runs the real entry point twice on the same data and init, once with STRATA_KERNELS=reference
and once with the kernels (the default on CUDA), and prints a table: the largest relative
difference of the two loss curves, and each path's median tokens/s, TFLOP/s, MFU and peak
memory over the steps after warm-up. Extra arguments are passed on as config overrides.
--no-save skips the checkpoint a run writes at its last step (21 GB with the optimizer state for
hybrid-1b3), which only costs time here: the run goes through `strata train` with
launcher.train.save replaced by a no-op. bench/gpu_suite.py calls run_with_status, summary and
max_relative_difference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# `strata train` with the checkpoint writes turned off (launcher.train.train calls the module's `save`),
# and a few steps profiled when STRATA_PROFILE_STEPS / STRATA_PROFILE_OUT ask (bench/profile_steps.py).
NO_SAVE_ENTRY = ("import sys; import strata.launcher.train as t; t.save = lambda run: None; "
                 "import bench.profile_steps as p; p.install_from_env(t); "
                 "from strata.launcher.cli import main; raise SystemExit(main(sys.argv[1:]))")


def train_command(config: str, steps: int, run_dir: Path, overrides: list[str], save: bool = True) -> list[str]:
    entry = ["-m", "strata.launcher.cli"] if save else ["-c", NO_SAVE_ENTRY]
    return [sys.executable, *entry, "train", "--config", config, f"train.max_steps={steps}",
            f"train.run_dir={run_dir}", "checkpoint.every=0", f"train.eval_every={steps}",
            "logging.progress=lines", *overrides]


def read_records(run_dir: Path) -> list[dict]:
    from strata.launcher.metrics import read_record

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(read_record(line))
        except ValueError:
            pass  # a line torn by a kill
    return records


def profile_env(profile: tuple[int, int, Path] | None) -> dict[str, str]:
    """The environment that has NO_SAVE_ENTRY profile steps [first, end) into path
    (bench/profile_steps.py install_from_env); none for None."""
    if profile is None:
        return {}
    first, end, path = profile
    return {"STRATA_PROFILE_STEPS": f"{first}:{end}", "STRATA_PROFILE_OUT": str(path)}


def run_with_status(config: str, steps: int, backend: str, run_dir: Path, overrides: list[str], save: bool = True,
                    timeout: float | None = None, log=None, profile: tuple[int, int, Path] | None = None
                    ) -> tuple[list[dict], str]:
    """The train records of one run (metrics.jsonl, kind 'train') and how it ended: 'ok', 'exit
    code N' or 'stopped after T s'. A failed or stopped run returns the steps it recorded.
    profile: (first, end, path): steps [first, end) profiled into path (bench/profile_steps.py;
    only without saving, through NO_SAVE_ENTRY)."""
    env = {**os.environ, "STRATA_KERNELS": backend, "PYTHONUNBUFFERED": "1", **profile_env(profile)}
    cmd = train_command(config, steps, run_dir, overrides, save)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                              timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"stopped after {timeout:.0f} s"
    return [r for r in read_records(run_dir) if r.get("kind") == "train"], status


def run(config: str, steps: int, backend: str, run_dir: Path, overrides: list[str], save: bool = True) -> list[dict]:
    records, status = run_with_status(config, steps, backend, run_dir, overrides, save)
    if status != "ok" or not records:
        raise SystemExit(f"bench/train_gpu.py: the {backend} run failed ({status or 'no steps recorded'})")
    return records


def summary(records: list[dict], skip: int) -> dict:
    steady = records[skip:] or records
    med = lambda key: statistics.median(r[key] for r in steady) if key in steady[0] else float("nan")
    return {"tokens/s": med("tokens_per_s"), "TFLOP/s": med("tflops_per_gpu"), "MFU %": med("mfu_percent"),
            "step s": med("step_time_s"), "peak GiB": max(r["peak_memory_gib"] for r in records),
            "final loss": records[-1]["loss"], "steps": len(records)}


def max_relative_difference(a: list[dict], b: list[dict]) -> float:
    """The largest |loss_a - loss_b| / |loss_a| over the steps both runs recorded."""
    pairs = list(zip(a, b))
    return max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in pairs) if pairs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hybrid-200m.yaml")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the speed medians")
    p.add_argument("--no-save", dest="save", action="store_false", help="skip the checkpoint at the last step")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = {b: run(args.config, args.steps, b, Path(tmp) / b, args.overrides, args.save)
                  for b in ("reference", "triton")}
    ref, tri = curves["reference"], curves["triton"]
    worst = max_relative_difference(ref, tri)
    print(f"\n{args.steps} steps, {args.config}; loss curves: max relative difference {worst:.2e} "
          f"(first loss {ref[0]['loss']:.4f} vs {tri[0]['loss']:.4f})")
    print("| path | tokens/s | TFLOP/s | MFU % | peak GiB | final loss |\n|---|---|---|---|---|---|")
    for name, records in curves.items():
        s = summary(records, args.warmup)
        print(f"| {name} | {s['tokens/s']:.0f} | {s['TFLOP/s']:.1f} | {s['MFU %']:.1f} | {s['peak GiB']:.1f} | "
              f"{s['final loss']:.4f} |")
    print("loss per step (reference, triton):",
          [(round(a["loss"], 4), round(b["loss"], 4)) for a, b in zip(ref, tri)][::5])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
