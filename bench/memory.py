"""The memory plan against the real training step on CPU: predicted and measured peak per rank for
(config, layout, recompute) cases. Prints a markdown table (docs/BENCHMARKS.md).

    python bench/memory.py                       # every case; about 3 minutes on 2 cores
    python bench/memory.py --cases none selective

Each case runs in fresh processes (torchrun for 2 ranks): launcher/train.py's own setup() and
train_step() on a small prepared stdlib corpus (fp32, the PyTorch reference kernels, gloo), for three
optimizer steps. Measured: torch's CPU allocations, every allocation and free of c10's CPU allocator
recorded by the profiler (profile_memory) from before the model is built, as a running total; the
peak of steps 2 and 3 (AdamW's states exist by then), and the total held when that step began.
Predicted: parallel/plan.py for the same config, layout and rank (its pipeline stage), the one
`strata plan` and the training log use. The step delta (peak - held at the step's start) isolates
activations, transients and the gradients made: recompute shows there.

DeepSpeed's reduce bucket (reduce_bucket_size: 5e8 fp32 elements, or the rank's parameters where
fewer: parallel/plan.py reduce_bucket_elements) is allocated whole: at ZeRO 1-2 in every step (the delta columns leave it out), at ZeRO-3 once at start. The TP and PP cases on gloo
keep a few of the previous step's collective and pipe buffers alive into the next step (held when
it begins, so the peaks differ more than the deltas); the plan does not count them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMALL = ["model.pattern=M-*-", "model.d_model=128", "model.mamba.headdim=32", "model.mamba.d_state=32",
         "model.mamba.ngroups=2", "model.mamba.chunk_size=32", "model.attention.n_heads=4",
         "model.attention.n_kv_heads=2", "train.seq_len=256", "parallel.micro_batch_size=2",
         "train.warmup_steps=1", "train.eval_every=0", "checkpoint.every=0", "logging.tensorboard=false",
         "logging.progress=lines", "data.inputs=[stdlib]", "data.stdlib_max_mb=0.5", "data.vocab_size=512",
         "data.val_fraction=0.05", "data.workers=1"]

CASES = {  # name: (ranks, overrides on top of SMALL, what it shows)
    "none": (1, ["train.global_batch_size=2"], "1 rank, recompute none"),
    "selective": (1, ["train.global_batch_size=2", "train.recompute=selective"], "1 rank, recompute selective"),
    "full": (1, ["train.global_batch_size=2", "train.recompute=full"], "1 rank, recompute full"),
    "seq512": (1, ["train.global_batch_size=2", "train.seq_len=512"], "1 rank, seq_len 512"),
    "relu2-mha-accum": (1, ["train.global_batch_size=4", "model.mlp.activation=relu2", "model.attention.n_kv_heads=4",
                            "model.attention.rope=false"], "1 rank, relu2 MLP, MHA, 2 micro-batches"),
    "lowrank": (1, ["train.global_batch_size=2", "model.mlp.structure=lowrank", "model.mlp.rank=64"],
                "1 rank, low-rank MLP"),
    "zero1-dp2": (2, ["train.global_batch_size=4", "parallel.zero_stage=1"], "DP2 ZeRO-1"),
    "zero3-dp2": (2, ["train.global_batch_size=4", "parallel.zero_stage=3"], "DP2 ZeRO-3"),
    "tp2-sp": (2, ["train.global_batch_size=2", "parallel.tp=2", "parallel.sequence_parallel=true"], "TP2 + SP"),
    "pp2-selective": (2, ["train.global_batch_size=4", "parallel.pp=2", "train.recompute=selective"],
                      "PP2 (1F1B), selective"),
}

SENTINEL = 7_777_777
"""A uint8 allocation of this size (plus the step) marks a step boundary in the allocation record."""


def worker(overrides: list[str], out: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from strata.launcher.config import load_config
    from strata.launcher.plan import predicted_peak
    from strata.launcher.signals import StopRequest
    from strata.launcher.train import setup, train_step
    from strata.parallel.distributed import init_distributed
    from strata.parallel.plan import BUCKET

    cfg = load_config(None, overrides)
    info = init_distributed("gloo")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run = setup(cfg, info)
        run.stop = StopRequest("")
        for step in range(1, 4):
            del_me = torch.empty(SENTINEL + step, dtype=torch.uint8)
            del del_me
            train_step(run)
            run.step += 1
    peaks = step_peaks(prof)
    plan = predicted_peak(cfg, info.world_size, "cpu", stage=run.topo.pp_rank)
    # ZeRO 1-2 allocate the reduce bucket in every step, ZeRO-3 once at start
    bucket = plan.terms.get(BUCKET, 0.0) if cfg.parallel.zero_stage < 3 else 0.0
    steady = sum(v for k, v in plan.terms.items() if k.startswith(STEADY) or (k == BUCKET and not bucket))
    best = max((2, 3), key=lambda s: peaks[s][0])
    Path(out, f"{info.rank}.json").write_text(json.dumps({
        "rank": info.rank, "stage": run.topo.pp_rank, "measured": peaks[best][0], "held": peaks[best][1],
        "predicted": plan.peak, "predicted_delta": plan.peak - steady, "bucket": bucket,
        "params": sum(p.numel() for p in run.engine.module.parameters())}))


STEADY = ("weights", "optimizer", "ZeRO-3 gradient partition", "ZeRO-3 gathered")
"""The plan's terms that exist when a step begins (the rest is made and freed within the step)."""


