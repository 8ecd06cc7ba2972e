"""The suite's command line (bench/gpu_suite.py): its arguments, the run of the parts in order under one
deadline, and main, which sends the dry run, the peak part's own process and the run their ways."""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench.gpu.commands import KERNEL_BENCH, REPO
from bench.gpu.dry_run import dry_run
from bench.gpu.part_peak import measure_peak
from bench.gpu.part_setup import importable_strata, link_strata
from bench.gpu.runs import corpus_dir, plan_runs, train_runs
from bench.gpu.suite import Suite

PARTS = ("setup", "tests", "peak", "kernels", "train")
FP8_RECIPES = ("tensorwise", "rowwise")
"""train.fp8's recipes (strata.kernels.fp8.recipe.RECIPES; strata is importable only once the suite links it)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_suite.py", description=sys.modules["bench.gpu"].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="check every step on CPU, print commands and budget")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to run (default: all)")
    p.add_argument("--budget", type=float, default=440, help="seconds for the whole suite (default 440)")
    p.add_argument("--config", default="configs/hybrid-1b3.yaml", help="the training part's config")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each Triton training run (default 30)")
    p.add_argument("--ref-steps", type=int, default=12,
                   help="optimizer steps of each reference-path run (default 12; the loss curves are "
                        "compared over the steps both made)")
    p.add_argument("--micro-batch", type=int, default=4,
                   help="sequences per micro-batch of the Triton runs (default 4: hybrid-1b3 at 45%% MFU on an "
                        "H100, 2026-11-26; the plan puts it at 64 GiB)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--ref-micro-batch", type=int, default=1,
                   help="sequences per micro-batch of the reference-path runs, accumulated to the same global "
                        "batch (default 1: the reference's activations are larger)")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of the speed medians")
    p.add_argument("--recompute", default="none,selective", help="train.recompute modes (default none,selective)")
    p.add_argument("--backends", default="triton,reference", help="kernel paths (default triton,reference)")
    p.add_argument("--no-profile", action="store_true",
                   help="do not profile three steps of each Triton run (bench/profile_steps.py, $OUT/profile-*.md)")
    p.add_argument("--no-packed", action="store_true",
                   help="leave out the run with data.doc_boundaries=true (the cost of keeping documents apart)")
    p.add_argument("--bf16-params", action="store_true",
                   help="add the Triton run without recompute with train.param_dtype=bf16 (DeepSpeed's bf16 mode): "
                        "its tokens/s and memory against fp32 parameters (about 55 s more than the 440 s budget)")
    p.add_argument("--fp8", default="", help="train.fp8 recipes (tensorwise, rowwise) each run beside the Triton "
                   "run without recompute: tokens/s and loss curves against it (default none)")
    p.add_argument("--kernel-ops", default="ssd,norm,ce", help=f"{KERNEL_BENCH} --ops (default ssd,norm,ce)")
    p.add_argument("--kernel-batch", type=int, default=8, help=f"{KERNEL_BENCH} --batch (default 8, x 4096)")
    p.add_argument("--wheels", default=".whl", help="the wheel folder ../shared/gpu/wheels.sh filled (default .whl)")
    p.add_argument("--site", default="/tmp/site", help="where the wheels are installed and strata linked "
                                                       "(default /tmp/site)")
    p.add_argument("--work", default="/tmp/gpu_suite", help="logs, corpus and run directories (default /tmp/gpu_suite)")
    p.add_argument("--out", default=os.environ.get("OUT") or "", help="where the table goes (default $OUT, else "
                                                                      "runs/gpu_suite)")
    p.add_argument("--measure-peak", metavar="JSON", help=argparse.SUPPRESS)  # the peak part's own process
    p.add_argument("overrides", nargs="*", help="config overrides for every training run")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    args.fp8 = [x for x in args.fp8.split(",") if x]
    for recipe in args.fp8:
        if recipe not in FP8_RECIPES:
            p.error(f"--fp8: {recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    if (args.micro_batch * args.accumulation) % args.ref_micro_batch:
        p.error(f"--ref-micro-batch {args.ref_micro_batch} does not divide the global batch "
                f"{args.micro_batch * args.accumulation} (--micro-batch x --accumulation)")
    for name in args.parts:
        if name not in PARTS:
            p.error(f"--parts: {name!r} is not one of {', '.join(PARTS)}")
    return args


def run_suite(args) -> int:
    from strata.launcher.config import load_config  # like the plan, imports no package the wheels bring

    # every part's process (bench/train_gpu.py's runs too) finds the installed wheels, strata through the
    # site's links (no pip install there) and bench.* in the repo
    link_strata(args.site)
    os.environ["PYTHONPATH"] = os.pathsep.join([args.site, str(REPO)])
    suite = Suite(args)
    suite.logs.mkdir(parents=True, exist_ok=True)
    (suite.out / "gpu_suite.log").unlink(missing_ok=True)
    cfg = load_config(REPO / args.config, args.overrides)
    args.seq_len = cfg.train.seq_len
    corpus = corpus_dir(args, cfg)
    runs = train_runs(args, corpus)
    plan_runs(args, runs)
    suite.say(f"GPU suite, budget {args.budget:.0f} s; parts {','.join(args.parts)}; "
              f"{len(runs)} training runs of {args.config}")
    if "setup" in args.parts:
        suite.setup()
    suite.side_by_side(cfg, corpus)
    peak = suite.peak() if "peak" in args.parts else {}
    if "kernels" in args.parts:
        if suite.left() > 30:
            suite.kernels(peak)
        else:
            suite.row("kernels", args.kernel_ops, KERNEL_BENCH, note="not run: the budget is spent")
    if "train" in args.parts:
        suite.train(peak, runs)
    suite.row("suite", "wall time", "", f"{time.time() - suite.t0:.0f} s", note=f"budget {args.budget:.0f} s; " +
              ", ".join(f"{k} {v:.0f} s" for k, v in suite.times.items()))
    print()
    print(suite.header())
    print(suite.table())
    print(f"\nwritten: {suite.out / 'gpu_suite.md'}, gpu_suite.json, gpu_suite.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.measure_peak:
        return measure_peak(args.measure_peak)
    config = REPO / args.config
    if not config.is_file():
        print(f"gpu_suite: config file {args.config} not found (relative to {REPO}); pass an existing YAML, e.g. "
              "configs/hybrid-1b3.yaml", file=sys.stderr)
        return 2
    importable_strata(args.site)  # the GPU machine has no install of this checkout
    from strata.launcher.config import ConfigError
    try:
        if args.dry_run:
            return dry_run(args)
        import torch
        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA GPU here; use --dry-run to check the suite on CPU", file=sys.stderr)
            return 2
        return run_suite(args)
    except ConfigError as e:
        print(f"gpu_suite: {args.config}: {e}", file=sys.stderr)
        return 2
