"""The train part: the config end to end through the training entry (bench/train_gpu.py, without the
final checkpoint), one run per train.recompute mode and kernel path: tokens/s, TFLOP/s, MFU against the
measured peak, peak memory against the plan, the loss curves compared, and three steps of each Triton
run profiled (bench/profile_steps.py) into <out>/profile-<run>.md."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from bench.gpu.budget import ASSUMED_PEAK_TFLOPS, ESTIMATE, step_seconds
from bench.gpu.commands import load_bench
from bench.gpu.runs import TrainRun, plain_twin, profile_of, run_dir_name


class TrainPart:
    """Suite's train part (a mixin of Suite: uses args, work, out, logs, left, say, keep_log, row, times and
    status)."""

    def train(self, peak: dict, runs: list[TrainRun]) -> None:
        args = self.args
        bench = load_bench("train_gpu")
        max_relative_difference, run_with_status, summary = (bench.max_relative_difference, bench.run_with_status,
                                                             bench.summary)
        peak_tflops = peak.get("tflops", ASSUMED_PEAK_TFLOPS)
        total_gib = peak.get("memory_gib")
        measured: dict[str, float] = {}
        log_dir = self.logs
        for run in runs:
            started = time.time()
            name = f"train {run.name}"
            need = ESTIMATE["train start"] + 10 * step_seconds(args, run, peak_tflops, measured)
            if run.planned_gib is not None and total_gib and run.planned_gib > total_gib:
                run.result = {"status": f"not run: the plan predicts {run.planned_gib:.1f} GiB > the GPU's "
                                        f"{total_gib:.1f} GiB"}
            elif self.left() < need:
                run.result = {"status": f"not run: {max(0, self.left()):.0f} s left of the budget, needs ~{need:.0f}"}
            else:
                run_dir = self.work / "runs" / run_dir_name(run)
                shutil.rmtree(run_dir, ignore_errors=True)
                log = log_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".log")
                profile = self.profile_of(run)
                with open(log, "w") as f:
                    records, status = run_with_status(args.config, run.steps, run.backend, run_dir, run.overrides,
                                                      save=False, timeout=self.left(), log=f, profile=profile)
                shutil.rmtree(run_dir, ignore_errors=True)
                self.times[name] = time.time() - started
                self.status[name] = status
                self.keep_log(name, log)
                run.result = {"status": status, "records": records, "wall_s": self.times[name]}
                if profile is not None and profile[2].is_file():
                    run.result["profile"] = profile_summary(profile[2].read_text())
                if records:
                    s = summary(records, min(args.skip_steps, max(0, len(records) - 1)))
                    run.result["summary"] = s
                    measured.setdefault(run.backend, s["step s"])
                if status != "ok":
                    tail = log.read_text(errors="replace").splitlines()[-6:]
                    self.say(f"{name}: {status}; its log ends:\n    " + "\n    ".join(tail))
            self.say(f"{name}: {run.result['status']}" +
                     (f", {run.result['summary']['tokens/s']:.0f} tok/s" if "summary" in run.result else ""))
        for run in runs:
            self.train_row(run, runs, peak_tflops, max_relative_difference)
        self.results["train"] = [{"name": r.name, "overrides": r.overrides, "planned_gib": r.planned_gib,
                                  "plan_note": r.plan_note, **r.result} for r in runs]

    def profile_of(self, run: TrainRun) -> tuple[int, int, Path] | None:
        return profile_of(self.args, run, self.out)

    def train_row(self, run: TrainRun, runs: list[TrainRun], peak_tflops: float, max_rel) -> None:
        s = run.result.get("summary")
        case = (f"{Path(self.args.config).stem} recompute={run.recompute}" + (" packed documents" if run.packed else "")
                + (" bf16 parameters" if run.bf16_params else "") + (f" FP8 {run.fp8}" if run.fp8 else "")
                + f" micro-batch {self.args.micro_batch if run.backend == 'triton' else self.args.ref_micro_batch}")
        impl = {"triton": "Strata (Triton)", "reference": "PyTorch reference"}.get(run.backend, run.backend)
        plan = "" if run.planned_gib is None else f"plan {run.planned_gib:.1f}"
        if not s:
            self.row("train", case, impl, memory=plan, note=run.result.get("status", ""))
            return
        mfu = 100 * s["TFLOP/s"] / peak_tflops
        memory = f"{s['peak GiB']:.1f} GiB" + (f"; {plan} ({100 * (s['peak GiB'] / run.planned_gib - 1):+.0f}%)"
                                               if run.planned_gib else "; plan n/a (planned_peak_gib)")
        vs = ""
        other = next((r for r in runs if r.recompute == run.recompute and r.backend != run.backend and
                      r.twin_of(run) and r.result.get("records")), None)
        if run.backend == "triton" and other is not None:
            vs = (f"loss curves: max rel. diff {max_rel(other.result['records'], run.result['records']):.1e} "
                  f"vs {other.backend} ({min(len(other.result['records']), s['steps'])} steps)")
        goals = []
        if run.backend == "triton":
            goals.append("MFU >= 45%: " + ("met" if mfu >= 45 else f"missed by {45 - mfu:.1f} pts"))
        if run.planned_gib:
            off = 100 * (s["peak GiB"] / run.planned_gib - 1)
            goals.append("memory within 10% of plan: " + ("met" if abs(off) <= 10 else f"missed ({off:+.0f}%)"))
        sheet = f"{s['MFU %']:.1f}% of the data sheet" if s["MFU %"] == s["MFU %"] else ""
        base = next((r for r in runs if r.recompute == "none" and r.backend == run.backend and r.twin_of(run) and
                     r.result.get("records")), None)
        plain = plain_twin(run, runs) if run.packed or run.bf16_params or run.fp8 else None
        if run.fp8 and plain is not None:
            vs, fp8_goals = fp8_against_bf16(run, plain, Path(self.args.config).stem, max_rel)
            goals += fp8_goals
        if run.bf16_params and plain is not None:
            other = plain.result["summary"]
            vs = (f"bf16 parameters: {100 * s['tokens/s'] / other['tokens/s']:.0f}% of the tokens/s and "
                  f"{100 * s['peak GiB'] / other['peak GiB']:.0f}% of the memory of fp32 parameters")
        if run.packed and plain is not None:
            cost = 100 * (1 - s["tokens/s"] / plain.result["summary"]["tokens/s"])
            vs = f"isolation costs {cost:.1f}% of the tokens/s of unpacked rows"
            goals.append("isolation under 5%: " + ("met" if cost < 5 else f"missed by {cost - 5:.1f} pts"))
        exact = "" if base is None else \
            f"loss vs recompute=none: max rel. diff {max_rel(base.result['records'], run.result['records']):.1e}"
        status = run.result["status"]
        note = "; ".join(x for x in (f"{s['steps']} steps, run {run.result['wall_s']:.0f} s",
                                     "" if status == "ok" else status, sheet, exact,
                                     f"final loss {s['final loss']:.3f}", run.result.get("profile", "")) if x)
        self.row("train", case, impl, f"{s['step s']:.3f} s/step",
                 f"{s['tokens/s']:,.0f} tok/s, {s['TFLOP/s']:.0f} TFLOP/s", f"MFU {mfu:.1f}%", memory, vs,
                 "; ".join(goals), note)


FP8_SPEEDUP_GOALS = {"hybrid-1b3": 1.15, "hybrid-8b-slice": 1.3}
"""Issue 26's goals for FP8's tokens/s over bf16's, per config."""
FP8_LOSS_GOAL = 0.01
"""The final loss within 1% of bf16's."""