def allocations(prof) -> list[int]:
    """Every allocation (positive bytes) and free (negative) that a profile(profile_memory=True)
    recorded, in time order."""
    from torch._C._profiler import _EventType

    events = []

    def walk(node):
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return [size for _, size in sorted(events)]


def step_peaks(prof) -> dict[int, tuple[int, int]]:
    """{step: (peak allocated bytes in it, bytes allocated when it began)} from the profiler's record."""
    total, step, out = 0, 0, {}
    for size in allocations(prof):
        if SENTINEL < size <= SENTINEL + 3:
            step = size - SENTINEL
            out[step] = (total, total)
            continue
        if -SENTINEL - 3 <= size < -SENTINEL:
            continue
        total += size
        if step:
            out[step] = (max(out[step][0], total), out[step][1])
    return out


def run_case(name: str, prepared: Path, tmp: Path) -> list[dict]:
    ranks, extra, _ = CASES[name]
    out = tmp / name
    out.mkdir()
    args = [*SMALL, f"data.prepared_dir={prepared}", f"train.run_dir={tmp / 'runs' / name}", *extra]
    me = [str(Path(__file__).resolve()), "--worker", str(out), *args]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-port=0",
               "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRATA_KERNELS": "reference"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.worker:
        worker(rest, args.worker)
        return 0
    mib = 2**20
    start, load = time.time(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.cases:
            for r in run_case(name, tmp / "prepared", tmp):
                rows.append((name, r))
    print(f"CPU, fp32, PyTorch reference kernels; {os.cpu_count()} cores; load average {load[0]:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end; {time.time() - start:.0f} s")
    print("| case | rank (stage) | predicted peak MiB | measured peak MiB | measured / predicted | "
          "step delta predicted MiB | measured MiB | measured / predicted |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        delta = r["measured"] - r["held"]
        cut = r["bucket"]  # in both: shown without it, where it is
        pd, md = r["predicted_delta"] - cut, delta - cut
        note = " (w/o bucket)" if cut else ""
        print(f"| {name}: {CASES[name][2]} | {r['rank']} ({r['stage']}) | {r['predicted'] / mib:.1f} | "
              f"{r['measured'] / mib:.1f} | {r['measured'] / r['predicted']:.3f} | {pd / mib:.1f}{note} | "
              f"{md / mib:.1f} | {md / pd:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
