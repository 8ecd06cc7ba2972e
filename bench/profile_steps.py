"""Where a real training step's time goes: torch.profiler around a few optimizer steps of a
`strata train` run, as a markdown table (bench/ only; the product has no profiler hook).

bench/train_gpu.py's entry installs it when the environment asks:

    STRATA_PROFILE_STEPS=30:33 STRATA_PROFILE_OUT=/tmp/profile.md python -c "<train_gpu.NO_SAVE_ENTRY>" train ...

profiles optimizer steps 30, 31 and 32 (0-based, end excluded) on rank 0 and writes, per step: the
wall time, the time the device was busy (the union of its kernels' intervals), the host time
the profiled ops took, the kernels with the most device time (ops and CPU time on a CPU run),
grouped into matmuls, the Triton kernels, attention, communication and the rest, and the ops
with the most host time. A device busy for much less than the step's wall time
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
            out.write_text(profile_table(prof.events(), state["walls"]))
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
    """Markdown from the profiler's events (prof.events()): per-step totals, the groups, the top
    kernels by device time, then the top ops by host time. Device time is the kernels' own
    (an op's device time is its kernels': counting both would count them twice), and busy is the
    union of the kernels' intervals. On a CPU run, the ops' self CPU time stands for both."""
    steps = max(1, len(walls))
    wall = 1e3 * sum(walls) / steps
    kernels = [e for e in events if _on_device(e)]
    ops = [e for e in events if not _on_device(e)]
    host = sum(e.self_cpu_time_total for e in ops) / 1e3 / steps
    if kernels:
        where, busy = "device", _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3 / steps
        timed = {name: (n, us / 1e3 / steps) for name, (n, us) in _totals(kernels, _kernel_us).items()}
    else:
        where = "CPU"
        timed = {name: (n, us / 1e3 / steps) for name, (n, us) in _totals(ops, _self_cpu_us).items()}
        busy = sum(ms for _, ms in timed.values())
    total = max(sum(ms for _, ms in timed.values()), 1e-9)
    lines = [f"{steps} profiled steps: wall {wall:.1f} ms per step, {where} busy {busy:.1f} ms "
             f"({100 * busy / wall:.0f}% of the wall), host time in profiled ops {host:.1f} ms", "",
             f"| group | {where} ms per step | share |", "| --- | ---: | ---: |"]
    groups: dict[str, float] = {}
    for name, (_, ms) in timed.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    for name, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {ms:.2f} | {100 * ms / total:.1f}% |")
    what = "kernel" if kernels else "op"
    lines += ["", f"| {what} | calls per step | {where} ms per step | share | group |",
              "| --- | ---: | ---: | ---: | --- |"]
    for name, (n, ms) in sorted(timed.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"| `{name[:80]}` | {n / steps:.0f} | {ms:.2f} | {100 * ms / total:.1f}% | {group_of(name)} |")
    if kernels:  # where a host-bound step's time goes
        lines += ["", "| op (host) | calls per step | host ms per step |", "| --- | ---: | ---: |"]
        for name, (n, us) in sorted(_totals(ops, _self_cpu_us).items(), key=lambda kv: -kv[1][1])[:rows]:
            lines.append(f"| `{name[:80]}` | {n / steps:.0f} | {us / 1e3 / steps:.2f} |")
    return "\n".join(lines) + "\n"


def _on_device(event) -> bool:
    return str(event.device_type).rsplit(".", 1)[-1] in ("CUDA", "PrivateUse1")


def _kernel_us(event) -> float:
    return event.time_range.end - event.time_range.start


def _self_cpu_us(event) -> float:
    return event.self_cpu_time_total


def _totals(events, us) -> dict[str, tuple[int, float]]:
    """name -> (calls, microseconds)."""
    out: dict[str, tuple[int, float]] = {}
    for e in events:
        n, t = out.get(e.name, (0, 0.0))
        out[e.name] = (n + 1, t + us(e))
    return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals: kernels of several streams overlap."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered
