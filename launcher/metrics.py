"""What a run reports: TensorBoard scalars, metrics.jsonl, and the console (a progress
bar on a terminal, plain log lines otherwise). Only rank 0 reports."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Reporter:
    def __init__(self, run_dir: Path, logging_cfg, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.log_every = logging_cfg.log_every
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        use_bar = logging_cfg.progress == "bar" or (logging_cfg.progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text.replace("\n", "  \n"), 0)

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
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()

    def step_done(self, step: int, values: dict) -> None:
        self.scalars(step, values)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
        elif step % self.log_every == 0:
            self.log(f"step {step:6d} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
                     f"grad norm {values['grad_norm']:.3f} | {values['tokens_per_s']:.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
