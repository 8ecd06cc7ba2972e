"""What a run reports: TensorBoard scalars, metrics.jsonl, and the console (a progress
bar on a terminal, plain log lines otherwise). Only rank 0 reports."""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

from strata.parallel.checkpoint.files import atomic_write

# Dense bf16 peaks from the vendors' data sheets (TFLOP/s), matched against the device name.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1}


def peak_tflops(configured: float, device: torch.device) -> float | None:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def hardware_metrics(tokens_per_s_per_rank: float, flops_per_token: float, peak: float | None,
                     device: torch.device) -> dict:
    """TFLOP/s per accelerator, MFU % (when the peak is known) and peak memory in GiB."""
    tflops = tokens_per_s_per_rank * flops_per_token / 1e12
    out = {"tflops_per_gpu": tflops}
    if peak:
        out["mfu_percent"] = 100.0 * tflops / peak
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def process_rss_bytes(device: torch.device) -> float:
    """On CPU, the resident size now (interpreter, torch, DeepSpeed, the corpus's maps, what the model
    holds): the measured peak (ru_maxrss) holds it all, the memory plan only the training state. Now,
    not the peak so far: a transient before it (large buffers, returned to the system when freed) is
    not under the training's peak. 0 on GPU, where torch's own allocations are measured."""
    if device.type == "cuda":
        return 0.0
    try:
        with open("/proc/self/statm") as f:  # Linux
            return float(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # elsewhere the peak so far is the nearest (in KiB, as hardware_metrics reads it)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def cut_metrics(path: Path, start_step: int) -> None:
    """Drop the records of ``path`` past ``start_step`` before a run (re)starting there appends.

    A run resumed from the checkpoint of step s redoes the steps after s; their records from
    before the interruption (train, eval, any kind) are cut so that each step appears once. A
    last line that is not JSON (torn by a kill mid-write) is dropped too. The file is rewritten
    atomically (a new file, fsync, rename), so a kill during the cut loses nothing.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue  # a torn write at the end
            kept.append(line)  # not ours to judge: keep it
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > start_step:
            continue
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    new = b"".join(kept)
    if new == data:
        return
    atomic_write(path, new)


def show_strata_logs(is_main: bool) -> None:
    """Strata's own log lines (the strata.* loggers: corpus preparation's progress, the loader's
    warnings) on stderr, from rank 0 only, whatever the root logger does; once per process."""
    logger = logging.getLogger("strata")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    logger.propagate = False


NON_FINITE = ("nan", "inf", "-inf")


def json_value(value):
    """metrics.jsonl is strict JSON (RFC 8259 has no NaN or Infinity): a non-finite number is written as
    the string "nan", "inf" or "-inf" (read_record turns them back into floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_record(line: str | bytes) -> dict:
    """One metrics.jsonl record with its numbers as numbers, non-finite ones included."""
    return {k: float(v) if isinstance(v, str) and v in NON_FINITE else v for k, v in json.loads(line).items()}


class Reporter:
    def __init__(self, run_dir: Path, logging_cfg, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.log_every = logging_cfg.log_every
        self.predicted_peak_gib: float | None = None
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        path = run_dir / "metrics.jsonl"
        cut_metrics(path, start_step)
        self.jsonl = open(path, "a")
        use_bar = logging_cfg.progress == "bar" or (logging_cfg.progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, text.replace("\n", "  \n"), step)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def scalars(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"{kind}/{name}", value, step)
        record = {"kind": kind, "step": step, "time": time.time(), **{k: json_value(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()

    def expect_peak_memory(self, step: int, gib: float) -> None:
        """The memory plan's predicted peak per rank (launcher/plan.py), recorded once as
        memory/predicted_peak_gib; every step then records the measured peak beside it as
        memory/measured_peak_gib (train/peak_memory_gib's value)."""
        self.predicted_peak_gib = gib
        self.scalars(step, {"predicted_peak_gib": gib}, kind="memory")

    def step_done(self, step: int, values: dict) -> None:
        self.scalars(step, values)
        measured = values.get("peak_memory_gib")
        if self.predicted_peak_gib is not None and measured is not None:
            self.scalars(step, {"measured_peak_gib": measured}, kind="memory")
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
        elif step % self.log_every == 0:
            memory = "" if self.predicted_peak_gib is None or measured is None else \
                f" | peak memory {measured:.2f} GiB (plan {self.predicted_peak_gib:.2f})"
            self.log(f"step {step:6d} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
                     f"grad norm {values['grad_norm']:.3f} | {values['tokens_per_s']:.0f} tok/s{memory}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
