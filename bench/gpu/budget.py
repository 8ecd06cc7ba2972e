"""The suite's time: what each part took on one H100, the assumed peak and MFU a training run is
estimated at before one is measured, the reserve kept for the table, and the dry run's budget."""
from __future__ import annotations

from bench.gpu.runs import TrainRun, global_batch

# Seconds each part took on one H100 on 2026-11-26 (docs/BENCHMARKS.md, "GPU suite"; the dry run prints them).
ESTIMATE = {
    "setup": 5,             # pip install of ten wheels (twelve since) and the mamba_ssm sources copied: 1 s
    "tests": 110,           # pytest start and about 30 Triton compilations (fp32 and bf16 variants): 109 s
    "warm mamba_ssm": 110,  # its SSD forward + backward autotunes ~120 configurations, each compiled once: 104 s
    "warm fla, liger": 60,  # fla refuses its gated kernels on Triton 3.4-3.7.0 on Hopper (its own check)
    "corpus": 20,           # a 32768-piece sentencepiece model on 2 MB, then 12 MB tokenised: 17 s
    "peak": 8,              # 6 s
    "kernels": 80,          # Strata's ops (with the fp32 error checks) and the peers from a warm cache: 72 s
    "train start": 42,      # python, torch, DeepSpeed, the model built and moved, the first step's compilations
}
ASSUMED_PEAK_TFLOPS = 740.0  # an H100's measured bf16 8192^3 matmul (2026-11-26); replaced by the measured one
# Measured on that H100 (hybrid-1b3, recompute none / selective): Triton 32% / 20%, reference (selective) 9%.
ASSUMED_MFU = {"triton": 0.45, "reference": 0.09}  # for the estimate only (H100, 2026-11-26: Triton at micro-batch 4)
RESERVE_S = 8  # kept at the end of the budget for the table
H100_GIB = 79.6  # an H100 80GB's memory as torch sees it: the dry run's budget leaves out runs the plan says do not fit


def step_seconds(args, run: TrainRun, peak_tflops: float, measured: dict[str, float]) -> float:
    """A step's expected time: measured on this machine for this backend if a run has finished,
    else its FLOPs at an assumed share of the peak."""
    if run.backend in measured:
        return measured[run.backend]
    tokens = global_batch(args) * args.seq_len
    return tokens * run.flops_per_token / (ASSUMED_MFU.get(run.backend, 0.1) * peak_tflops * 1e12)


def run_estimate(args, run: TrainRun, peak_tflops: float, measured: dict[str, float]) -> float:
    return ESTIMATE["train start"] + run.steps * step_seconds(args, run, peak_tflops, measured)


def print_budget(args, runs: list[TrainRun]) -> float:
    rows = []
    if "setup" in args.parts:
        rows.append(("setup", ESTIMATE["setup"]))
    side = {"tests": "tests" in args.parts, "warm peers": "kernels" in args.parts, "corpus": "train" in args.parts}
    seconds = {"tests": ESTIMATE["tests"], "corpus": ESTIMATE["corpus"],
               "warm peers": max(ESTIMATE["warm mamba_ssm"], ESTIMATE["warm fla, liger"])}
    if any(side.values()):  # as Suite.side_by_side runs them
        rows.append((" | ".join(k for k, run in side.items() if run) + ", side by side",
                     max(seconds[k] for k, run in side.items() if run)))
    if "peak" in args.parts:
        rows.append(("peak", ESTIMATE["peak"]))
    if "kernels" in args.parts:
        rows.append(("kernels", ESTIMATE["kernels"]))
    if "train" in args.parts:
        for run in runs:
            s = step_seconds(args, run, ASSUMED_PEAK_TFLOPS, {})
            if run.planned_gib is not None and run.planned_gib > H100_GIB:
                rows.append((f"train {run.name}: left out on an H100 (plan {run.planned_gib:.1f} GiB)", 0))
                continue
            rows.append((f"train {run.name}: start {ESTIMATE['train start']} s + {run.steps} x {s:.2f} s",
                         run_estimate(args, run, ASSUMED_PEAK_TFLOPS, {})))
    total = sum(t for _, t in rows)
    for name, t in rows:
        print(f"  {t:5.0f} s  {name}")
    print(f"  {total:5.0f} s  total, of a {args.budget:.0f} s budget (the device call: timeout_s "
          f"{int(args.budget) + 40}; the machine's start comes on top)")
    return total
