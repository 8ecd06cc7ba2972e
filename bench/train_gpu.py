"""End-to-end training on one GPU: the Triton kernels against the PyTorch reference path.

    python bench/train_gpu.py --config configs/hybrid-200m.yaml --steps 50

Runs the real entry point twice on the same data and init, once with STRATA_KERNELS=reference
and once with the kernels (the default on CUDA), and prints a table: the largest relative
difference of the two loss curves, and each path's median tokens/s, TFLOP/s, MFU and peak
memory over the steps after warm-up. Extra arguments are passed on as config overrides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(config: str, steps: int, backend: str, run_dir: Path, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "STRATA_KERNELS": backend, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "launcher.cli", "train", "--config", config, f"train.max_steps={steps}",
           f"train.run_dir={run_dir}", "checkpoint.every=0", f"train.eval_every={steps}",
           "logging.progress=lines", *overrides]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def summary(records: list[dict], skip: int) -> dict:
    steady = records[skip:] or records
    med = lambda key: statistics.median(r[key] for r in steady) if key in steady[0] else float("nan")
    return {"tokens/s": med("tokens_per_s"), "TFLOP/s": med("tflops_per_gpu"), "MFU %": med("mfu_percent"),
            "peak GiB": max(r["peak_memory_gib"] for r in records), "final loss": records[-1]["loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hybrid-200m.yaml")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the speed medians")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = {b: run(args.config, args.steps, b, Path(tmp) / b, args.overrides) for b in ("reference", "triton")}
    ref, tri = curves["reference"], curves["triton"]
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, tri))
    print(f"\n{args.steps} steps, {args.config}; loss curves: max relative difference {worst:.2e} "
          f"(first loss {ref[0]['loss']:.4f} vs {tri[0]['loss']:.4f})")
    print(f"| path | tokens/s | TFLOP/s | MFU % | peak GiB | final loss |\n|---|---|---|---|---|---|")
    for name, records in curves.items():
        s = summary(records, args.warmup)
        print(f"| {name} | {s['tokens/s']:.0f} | {s['TFLOP/s']:.1f} | {s['MFU %']:.1f} | {s['peak GiB']:.1f} | "
              f"{s['final loss']:.4f} |")
    print("loss per step (reference, triton):", [(round(a["loss"], 4), round(b["loss"], 4)) for a, b in zip(ref, tri)][::5])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