def fp8_against_bf16(run: TrainRun, bf16: TrainRun, config: str, max_rel) -> tuple[str, list[str]]:
    """An FP8 run beside its bf16 twin: the speed ratio and the loss curves' gaps (largest relative,
    final), and its goals met or missed by how much."""
    s, base = run.result["summary"], bf16.result["summary"]
    speedup = s["tokens/s"] / base["tokens/s"]
    final_gap = s["final loss"] / base["final loss"] - 1
    vs = (f"FP8 {run.fp8}: {speedup:.2f}x the tokens/s of bf16; loss vs bf16: largest rel. gap "
          f"{max_rel(bf16.result['records'], run.result['records']):.1e}, final {100 * final_gap:+.2f}% "
          f"({min(len(bf16.result['records']), s['steps'])} steps)")
    goals = []
    if config in FP8_SPEEDUP_GOALS:
        goal = FP8_SPEEDUP_GOALS[config]
        goals.append(f"FP8 >= {goal}x bf16: " + ("met" if speedup >= goal else f"missed by {goal - speedup:.2f}x"))
    goals.append("final loss within 1% of bf16: " + ("met" if abs(final_gap) <= FP8_LOSS_GOAL else
                                                     f"missed by {100 * (abs(final_gap) - FP8_LOSS_GOAL):.2f} pts"))
    return vs, goals


def profile_summary(table: str) -> str:
    """The first lines of a bench/profile_steps.py table, for the suite's note column: how busy the
    device was, and the three largest groups."""
    lines = table.splitlines()
    if not lines or not lines[0].endswith(" ms"):  # the profiler did not start: its one line
        return "profile: " + (lines[0] if lines else "empty")
    groups = [row.strip("| ").split(" | ") for row in lines[4:7] if row.startswith("| ")]
    return f"profile: {lines[0].split(': ', 1)[-1]}; " + ", ".join(f"{g[0]} {g[2]}" for g in groups if len(g) == 3)
