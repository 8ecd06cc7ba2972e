"""What activation recompute costs the host: milliseconds per forward and backward of a model
whose compute is negligible (24 blocks of every kind at d_model 64, 32 tokens), so the time is
what a launch-bound step pays in Python and op dispatch. Strata's recompute region
(model/recompute.py) beside torch.utils.checkpoint, non-reentrant (the peer), in the same run.
Prints a markdown table (docs/BENCHMARKS.md).

    python bench/recompute_speed.py                  # the CPU kernels (kernels/*/cpu.py)
    python bench/recompute_speed.py --kernels reference

One thread, fp32 on CPU; each row is the median of --repeats rounds of --steps steps after a
warm-up, the rows interleaved round by round so that a busy machine slows them alike. The
recomputed cores' own ops run once more in the backward whatever the region's mechanism: the
"over none" column is that plus the mechanism's overhead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PATTERN = "M*-M-M-M*-M-M-M*-M-M-M*-"


def small_model():
    from strata.model.config import ModelConfig
    from strata.model.hybrid import HybridLM

    cfg = ModelConfig(pattern=PATTERN, d_model=64, vocab_size=128, max_seq_len=32)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 16, 16, 2, 8
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    cfg.mlp.d_ff = 128
    cfg.validate()
    torch.manual_seed(0)
    return HybridLM(cfg), torch.randint(0, cfg.vocab_size, (1, 32))


def timed_steps(model, ids, steps: int) -> tuple[float, float]:
    """Seconds per step in the forward (to the loss) and in the backward."""
    fwd = bwd = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(ids).float().pow(2).mean()
        t1 = time.perf_counter()
        loss.backward()
        fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
    return fwd / steps, bwd / steps


def torch_checkpoint_region(fn, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", choices=("cpu", "reference"), default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ["STRATA_KERNELS"] = args.kernels
    torch.set_num_threads(1)
    import strata.model.recompute as recompute
    from strata.parallel.engine.parallelize import apply_recompute

    model, ids = small_model()
    ours = recompute._region
    rows = {("none", "-"): None}
    for mode in ("selective", "full"):
        rows[(mode, "Strata region")] = ours
        rows[(mode, "torch.utils.checkpoint")] = torch_checkpoint_region
    times = {row: [] for row in rows}
    for round_ in range(args.repeats + 1):
        for (mode, name), region in rows.items():
            apply_recompute(model, [mode] * len(PATTERN))
            recompute._region = region or ours
            result = timed_steps(model, ids, args.steps)
            if round_:  # the first round warms up
                times[(mode, name)].append(result)
    recompute._region = ours
    median = {row: tuple(statistics.median(t[i] for t in ts) * 1e3 for i in (0, 1)) for row, ts in times.items()}
    base = sum(median[("none", "-")])
    print(f"{len(PATTERN)} blocks ({PATTERN}), d_model 64, 32 tokens, fp32, {args.kernels} kernels, 1 thread; "
          f"median of {args.repeats} x {args.steps} steps\n")
    print("| recompute | region | forward ms | backward ms | step ms | over none ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for (mode, name), (f, b) in median.items():
        over = "" if mode == "none" else f"{f + b - base:+.1f}"
        print(f"| {mode} | {name} | {f:.1f} | {b:.1f} | {f + b:.1f} | {over} |")


if __name__ == "__main__":
    main()
