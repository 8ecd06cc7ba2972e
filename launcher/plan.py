"""`strata plan`: which parallel layouts fit a model on N GPUs, and what one rank holds.

    strata plan --config configs/hybrid-8b.yaml --gpus 64 --gpu-memory 80
    strata plan --config configs/hybrid-8b.yaml --gpus 64 --gpu-memory 80 train.recompute=selective
    strata plan --config configs/hybrid-1b3.yaml --gpus 8 --gpu-memory 80 parallel.tp=2   # one layout
    strata plan --config configs/hybrid-8b.yaml --gpus 64 --longest-sequence parallel.cp=8

Without parallel.tp or parallel.pp on the command line, every layout that divides the model on
--gpus ranks (parallel/layout.py), beside parallel.cp's context parallelism, is planned: a table of
those that fit, fastest first by the estimated step time, one line for each that does not saying
what is over (and what would make it fit), then the breakdown of the fastest. With either
override, that one layout and its breakdown. --longest-sequence adds the longest train.seq_len
each fitting layout still fits.
The memory model is parallel/plan.py's (activations: model/memory.py); GPU runs use bf16 autocast
and the Triton kernels unless train.precision=fp32 or STRATA_KERNELS=reference. No GPU is used.

Exit codes: 0 a layout fits (or the one asked for fits), 1 none does, 2 a bad config or layout.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace

from strata.launcher.config import Config, ConfigError, load_config
from strata.model.counting import KIND_NAMES
from strata.parallel.layout import Layout, LayoutError, check_layout
from strata.parallel.plan import (ASSUMED_MFU, BASELINE, GIB, Hardware, Plan, RunSpec, held_at_engine_start,
                                  plan_layout, plan_layouts, total_parameters)

NOTHING_FITS = 1
RECOMPUTE_ORDER = ("none", "selective", "full")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (the world size)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8): TP beyond a node is slow")
    p.add_argument("--gpu-tflops", type=float, default=Hardware.tflops,
                   help=f"dense bf16 TFLOP/s of one GPU, for the step time (default {Hardware.tflops}, H100)")
    p.add_argument("--longest-sequence", action="store_true",
                   help="add a column: the longest train.seq_len at which each fitting layout still fits")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.recompute=selective parallel.tp=2")
    return p.parse_args(argv)


def run_spec(cfg: Config, device_type: str = "cuda") -> RunSpec:
    """The plan's view of a config, on a device of `device_type` (the kernels and dtype it will run)."""
    vocab = cfg.planned_vocab_size()
    if not vocab:
        raise ConfigError("model.vocab_size: 0 follows data.tokenizer, which the plan does not open; set "
                          "model.vocab_size to the tokenizer's vocabulary")
    choice = os.environ.get("STRATA_KERNELS", "auto")
    cuda = device_type == "cuda"
    kernels = "triton" if (choice == "auto" and cuda) or choice == "triton" else "reference"
    bf16 = cfg.train.computes_in_bf16(on_gpu=cuda)
    recompute = tuple(cfg.train.block_recompute(cfg.model.blocks()))  # train.recompute, recompute_kinds, _every
    return RunSpec(cfg.model, cfg.train.seq_len, cfg.train.global_batch_size, cfg.parallel.micro_batch_size,
                   cfg.parallel.zero_stage, cfg.parallel.sequence_parallel, recompute, kernels, 2 if bf16 else 4,
                   vocab, cfg.data.doc_boundaries, 2 if cfg.train.param_dtype == "bf16" else 4, cfg.checkpoint.async_)


def predicted_peak(cfg: Config, world_size: int, device_type: str, stage: int = 0) -> Plan:
    """The plan of a run's own layout for pipeline stage `stage` (launcher/train.py logs it)."""
    par = cfg.parallel
    layout = Layout(par.tp, par.pp, world_size // (par.tp * par.cp * par.pp), par.zero_stage, cp=par.cp)
    return plan_layout(run_spec(cfg, device_type), layout, cuda=device_type == "cuda", stage=stage)


def log_memory_plan(reporter, cfg: Config, world_size: int, device, stage: int, step: int,
                    rss_with_engine: float = 0.0) -> None:
    """A run's start (launcher/train.py): the plan's predicted peak for this rank's layout and pipeline
    stage, in the log and as memory/predicted_peak_gib; the reporter then records the measured peak
    beside it at every step, so every run checks the plan. `rss_with_engine`: on CPU, the process's resident
    size once the engine was built (launcher.metrics.process_rss_bytes); less what the plan counts of that
    moment (the weights, ZeRO's partitions), it is the process's baseline (interpreter, torch, DeepSpeed's
    set-up, the corpus), which the measured peak RSS holds too. On GPU torch's allocations alone are
    measured: 0."""
    try:
        plan = predicted_peak(cfg, world_size, device.type, stage)
    except (ValueError, RuntimeError, NotImplementedError) as e:  # a plan must never stop a run
        reporter.log(f"memory: no plan for this run ({e})")
        return
    baseline = max(0.0, rss_with_engine - held_at_engine_start(plan)) if rss_with_engine else 0.0
    terms = {**plan.terms, BASELINE: baseline} if baseline else plan.terms
    top = ", ".join(f"{name} {size(v)}" for name, v in sorted(terms.items(), key=lambda kv: -kv[1])[:3])
    measured = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                "the process's peak RSS (bench/memory.py counts torch's allocations alone)")
    reporter.log(f"memory: predicted peak {size(plan.peak + baseline)} per rank (stage {plan.stage}: {top}); "
                 f"measured: {measured}")
    if plan.host_snapshot:
        reporter.log(f"memory: {snapshot_line(plan, device.type == 'cuda')}")
    reporter.expect_peak_memory(step, (plan.peak + baseline) / GIB)


