"""Where a real training step's time goes: torch.profiler around a few optimizer steps of a
`strata train` run, as a markdown table (bench/ only; the product has no profiler hook).

bench/train_gpu.py's entry installs it when the environment asks:

    STRATA_PROFILE_STEPS=30:33 STRATA_PROFILE_OUT=/tmp/profile.md python -c "<train_gpu.NO_SAVE_ENTRY>" train ...

profiles optimizer steps 30, 31 and 32 (0-based, end excluded) on rank 0 and writes, per step: the
wall time, the time the device was busy, the host time the profiled ops took, and the ops
with the most device time (CPU time on a CPU run), grouped into matmuls, the Triton kernels,
attention, communication and the rest. A device busy for much less than the step's wall time
is a host-bound step (launch overhead, Python, synchronisation); bench/gpu_suite.py profiles
its Triton training runs this way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

GROUPS = (  # (group, substrings of an op or kernel name), first match wins
    ("communication", ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "broadcast", "gloo")),
    ("attention", ("flash", "attention", "sdpa", "fmha")),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "linear", "cutlass", "xmma", "nvjet",
                "cublas", "mkldnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copies and casts", ("aten::copy_", "aten::to", "_to_copy", "memcpy", "memset", "cast")),
)


def group_of(name: str) -> str:
    low = name.lower()
    if low.startswith("_") and low.endswith("kernel") or "triton" in low:  # ours: _scan_fwd_kernel, ...
        return "Triton kernels"
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other (elementwise, reductions...)")


def install_from_env(train_module) -> None:
    """Wraps train_module.train_step when STRATA_PROFILE_STEPS=first:end and STRATA_PROFILE_OUT are set."""
    spec, out = os.environ.get("STRATA_PROFILE_STEPS"), os.environ.get("STRATA_PROFILE_OUT")
    if spec and out:
        first, end = (int(v) for v in spec.split(":"))
        install(train_module, first, end, Path(out))


def install(train_module, first: int, end: int, out: Path) -> None:
    """Profile optimizer steps [first, end) of rank 0 through train_module.train_step(run)."""
    step_fn, state = train_module.train_step, {"walls": []}

    def profiled(run):
        profiling = run.dist.is_main and first <= run.step < end and state.get("failed") is None
        if profiling and run.step == first:
            try:  # a profiler that cannot start (no CUPTI) costs the table, not the training run
                state["prof"] = _profiler().__enter__()
            except Exception as e:  # noqa: BLE001
                state["failed"] = f"the profiler did not start: {type(e).__name__}: {e}"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(state["failed"] + "\n")
                profiling = False
        start = time.perf_counter()
        result = step_fn(run)
        if profiling:
            _synchronize()
            state["walls"].append(time.perf_counter() - start)
        if profiling and run.step == end - 1:
            prof = state.pop("prof")
            prof.__exit__(None, None, None)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(profile_table(prof.key_averages(), state["walls"]))
        return result

    train_module.train_step = profiled


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_table(events, walls: list[float], rows: int = 25) -> str:
    """Markdown: per-step totals, the groups, then the top ops by device (or CPU) self time."""
    on_device = any(e.self_device_time_total > 0 for e in events)
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    steps = max(1, len(walls))
    per_step_ms = {e.key: getattr(e, key) / 1e3 / steps for e in events}
    busy = sum(per_step_ms.values())
    host = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    wall = 1e3 * sum(walls) / steps
    where = "device" if on_device else "CPU"
    lines = [f"{steps} profiled steps: wall {wall:.1f} ms per step, {where} busy {busy:.1f} ms "
             f"({100 * busy / wall:.0f}% of the wall), host time in profiled ops {host:.1f} ms", "",
             f"| group | {where} ms per step | share |", "| --- | ---: | ---: |"]
    groups: dict[str, float] = {}
    for name, ms in per_step_ms.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    for name, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {ms:.2f} | {100 * ms / max(busy, 1e-9):.1f}% |")
    lines += ["", f"| op | calls per step | {where} ms per step | share | group |", "| --- | ---: | ---: | ---: | --- |"]
    for e in sorted(events, key=lambda e: -getattr(e, key))[:rows]:
        ms = per_step_ms[e.key]
        lines.append(f"| `{e.key[:80]}` | {e.count / steps:.0f} | {ms:.2f} | {100 * ms / max(busy, 1e-9):.1f}% | "
                     f"{group_of(e.key)} |")
    return "\n".join(lines) + "\n"
