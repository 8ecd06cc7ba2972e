"""Peak host memory of a resharded resume against a same-layout resume and a fresh start,
through the real entry point on CPU. Prints a markdown table (docs/PARALLEL.md).

    python bench/reshard_memory.py                          # configs/hybrid-200m.yaml, 189M
    python bench/reshard_memory.py --config configs/tiny.yaml

Runs, each in its own process, measured by the peak resident set (ru_maxrss) of that
process alone:
1. one process, 2 steps from scratch (writes a ZeRO-0 checkpoint at step 2);
2. that run resumed by one process to step 3: DeepSpeed reloads its own layout;
3. a DP2 ZeRO-1 run of 2 steps (not measured), resumed by one process to step 3: resharded.
Steps are short (seq_len 64, one sequence per rank) so that the model and its optimizer
states, not activations, set the peaks.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def overrides(config: str, data_dir: Path) -> list[str]:
    return ["--config", config, "train.seq_len=64", "train.global_batch_size=2", "parallel.micro_batch_size=1",
            "train.warmup_steps=1", "train.eval_every=0", "checkpoint.every=2", "logging.progress=lines",
            "data.inputs=[stdlib]", "data.stdlib_max_mb=0.5", "data.vocab_size=512",
            f"data.prepared_dir={data_dir}", "data.workers=1"]


def train(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "strata.launcher.cli", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=0",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "strata.launcher.train", *args]


def peak_gib(cmd: list[str]) -> float:
    """The peak resident set of `cmd`, run alone under a fresh measuring process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/hybrid-200m.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = overrides(args.config, tmp / "data")
        one, two = tmp / "one_process", tmp / "dp2_zero1"
        rows = [("fresh start, 2 steps", peak_gib(train([*base, "train.max_steps=2", f"train.run_dir={one}"]))),
                ("same-layout resume (DeepSpeed load), to step 3",
                 peak_gib(train([*base, "train.max_steps=3", f"train.run_dir={one}"])))]
        subprocess.run(train([*base, "train.max_steps=2", f"train.run_dir={two}", "parallel.zero_stage=1"], nproc=2),
                       cwd=REPO, check=True, capture_output=True)
        rows.append(("resharded resume of a DP2 ZeRO-1 checkpoint, to step 3",
                     peak_gib(train([*base, "train.max_steps=3", f"train.run_dir={two}"]))))
    print(f"config: {args.config} (seq_len 64, one sequence per rank); one process, peak RSS\n")
    print("| run | peak RSS |\n| --- | --- |")
    for name, gib in rows:
        print(f"| {name} | {gib:.2f} GiB |")


if __name__ == "__main__":
    main()