def snapshot_line(plan: Plan, cuda: bool) -> str:
    where = "pinned host memory, beside the GPU's" if cuda else "counted in the peak"
    return f"checkpoint.async holds a host snapshot of {size(plan.host_snapshot)} per rank during a save ({where})"


def human(n: float) -> str:
    return next(f"{n / scale:.3g}{unit}" for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))
                if abs(n) >= scale or scale == 1)


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def gib(n: float) -> str:
    return f"{n / GIB:.1f}" if n >= 0.095 * GIB else f"{n / GIB:.2f}"


def short(plan: Plan) -> str:
    return f"{plan.layout} zero={plan.layout.zero_stage}"


def what_fits(plan: Plan, memory: float, hardware: Hardware) -> str:
    """The least change of recompute or ZeRO stage under which the layout fits, as overrides."""
    spec, layout, n = plan.spec, plan.layout, plan.spec.model.n_blocks
    now = max((RECOMPUTE_ORDER.index(m) for m in spec.recompute), default=0)
    modes = RECOMPUTE_ORDER[now + 1:]
    stages = [z for z in range(spec.zero_stage + 1, 4) if layout.pp == 1 or z <= 1]
    changes = [(f"train.recompute={m}", {"recompute": (m,) * n}) for m in modes]
    changes += [(f"parallel.zero_stage={z}", {"zero_stage": z}) for z in stages]
    changes += [(f"parallel.zero_stage={z} train.recompute={m}", {"zero_stage": z, "recompute": (m,) * n})
                for z in stages for m in modes]
    for name, change in changes:
        if not plan_layout(replace(spec, **change), layout, hardware).over(memory):
            return f"; fits with {name}"
    return ""


def over_line(plan: Plan, memory: float, hardware: Hardware) -> str:
    if plan.problems:
        return f"  {short(plan)}: cannot run: {'; '.join(plan.problems)}"
    top = sorted(plan.terms.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {gib(v)}" for name, v in top)
    stage = f" (stage {plan.stage})" if plan.layout.pp > 1 else ""
    return (f"  {short(plan)}: {gib(plan.peak)} GiB{stage} is {gib(plan.peak - memory)} GiB over {gib(memory)}: "
            f"{parts}{what_fits(plan, memory, hardware)}")


def largest_micro_batch(plan: Plan, memory: float, hardware: Hardware) -> int:
    """The largest micro-batch (dividing a rank's share of the global batch) at which the layout still
    fits: fewer, larger micro-batches keep a GPU busier (on one H100, hybrid-1b3 at micro-batch 1 left
    it waiting on the host; at 4 it made 48% MFU: docs/BENCHMARKS.md)."""
    per_rank = plan.spec.global_batch // plan.layout.dp
    best = plan.spec.micro_batch
    for m in range(plan.spec.micro_batch + 1, per_rank + 1):
        if per_rank % m == 0:
            if plan_layout(replace(plan.spec, micro_batch=m), plan.layout, hardware).over(memory):
                break
            best = m
    return best


LONGEST_SEARCHED = 2**24
"""The longest sequence --longest-sequence tries (16M tokens)."""


def longest_sequence(plan: Plan, memory: float, hardware: Hardware) -> int:
    """The longest train.seq_len at which the layout still fits (memory and the layout's divisibility;
    model.max_seq_len aside), in steps of 1024 tokens x 2 cp x tp: doubling from the planned length,
    then bisecting. Everything else of the run (batch, recompute, ZeRO) stays as planned."""
    layout = plan.layout
    granule = math.lcm(1024, 2 * layout.cp * layout.tp)

    def fits(seq_len: int) -> bool:
        return not plan_layout(replace(plan.spec, seq_len=seq_len), layout, hardware).over(memory)

    low = plan.spec.seq_len
    while low * 2 <= LONGEST_SEARCHED and fits(low * 2):
        low *= 2
    high = low * 2
    while high - low > granule:
        mid = (low + high) // 2 // granule * granule
        if mid <= low:
            break
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def table(plans: list[Plan], memory: float, hardware: Hardware, longest: bool = False) -> list[str]:
    lines = ["| layout | ZeRO | peak GiB/GPU | weights + grads + optimizer | activations | loss + transients | "
             "micro-batches per step | est. step s | tokens/s/GPU | largest micro-batch that fits |"
             + (" longest seq_len that fits |" if longest else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if longest else "")]
    for p in plans:
        act = sum(v for k, v in p.terms.items() if k.startswith(("activations", "a recomputed", "pipeline")))
        transient = sum(v for k, v in p.terms.items() if k.startswith(("loss", "transient")))
        static = p.peak - act - transient
        tokens = p.spec.global_batch * p.spec.seq_len / p.step_time / p.layout.world_size
        lines.append(f"| {p.layout} | {p.layout.zero_stage} | {gib(p.peak)} | {gib(static)} | {gib(act)} | "
                     f"{gib(transient)} | {p.accumulation} | {p.step_time:.2f} | {tokens:,.0f} | "
                     f"{largest_micro_batch(p, memory, hardware)} |"
                     + (f" {longest_sequence(p, memory, hardware):,} |" if longest else ""))
    return lines


def breakdown(plan: Plan) -> list[str]:
    spec = plan.spec
    where = f", stage {plan.stage} of {plan.layout.pp} (the fullest)" if plan.layout.pp > 1 else ""
    lines = [f"per-GPU memory of {plan.layout} zero={plan.layout.zero_stage}{where}, at the {plan.phase}:"]
    width = max(map(len, plan.terms))
    lines += [f"  {name:<{width}}  {gib(v):>7} GiB" for name, v in plan.terms.items()]
    lines.append(f"  {'peak':<{width}}  {gib(plan.peak):>7} GiB")
    if plan.host_snapshot:
        lines.append(f"  and {snapshot_line(plan, cuda=True)}")
    if plan.activations_by_kind:
        kinds = ", ".join(f"{KIND_NAMES[k]} {gib(v)} GiB" for k, v in plan.activations_by_kind.items())
        lines.append(f"  activations of one micro-batch ({spec.micro_batch} x {spec.seq_len} tokens) on this stage by "
                     f"block kind: {kinds}")
    return lines


def header(cfg: Config, spec: RunSpec, plan: Plan, args) -> list[str]:
    modes = sorted(set(spec.recompute) or {"none"})
    recompute = modes[0] if len(modes) == 1 else f"per block kind {cfg.train.recompute_kinds}"
    if "full" in modes and cfg.train.recompute_every > 1:
        recompute += f", full every {cfg.train.recompute_every} blocks of a kind"
    dtype = ("bf16 parameters, fp32 masters" if spec.param_bytes == 2 else
             "bf16 autocast" if spec.act_bytes == 2 else "fp32")
    return [f"{cfg.model.pattern} d_model={cfg.model.d_model} vocab={spec.vocab}: "
            f"{human(total_parameters(spec)).replace('G', 'B')} parameters, {cfg.model.n_blocks} blocks",
            f"seq_len {spec.seq_len}, global batch {spec.global_batch} sequences, micro-batch {spec.micro_batch}; "
            f"{dtype}, {spec.kernels} kernels; recompute {recompute}; training FLOPs/token "
            f"{human(plan.flops_per_token)} (recompute included)",
            f"{args.gpus} GPUs of {args.gpu_memory:g} GiB ({args.gpus_per_node} per node)"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    hardware = Hardware(args.gpu_memory * GIB, args.gpus_per_node, args.gpu_tflops)
    memory = hardware.gpu_memory
    try:
        if args.gpus < 1 or args.gpu_memory <= 0:
            raise ConfigError(f"--gpus and --gpu-memory: must be positive, got {args.gpus} and {args.gpu_memory}")
        cfg = load_config(args.config, args.overrides)
        spec = run_spec(cfg)
        one = any(o.split("=", 1)[0] in ("parallel.tp", "parallel.pp") for o in args.overrides)
        par = cfg.parallel
        if one:
            layout = check_layout(cfg.model, par.tp, par.pp, args.gpus, par.zero_stage, par.sequence_parallel,
                                  spec.seq_len, spec.vocab, par.cp)
            plans = [plan_layout(spec, layout, hardware)]
        else:
            plans = plan_layouts(spec, args.gpus, hardware, cp=par.cp)
    except (ConfigError, LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not plans:
        print(f"error: no tp x pp layout divides the model on {args.gpus} GPUs", file=sys.stderr)
        return 2
    fit = sorted((p for p in plans if not p.over(memory)), key=lambda p: p.step_time)
    out = header(cfg, spec, plans[0], args)
    if not one:
        out.append(f"{len(plans)} layouts divide the model; {len(fit)} fit")
    if fit:
        out += ["", f"fits, fastest first (step time estimated: compute at {ASSUMED_MFU:.0%} of "
                f"{args.gpu_tflops:g} TFLOP/s, 1F1B bubble, TP/DP traffic not overlapped):",
                *table(fit, memory, hardware, args.longest_sequence)]
    over = [p for p in plans if p.over(memory)]
    if over:
        out += ["", "does not fit:", *(over_line(p, memory, hardware) for p in over)]
    out += ["", *breakdown(fit[0] if fit else plans[0])]
    print("\n".join(out))
    return 0 if fit else NOTHING_FITS


if __name__ == "__main__":
    raise SystemExit(main())
